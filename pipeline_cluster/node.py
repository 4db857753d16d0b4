"""The older project's node module, kept as it was: `pipeline_cluster.node.Server(addr, log_addr).serve()`."""
from pipeline_cluster.transport.server import Server, main

__all__ = ["Server", "main"]
