"""The older project's single-machine pipeline module, kept as it was: `pipeline_cluster.pipeline.Pipeline(log_addr)`
with `add_task`, `boot`, `feed`, `get_output` and the wait and state calls."""
from pipeline_cluster.compat import SeedPipeline as Pipeline

__all__ = ["Pipeline"]
