"""The older project's interface, kept working (not deprecated): `Root(*node_addrs)`.

Its module paths stay too: `pipeline_cluster.root`, `pipeline_cluster.node` and
`pipeline_cluster.multiprocess_logging` re-export from here and from the modules that do the work.
"""
from __future__ import annotations

from typing import Any

from pipeline_cluster.cluster import Cluster


def Root(*node_addrs: tuple[str, int], **options: Any) -> Cluster:
    """Connect to node servers; the result has setup/boot/feed/wait_input/wait_empty/sleep/wakeup/status/reset."""
    return Cluster.connect(node_addrs, **options)
