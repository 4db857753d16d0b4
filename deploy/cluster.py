"""`SSHCluster`: a cluster whose nodes are started over SSH from a cluster.toml, and stopped when it closes (or,
with `SSHCluster.attach`, nodes started detached by `deploy up --detach`, left running when it closes).

    with pc.SSHCluster.from_config("cluster.toml") as cluster:
        for out in cluster.run(pipeline, inputs):
            ...
"""
from __future__ import annotations

import os
import threading
from typing import Any
from collections.abc import Mapping

from pipeline_cluster.cluster import Cluster
from pipeline_cluster.config import Config
from pipeline_cluster.deploy.bootstrap import Deployment, HostResult, RemoteNode, changing_state, read_state
from pipeline_cluster.placement import start_thread
from pipeline_cluster.deploy.config import DeployConfig, load_config

STATE_POLL_SECONDS = 1.0  # how often an attached root reads the detached cluster's state for added and removed nodes


class SSHCluster(Cluster):
    """The nodes of a cluster.toml, bootstrapped in parallel over SSH; they live exactly as long as this object."""

    def __init__(self, config: DeployConfig | str | os.PathLike | Mapping[str, Any], *, attach: bool = False,
                 **options: Any) -> None:
        """`attach=True` connects to the nodes `deploy up --detach` started instead of starting nodes: closing then
        leaves them running (see `attach`)."""
        self._watching = threading.Event()  # set on close: stops following a detached cluster's changes
        self.deploy_config = config if isinstance(config, DeployConfig) else load_config(config)
        options.setdefault("credit", self.deploy_config.credit)
        options.setdefault("start_timeout", self.deploy_config.start_timeout)
        # a [stages.NAME] table applies to pipelines with that stage; others skip it with a note naming this file
        stages = Config({"stages": dict(self.deploy_config.stages)}, self.deploy_config.source)
        super().__init__(config=stages, **options)
        self.deployment = Deployment(self.deploy_config, self.rundir.run_id)
        try:
            links = (self.deployment.attach if attach else self.deployment.up)(self.root, self.log_sink)
            for link in links:
                self._add_link(link)
        except BaseException:
            self.close(drain=False)
            raise
        if attach:  # `deploy add` and `deploy remove` change a detached cluster: follow them
            start_thread(self._follow_state, name="pipeline-cluster-detached-state")

    @classmethod
    def attach(cls, path: str | os.PathLike, **options: Any) -> SSHCluster:
        """Connect to the nodes that `pipeline-cluster deploy up --detach path` started; they keep running after
        `close()`, until their idle_timeout passes with no root (or `deploy down`)."""
        return cls(path, attach=True, **options)

    @classmethod
    def from_config(cls, path: str | os.PathLike | Mapping[str, Any], **options: Any) -> SSHCluster:
        """Read `path` (a cluster.toml), start its nodes; `options` are Cluster's (credit, run_dir, log_file...)."""
        return cls(path, **options)

    def add_node(self, node: Any) -> str:  # type: ignore[override]  # a [[node]] table here, not an address
        """Start one more node over SSH, also while a pipeline runs: `node` is a [[node]] table of cluster.toml
        (`{"name": "d", "host": "10.0.0.4"}` and any node or [ssh] key), checked as if it were in the file. The
        node gets the pipeline, starts its workers and takes work not yet handed out; returns its name."""
        if not isinstance(node, Mapping):
            raise TypeError(f"an SSHCluster's node is a [[node]] table (a dict with at least 'host'), got {node!r}")
        spec = self.deploy_config.extra_node(node)
        if spec.name in {remote.spec.name for remote in self.deployment.nodes}:
            raise ValueError(f"node {spec.name!r} is in this cluster already")
        remote = RemoteNode(spec, self.deploy_config, self.deployment.run_id)
        self.deployment.nodes.append(remote)
        link = remote.up(self.deployment.connector, self.deployment.authkey, self.root, self.log_sink)
        try:
            self._join(link)
        except BaseException:
            link.close()
            remote.down()
            raise
        return link.name

    def remove_node(self, name: str, timeout: float | None = 60.0) -> None:
        """Drain node `name` (see Cluster.remove_node), then stop it on its host and close its SSH connection."""
        super().remove_node(name, timeout)
        for remote in self.deployment.nodes:
            if remote.spec.name == name:
                remote.down()

    def _follow_state(self) -> None:
        """Every STATE_POLL_SECONDS: attach nodes `deploy add` started; drain the ones `deploy remove` takes out
        and tell it so (it stops them once every attached root has let go)."""
        while not self._watching.wait(STATE_POLL_SECONDS):
            try:
                nodes = read_state(self.deploy_config)["nodes"]
                mine = {remote.spec.name for remote in self.deployment.nodes}
                for name, node in nodes.items():
                    if node.get("leaving") and str(os.getpid()) not in node["released"]:
                        if name in {link.name for link in self._live_links()}:
                            self.remove_node(name)
                        with changing_state(self.deploy_config) as state:
                            state["nodes"][name]["released"].append(str(os.getpid()))
                    elif name not in mine and not node.get("leaving"):
                        remote = RemoteNode(self.deploy_config.node(name), self.deploy_config,
                                            self.deployment.run_id)
                        self.deployment.nodes.append(remote)
                        self._join(remote.attach(self.deployment.connector, self.deployment.authkey,
                                                 node["port"], self.root, self.log_sink))
            except Exception as exc:  # a node that cannot be reached yet, the state file gone: said, tried again
                if not self._watching.is_set():
                    self._warn(f"following the detached cluster's changes: {exc!r}")

    @property
    def hosts(self) -> list[HostResult]:
        """One result per node, up or not (`ok`): ship mode, pid, port, seconds to come up, or the HostError of a
        node the cluster goes on without (min_nodes)."""
        return self.deployment.results

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Finish (unless `drain=False`), stop every node on every host, close the SSH connections."""
        self._watching.set()
        try:
            super().close(drain, timeout)
        finally:
            self.deployment.down()
