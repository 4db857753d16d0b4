"""`RayCluster`: pipeline_cluster on the machines of a Ray cluster.

Ray finds and starts the machines; on each Ray node a Ray actor holding that node's CPUs runs a pipeline_cluster
node server, and the root connects to it over the usual authenticated transport with a key made for this cluster
(handed to the actors by Ray as an argument, never logged). Everything else is a `Cluster` as any other: credit,
supervision, dead letters, node loss, durable runs, the dashboard. Ray nodes that join later are picked up.
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
from typing import Any

from pipeline_cluster.cluster import Cluster
from pipeline_cluster.errors import ClusterError
from pipeline_cluster.logs.route import make_record
from pipeline_cluster.placement import start_thread
from pipeline_cluster.transport.links import RemoteLink

POLL_SECONDS = 1.0  # how often Ray's node list is read for nodes that joined
STOP_SECONDS = 10.0  # a node server's time to stop its workers before its actor is killed


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError('RayCluster needs Ray: pip install "pipeline_cluster[ray]"') from None
    return ray


class NodeHost:
    """The body of the Ray actor on one node: a node server listening on the node's address, in a thread."""

    def __init__(self, authkey: bytes, workers: int) -> None:
        import ray

        from pipeline_cluster.transport.server import Server

        logging.getLogger("pipeline_cluster").setLevel(logging.WARNING)  # workers' records go to the root
        self.server = Server((ray.util.get_node_ip_address(), 0), authkey=authkey, workers=workers,
                             echo_warnings=False)
        self.thread = threading.Thread(target=self.server.serve, name="pipeline-cluster-node", daemon=True)
        self.thread.start()

    def where(self) -> tuple[str, int, int]:
        """The server's address, and the actor's pid (the parent of this node's workers)."""
        return self.server.address[0], self.server.address[1], os.getpid()

    def stop(self) -> None:
        """Stop serving: every session ends and its workers stop."""
        self.server.stop()
        self.thread.join(STOP_SECONDS)


class RayCluster(Cluster):
    """A cluster over the nodes of a Ray cluster: one node server per Ray node (at most `nodes` of them), each a Ray
    actor that reserves the node's CPUs and runs `workers` worker processes per stage (default: those CPUs).

    `address`: None (Ray's own default: $RAY_ADDRESS, or a local Ray started for this cluster and stopped with
    it), "auto" (the Ray cluster running on this machine), or "ray://host:10001" (Ray Client).
    """

    def __init__(self, address: str | None = None, *, nodes: int | None = None, workers: int | None = None,
                 heartbeat: float = 1.0, dead_after: float = 10.0, connect_timeout: float = 60.0,
                 **options: Any) -> None:
        ray = _ray()
        if nodes is not None and (isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1):
            raise ValueError(f"nodes must be a positive int (or None: every Ray node), got {nodes!r}")
        self._ray = ray
        self._inited_ray = False  # this cluster called ray.init, so it calls ray.shutdown
        self._authkey = secrets.token_bytes(32)
        self._max_nodes = nodes
        self._workers = workers
        self._heartbeat, self._dead_after, self._connect_timeout = heartbeat, dead_after, connect_timeout
        self._hosts: dict[str, tuple[Any, RemoteLink]] = {}  # Ray node id -> (actor, link)
        self._worker_parents: dict[str, int] = {}  # link name -> pid of the actor that runs its node server
        self._watching = threading.Event()
        self._watcher: threading.Thread | None = None
        super().__init__(**options)
        try:
            if not ray.is_initialized():
                ray.init(address=address, logging_level=logging.WARNING)
                self._inited_ray = True
            self._join_new_nodes(initial=True)
            if not self._hosts:
                raise ClusterError("no Ray node can host a node server: each needs at least one CPU; Ray's nodes: "
                                   + "; ".join(f"{n['NodeID'][:8]} alive={n['Alive']} "
                                               f"CPU={n['Resources'].get('CPU', 0)}" for n in ray.nodes()))
        except BaseException:
            self.close(drain=False)
            raise
        self._watcher = start_thread(self._watch_nodes, name="pipeline-cluster-ray-nodes")

    @property
    def worker_parents(self) -> dict[str, int]:
        """Per node (link name): the pid of the Ray actor that runs its node server (its worker processes are children
        of the node's zygote, a child of that actor)."""
        return dict(self._worker_parents)

    def _candidates(self) -> list[tuple[str, int]]:
        """Ray nodes alive, with a CPU, and without a node server of ours: (node id, CPUs)."""
        taken = sum(1 for _, link in self._hosts.values() if link.alive)
        room = None if self._max_nodes is None else self._max_nodes - taken
        found = []
        for node in self._ray.nodes():
            cpus = int(node.get("Resources", {}).get("CPU", 0))
            if node.get("Alive") and cpus >= 1 and node["NodeID"] not in self._hosts:
                found.append((node["NodeID"], cpus))
        return found if room is None else found[:max(0, room)]

    def _join_new_nodes(self, initial: bool = False) -> None:
        """Start a node server on every Ray node that has none, connect to each, and add it to the cluster."""
        ray = self._ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        host_class = ray.remote(NodeHost)
        started = []
        for node_id, cpus in self._candidates():
            strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
            actor = host_class.options(num_cpus=cpus, scheduling_strategy=strategy, max_restarts=0).remote(
                self._authkey, self._workers or cpus)
            started.append((node_id, actor, actor.where.remote()))
        for node_id, actor, where in started:
            link = None
            try:
                host, port, pid = ray.get(where, timeout=self._connect_timeout)
                link = RemoteLink((host, port), self._authkey, self.root, self.log_sink, self._connect_timeout,
                                  self._heartbeat, self._dead_after, name=f"ray-{node_id[:8]}",
                                  placement=self.placement)
                self._hosts[node_id] = (actor, link)
                self._worker_parents[link.name] = pid
                self._add_link(link) if initial else self._join(link)
            except Exception as exc:
                self._hosts.pop(node_id, None)
                if link is not None:
                    link.close()
                ray.kill(actor)
                if initial:
                    raise ClusterError(f"Ray node {node_id[:8]}: its node server did not start: {exc}") from exc
                if not self._watching.is_set():
                    self._warn(f"Ray node {node_id[:8]} joined, but its node server did not start: {exc}")
                continue
            if not initial:
                self.log_sink(make_record(f"Ray node {node_id[:8]} joined: node {link.name}", logging.INFO,
                                          "pipeline_cluster"))

    def _watch_nodes(self) -> None:
        """Read Ray's node list every POLL_SECONDS: forget nodes whose server is gone, start servers on new nodes."""
        while not self._watching.wait(POLL_SECONDS):
            try:
                for node_id, (actor, link) in list(self._hosts.items()):
                    if not link.alive:  # lost: if Ray brings the node back, it gets a new server
                        del self._hosts[node_id]
                        self._ray.kill(actor)
                self._join_new_nodes()
            except Exception as exc:  # Ray unreachable for a moment, a node that left while joining: next round
                if not self._watching.is_set():
                    self._warn(f"reading Ray's nodes failed: {exc!r}")

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Finish (or stop) the run, stop every node server and its actor; a Ray started here is stopped too."""
        self._watching.set()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=self._connect_timeout)
        try:
            super().close(drain, timeout)
        finally:
            ray, hosts = self._ray, list(self._hosts.values())
            if ray.is_initialized():
                stops = [actor.stop.remote() for actor, _ in hosts]
                if stops:
                    ray.wait(stops, num_returns=len(stops), timeout=STOP_SECONDS)
                for actor, _ in hosts:
                    ray.kill(actor)
                if self._inited_ray:
                    ray.shutdown()
