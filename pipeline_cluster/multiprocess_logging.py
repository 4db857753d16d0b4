"""The older project's logging module, kept as it was: `serve(addr, filename)`, `configure(addr)`, `log(msg)`."""
from pipeline_cluster.logs.records import Record
from pipeline_cluster.logs.route import configure, log
from pipeline_cluster.logs.server import LogServer, serve

__all__ = ["LogServer", "Record", "configure", "log", "serve"]
