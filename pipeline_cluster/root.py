"""The seed's root: `pipeline_cluster.root.Root(*node_addrs)`, a cluster over running node servers."""
from __future__ import annotations

from typing import Any

from pipeline_cluster.cluster import Cluster


def Root(*node_addrs: tuple[str, int], **options: Any) -> Cluster:
    """Connect to node servers; the result has setup/boot/feed/wait_input/wait_empty/sleep/wakeup/status/reset."""
    return Cluster.connect(node_addrs, **options)
