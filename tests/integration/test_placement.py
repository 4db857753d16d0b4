"""Placement, the opt-in (`placement=True`): the framework's threads share one home CPU, a caller waiting in the
framework sits there for the wait only, a lone short batch runs there; user code, its threads and worker processes
keep the CPUs the main thread may use. The defaults, which change nothing, are tested in test_manners."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import pipeline_cluster as pc
from tests.helpers import wait_until

EVERYTHING = frozenset(os.sched_getaffinity(0))

pytestmark = pytest.mark.skipif(len(EVERYTHING) < 2, reason="placement needs Linux and more than one CPU")


def _worker_pids() -> list[int]:
    """Children of any thread of this process (each thread's children are listed under its own task)."""
    pids = []
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
            pids += [int(pid) for pid in f.read().split()]
    return pids


def placement_during_a_run(cluster: pc.Cluster) -> tuple[dict[str, set[int]], list[set[int]], set[int]]:
    """CPU sets of this process's threads (by name), of the worker processes, and of a thread that the input
    iterable started, all seen in the middle of a run."""
    threads, workers, probe = placement_and_policy_during_a_run(cluster)
    return ({name: cpus for name, (cpus, _) in threads.items()}, [cpus for cpus, _ in workers], probe[0])


def placement_and_policy_during_a_run(cluster: pc.Cluster) -> tuple[dict[str, tuple[set[int], int]],
                                                                      list[tuple[set[int], int]], tuple[set[int], int]]:
    """(CPU set, scheduling policy) of this process's threads (by name), of the worker processes, and of a thread
    that the input iterable started, all seen in the middle of a run."""
    seen: dict[str, tuple[set[int], int]] = {}

    def where(task: int) -> tuple[set[int], int]:
        return os.sched_getaffinity(task), os.sched_getscheduler(task)

    def inputs() -> Iterator[int]:
        probe = threading.Thread(target=lambda: seen.update(probe=where(0)))
        probe.start()
        probe.join()
        yield from range(50_000)

    results = cluster.run([lambda x: x], inputs())
    next(iter(results))
    threads = {t.name: where(t.native_id) for t in threading.enumerate() if t.native_id is not None}
    workers = [where(pid) for pid in _worker_pids()]
    for _ in results:
        pass
    return threads, workers, seen["probe"]


def _framework(threads: dict[str, Any]) -> dict[str, Any]:
    """The threads the framework starts for its own code (the feeder runs the user's iterable)."""
    return {name: value for name, value in threads.items()
            if name.startswith(("pipeline-cluster", "StageSupervisor", "WorkerActor", "RootActor", "NodeActor"))
            and name != "pipeline-cluster-feeder"}


@pytest.mark.timeout(60)
def test_framework_threads_share_one_cpu_and_user_code_keeps_all(tmp_path):
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), placement=True) as cluster:
        threads, workers, probe = placement_during_a_run(cluster)
    everything = EVERYTHING
    framework = _framework(threads)
    assert any(name.startswith("StageSupervisor") for name in framework), threads
    homes = set().union(*framework.values())
    assert len(homes) == 1 and all(len(cpus) == 1 for cpus in framework.values()), framework
    assert threads["MainThread"] == everything  # the user's thread is left alone
    assert probe == everything  # a thread that the user's input iterable starts keeps every CPU
    # a worker runs on every CPU, or on the home CPU while it is the node's only busy one (see the tests below)
    assert workers and all(cpus in (everything, homes) for cpus in workers), workers


def _cpus_of_task(item: float) -> tuple[float, set[int]]:
    """A stage: nap for `item` seconds, then tell on which CPUs this worker may run."""
    time.sleep(item)
    return item, os.sched_getaffinity(0)


@pytest.mark.timeout(60)
def test_a_lone_short_item_runs_beside_the_framework_and_parallel_work_on_every_cpu(tmp_path):
    outputs: list[tuple[float, set[int]]] = []
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), placement=True, workers=2) as cluster:
        cluster.setup("where", "1", [_cpus_of_task])
        cluster.boot(output_handler=outputs.append)
        cluster.feed(*[0.02] * 20)  # two busy workers, and 20 ms batches: each may use every CPU
        cluster.wait_empty(timeout=30)
        for _ in range(20):  # one quick item at a time: once the stage has measured them quick, on the home CPU
            cluster.feed(0.0)
            cluster.wait_empty(timeout=30)
        home = {cpus for name, cpus in _thread_cpus().items() if name.startswith("StageSupervisor")}
    assert len(home) == 1 and len(next(iter(home))) == 1, home
    parallel, lone = [cpus for _, cpus in outputs[:20]], [cpus for _, cpus in outputs[20:]]
    assert len(parallel) == 20 and EVERYTHING in parallel, parallel
    assert all(cpus in (EVERYTHING, next(iter(home))) for cpus in parallel), parallel
    assert lone[-5:] == [next(iter(home))] * 5, lone  # 20 ms measured per item takes a few batches to forget


def _delivery_thread(cluster: pc.Cluster) -> threading.Thread:
    """This cluster's output thread (not a namesake of an earlier test's cluster that is still winding down)."""
    return next(t for t in cluster._threads if t.name == "pipeline-cluster-output")


def _thread_cpus() -> dict[str, set[int]]:
    return {t.name: frozenset(os.sched_getaffinity(t.native_id)) for t in threading.enumerate()
            if t.native_id is not None}


