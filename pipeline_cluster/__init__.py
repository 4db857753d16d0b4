"""pipeline_cluster: run pipelines of Python functions over streams of items on a cluster of machines.

    import pipeline_cluster as pc
    with pc.LocalCluster() as cluster:
        for out in cluster.run(pc.Pipeline([pc.Stage(f), pc.Stage(g, generator=True)]), inputs):
            ...

Names are imported on first use, so a worker process that only needs the task runner starts fast.
"""
import importlib
from typing import Any

__version__ = "0.3.0.dev0"

_EXPORTS = {
    "Cluster": "pipeline_cluster.cluster",
    "LocalCluster": "pipeline_cluster.cluster",
    "Results": "pipeline_cluster.run",
    "DeadLetter": "pipeline_cluster.messages",
    "ClusterError": "pipeline_cluster.errors",
    "StageFailed": "pipeline_cluster.errors",
    "InputFailed": "pipeline_cluster.errors",
    "Pipeline": "pipeline_cluster.model",
    "Stage": "pipeline_cluster.model",
    "Supervision": "pipeline_cluster.model",
    "SSHCluster": "pipeline_cluster.deploy.cluster",
    "RayCluster": "pipeline_cluster.raycluster",
    "RunSummary": "pipeline_cluster.run",
    "RunExists": "pipeline_cluster.journal",
    "IdentityChanged": "pipeline_cluster.journal",
    "RunLocked": "pipeline_cluster.journal",
}
_SUBMODULES = {"sinks"}  # `pc.sinks.JsonLines`
__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"pipeline_cluster.{name}")
    raise AttributeError(f"module 'pipeline_cluster' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
