"""RayCluster on Ray's own multi-node test cluster (`ray.cluster_utils.Cluster`), every node on 127.0.0.1: exactly
once over the nodes, a node killed mid-run, a node added mid-run, nothing of ours left after close()."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's nodes use 127.0.0.1, not the host's address
ray = pytest.importorskip("ray", reason='Ray is not installed (pip install ".[ray]")')

import pipeline_cluster as pc  # noqa: E402
from pipeline_cluster.raycluster import RayCluster  # noqa: E402
from tests.helpers import REPO, wait_until  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


def tagged(x: int) -> tuple[int, int, int]:
    """The input, with the worker's pid and its node's (the node server's Ray actor, its zygote's parent)."""
    return x, os.getpid(), psutil.Process(os.getppid()).ppid()


def slow_tagged(x: int) -> tuple[int, int, int]:
    time.sleep(0.002)
    return tagged(x)


@pytest.fixture
def ray_nodes(monkeypatch):
    """A Ray cluster of `ray_nodes(n)` nodes with one CPU each on this machine; shut down after the test."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("PYTHONPATH", str(REPO))  # Ray's workers import this module's stage functions
    made: list[Cluster] = []

    def make(count: int) -> Cluster:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(count - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.shutdown()


def _gone(pids: set[int]) -> bool:
    return not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


def test_a_pipeline_runs_exactly_once_over_ray_nodes_and_close_leaves_nothing(ray_nodes):
    nodes = ray_nodes(2)
    with RayCluster(nodes.address) as cluster:
        assert len(cluster.worker_parents) == 2
        outputs = list(cluster.run([tagged], range(20_000), run_id="on-ray"))  # a durable run, as anywhere
        assert sorted(x for x, _, _ in outputs) == list(range(20_000))
        assert {parent for _, _, parent in outputs} == set(cluster.worker_parents.values())  # both nodes worked
        assert list(cluster.run([tagged], range(20_000), run_id="on-ray", resume=True)) == []  # finished before
        workers = {pid for _, pid, _ in outputs}
    assert wait_until(lambda: _gone(workers), timeout=15), "worker processes outlived close()"


def test_nodes_limits_how_many_ray_nodes_get_a_node_server(ray_nodes):
    nodes = ray_nodes(2)
    with RayCluster(nodes.address, nodes=1, workers=2) as cluster:
        assert len(cluster.worker_parents) == 1
        outputs = list(cluster.run([tagged], range(1_000)))
        assert sorted(x for x, _, _ in outputs) == list(range(1_000))
        assert len({pid for _, pid, _ in outputs}) <= 2 and cluster.stats()["tagged"]["workers"] == 2
    with pytest.raises(ValueError, match="nodes must be a positive int"):
        RayCluster(nodes.address, nodes=0)


def test_a_killed_ray_node_loses_no_item(ray_nodes):
    nodes = ray_nodes(3)
    victim = next(iter(nodes.worker_nodes))
    with RayCluster(nodes.address, dead_after=3.0) as cluster:
        outputs = []
        for output in cluster.run([slow_tagged], range(3_000)):
            outputs.append(output)
            if len(outputs) == 300:
                nodes.remove_node(victim, allow_graceful=False)  # raylet, object store and our actor: all gone
        assert sorted(x for x, _, _ in outputs) == list(range(3_000))  # every output exactly once
        assert [node["state"] for node in cluster.nodes()].count("lost") == 1


def test_a_ray_node_added_mid_run_gets_work(ray_nodes):
    nodes = ray_nodes(1)
    with RayCluster(nodes.address, credit=64) as cluster:  # items not handed out yet can go to a node that joins
        first = set(cluster.worker_parents.values())
        outputs = []
        for output in cluster.run([slow_tagged], range(4_000)):
            outputs.append(output)
            if len(outputs) == 200:
                nodes.add_node(num_cpus=1)
        assert sorted(x for x, _, _ in outputs) == list(range(4_000))
        joined = set(cluster.worker_parents.values()) - first
        assert len(joined) == 1, cluster.worker_parents
        assert joined & {parent for _, _, parent in outputs}, "the node that joined got no work"


def test_a_ray_cluster_with_no_cpu_for_a_node_server_is_refused(ray_nodes, monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    cpuless = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        with pytest.raises(pc.ClusterError, match="no Ray node can host a node server"):
            RayCluster(cpuless.address)
    finally:
        cpuless.shutdown()


def test_the_local_example_runs_on_a_ray_it_starts_itself():
    done = subprocess.run([sys.executable, str(REPO / "examples" / "ray_local.py")], capture_output=True, text=True,
                          timeout=150, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "9000 words on 1 Ray node(s)"