@pytest.mark.timeout(60)
def test_workers_follow_a_restriction_made_after_import(tmp_path):
    restricted = {max(EVERYTHING)}
    os.sched_setaffinity(0, restricted)  # the main thread: the user's own restriction, made after the import
    try:
        with pc.LocalCluster(run_dir=str(tmp_path / "run"), placement=True) as cluster:
            _, workers, _ = placement_during_a_run(cluster)
    finally:
        os.sched_setaffinity(0, EVERYTHING)
    assert workers and all(cpus == restricted for cpus in workers), workers


@pytest.mark.timeout(60)
def test_a_thread_started_by_the_output_handler_keeps_every_cpu(tmp_path):
    seen: list[set[int]] = []
    done = threading.Event()

    def handler(output: int) -> None:
        probe = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
        probe.start()
        probe.join()
        done.set()

    with pc.LocalCluster(run_dir=str(tmp_path / "run"), placement=True) as cluster:
        cluster.setup("probe", "1", [lambda x: x])
        cluster.boot(output_handler=handler)
        cluster.feed(1)
        assert done.wait(30)
    assert seen == [EVERYTHING]


@pytest.mark.timeout(60)
def test_a_run_loop_hands_every_output_over_on_the_callers_own_cpus(tmp_path):
    everything = EVERYTHING
    seen: list[set[int]] = []
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), placement=True) as cluster:
        for output in cluster.run([lambda x: x], range(20_000)):  # the loop waits for outputs between batches
            seen.append(os.sched_getaffinity(0))
            if output == 15_000:
                break
        after = os.sched_getaffinity(0)
    assert len(seen) > 1000 and all(cpus == everything for cpus in seen)
    assert after == everything


def _pass_once_exists(item: int, path: str) -> int:
    """A stage: hold the item until `path` exists (30 s at most)."""
    wait_until(lambda: os.path.exists(path), 30, 0.005)
    return item


@pytest.mark.timeout(60)
def test_a_thread_waiting_in_the_framework_sits_on_the_home_cpu_only_while_it_waits(tmp_path):
    everything = EVERYTHING
    gate = tmp_path / "gate"
    in_handler: list[set[int]] = []
    seen: dict[str, set[int]] = {}
    main = threading.get_native_id()

    def watch(delivery: int) -> None:  # while the caller waits: where it and the idle delivery thread may run
        wait_until(lambda: os.sched_getaffinity(main) != everything, 20, 0.001)
        seen.update(caller=os.sched_getaffinity(main), delivery=os.sched_getaffinity(delivery))
        gate.touch()

    with pc.LocalCluster(run_dir=str(tmp_path / "run"), placement=True, workers=1) as cluster:
        cluster.setup("gated", "1", [pc.Stage(_pass_once_exists, args=(str(gate),))])
        cluster.boot(output_handler=lambda output: in_handler.append(os.sched_getaffinity(0)))
        home = {cpus for name, cpus in _thread_cpus().items() if name.startswith("StageSupervisor")}
        delivery = _delivery_thread(cluster).native_id
        watcher = threading.Thread(target=watch, args=(delivery,))
        cluster.feed(1)
        with pytest.raises(TimeoutError):
            cluster.wait_empty(timeout=0.05)
        assert os.sched_getaffinity(0) == everything  # a wait that ends in an error gives them back too
        watcher.start()
        cluster.wait_empty(timeout=30)
        after = os.sched_getaffinity(0)
        watcher.join(30)
    assert len(home) == 1 and seen["caller"] in home and seen["delivery"] in home, (home, seen)
    assert after == everything  # given back as soon as the wait ended
    assert in_handler == [everything]  # the handler runs on the user's CPUs, not on the home one


class _CrashOnceThenCpus:
    """A class stage: the first worker to run an item dies; the one started in its place tells on which CPUs it
    was started (the CPUs a worker is given at start; a short batch may then move it to the home CPU)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.started_on = os.sched_getaffinity(0)

    def __call__(self, item: int) -> set[int]:
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return self.started_on


@pytest.mark.timeout(60)
def test_a_worker_started_while_the_caller_waits_in_the_framework_gets_every_cpu(tmp_path):
    outputs: list[set[int]] = []
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), placement=True, workers=1) as cluster:
        cluster.setup("respawn", "1", [pc.Stage(_CrashOnceThenCpus, args=(str(tmp_path / "crashed"),))])
        cluster.boot(output_handler=outputs.append)
        cluster.feed(1)
        cluster.wait_empty(timeout=30)  # the worker dies and its replacement starts during this wait
        restarts = cluster.stats()["_CrashOnceThenCpus"]["restarts"]
    assert restarts == 1 and outputs == [EVERYTHING], (restarts, outputs)


@pytest.mark.timeout(60)
def test_framework_threads_are_batch_tasks_but_worker_actors_workers_and_user_threads_are_not(tmp_path):
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), placement=True) as cluster:
        threads, workers, probe = placement_and_policy_during_a_run(cluster)
    framework = _framework(threads)
    worker_actors = {name: policy for name, (_, policy) in framework.items() if name.startswith("WorkerActor")}
    assert worker_actors and set(worker_actors.values()) == {os.SCHED_OTHER}, worker_actors
    others = {name: policy for name, (_, policy) in framework.items()
              if name.startswith(("StageSupervisor", "NodeActor", "RootActor"))}
    assert others and set(others.values()) == {os.SCHED_BATCH}, others
    assert workers and {policy for _, policy in workers} == {os.SCHED_OTHER}  # they run the user's code
    assert threads["MainThread"][1] == os.SCHED_OTHER and probe[1] == os.SCHED_OTHER
