"""The older project's root module, kept as it was: `pipeline_cluster.root.Root(*node_addrs)`."""
from pipeline_cluster.compat import Root

__all__ = ["Root"]
