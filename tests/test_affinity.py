"""Thread placement: the framework's threads share one home CPU; user threads and worker processes keep every CPU."""
from __future__ import annotations

import os
import threading

import pytest

import pipeline_cluster as pc
from pipeline_cluster import affinity

pytestmark = pytest.mark.skipif(not affinity.supported(), reason="placement needs Linux and more than one CPU")


def cpus_of_thread(native_id: int) -> set[int]:
    return os.sched_getaffinity(native_id)


def placement_during_a_run(cluster: pc.Cluster) -> tuple[dict[str, set[int]], list[set[int]]]:
    """CPU sets of this process's threads (by name) and of the worker processes, seen in the middle of a run."""
    results = cluster.run([lambda x: x], range(50_000))
    next(iter(results))
    threads = {t.name: cpus_of_thread(t.native_id) for t in threading.enumerate() if t.native_id is not None}
    workers = [os.sched_getaffinity(pid) for pid in _worker_pids()]
    for _ in results:
        pass
    return threads, workers


def _worker_pids() -> list[int]:
    """Children of any thread of this process (each thread's children are listed under its own task)."""
    pids = []
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
            pids += [int(pid) for pid in f.read().split()]
    return pids


@pytest.mark.timeout(60)
def test_framework_threads_share_one_cpu_and_workers_keep_all(monkeypatch, tmp_path):
    monkeypatch.delenv(affinity.ENV_SWITCH, raising=False)
    with pc.LocalCluster(run_dir=str(tmp_path / "run")) as cluster:
        threads, workers = placement_during_a_run(cluster)
    framework = {name: cpus for name, cpus in threads.items()
                 if name.startswith(("pipeline-cluster", "StageSupervisor", "WorkerActor", "RootActor", "NodeActor"))}
    assert any(name.startswith("StageSupervisor") for name in framework), threads
    assert any(name == "pipeline-cluster-feeder" for name in framework), threads
    homes = set().union(*framework.values())
    assert len(homes) == 1 and all(len(cpus) == 1 for cpus in framework.values()), framework
    assert threads["MainThread"] == set(affinity.ALLOWED)  # the user's thread is left alone
    assert workers and all(cpus == set(affinity.ALLOWED) for cpus in workers), workers


@pytest.mark.timeout(60)
def test_placement_can_be_switched_off(monkeypatch, tmp_path):
    monkeypatch.setenv(affinity.ENV_SWITCH, "0")
    with pc.LocalCluster(run_dir=str(tmp_path / "run")) as cluster:
        threads, workers = placement_during_a_run(cluster)
    stages = [cpus for name, cpus in threads.items() if name.startswith("StageSupervisor")]
    assert stages and all(cpus == set(affinity.ALLOWED) for cpus in stages), threads
    assert workers and all(cpus == set(affinity.ALLOWED) for cpus in workers)
