"""Manners: with default settings the framework changes no CPU affinity, scheduling policy, signal handler or
environment of the caller's threads, of the threads that run the caller's code, or of the worker processes (so task
code, and what it starts, gets exactly what the caller has)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import pipeline_cluster as pc
from tests.helpers import wait_until

EVERYTHING = frozenset(os.sched_getaffinity(0))


def _where_and_how(item: int) -> dict:
    """A stage: what the task sees of its process (CPUs, policy, SIGINT handler, environment)."""
    return {"cpus": frozenset(os.sched_getaffinity(0)), "policy": os.sched_getscheduler(0),
            "sigint": signal.getsignal(signal.SIGINT) is signal.default_int_handler, "env": dict(os.environ)}


@pytest.mark.timeout(60)
def test_a_task_runs_with_the_callers_cpus_policy_signals_and_environment(tmp_path):
    main_cpus = frozenset(os.sched_getaffinity(threading.main_thread().native_id))
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=2) as cluster:
        seen = list(cluster.run([_where_and_how], range(20)))
    assert len(seen) == 20
    assert all(task["cpus"] == main_cpus for task in seen), seen[0]["cpus"]
    assert all(task["policy"] == os.SCHED_OTHER for task in seen)
    assert all(task["sigint"] for task in seen)  # the worker's SIGINT handler is Python's own, untouched
    mine = _child_environment()
    differences = [{k: (mine.get(k), task["env"].get(k)) for k in mine.keys() | task["env"].keys()
                    if mine.get(k) != task["env"].get(k)} for task in seen]
    assert differences == [{}] * 20  # not one variable added or changed


def _child_environment() -> dict[str, str]:
    """The environment any child process of this one gets (what a worker must see, no more, no less)."""
    code = "import json, os; print(json.dumps(dict(os.environ)))"
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True).stdout)


def _hold(item: float) -> float:
    time.sleep(item)
    return item


def _gated(item: str) -> str:
    """A stage: mark that `item` (a path) started, then hold it until the file `item`.gate exists (30 s at most)."""
    open(f"{item}.started", "w").close()
    wait_until(lambda: os.path.exists(f"{item}.gate"), 30, 0.001)
    return item


class _Sampler:
    """Samples a thread's CPUs and scheduling policy from another thread while `_gated` items run: as each item
    starts, it takes `per_item` samples and only then opens the item's gate, so every sample falls in a time when
    the thread waits for that item (in feed(), wait_empty() or the run loop)."""

    def __init__(self, native_id: int, items: list[str], per_item: int) -> None:
        self.native_id = native_id
        self.items = items
        self.per_item = per_item
        self.samples: list[tuple[frozenset[int], int]] = []
        self.gated: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _started(self) -> list[str]:
        return [item for item in self.items if item not in self.gated and os.path.exists(f"{item}.started")]

    def _run(self) -> None:
        while len(self.gated) < len(self.items):
            started = wait_until(self._started, 30, 0.001)
            if not started:
                return  # finish() reports the items never started
            for item in started:
                for _ in range(self.per_item):
                    self.samples.append((frozenset(os.sched_getaffinity(self.native_id)),
                                         os.sched_getscheduler(self.native_id)))
                    time.sleep(0.002)  # spread the samples over the wait
                open(f"{item}.gate", "w").close()
                self.gated.append(item)

    def finish(self) -> list[tuple[frozenset[int], int]]:
        self.thread.join(60)
        assert not self.thread.is_alive() and sorted(self.gated) == sorted(self.items), self.gated
        return self.samples


@pytest.mark.timeout(60)
def test_the_callers_thread_keeps_every_cpu_while_it_waits_in_the_framework(tmp_path):
    me = threading.get_native_id()
    per_item = 5
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=1) as cluster:
        cluster.setup("waits", "1", [_gated])
        cluster.boot()
        items = [str(tmp_path / f"wait-{i}") for i in range(5)]
        sampler = _Sampler(me, items, per_item)
        for item in items:
            cluster.feed(item)
            cluster.wait_empty(timeout=30)  # each wait lasts until the sampler has looked `per_item` times
        waited = sampler.finish()
        cluster.reset()
        items = [str(tmp_path / f"loop-{i}") for i in range(30)]
        sampler = _Sampler(me, items, per_item)
        outputs = []
        for output in cluster.run([_gated], items):  # the loop blocks between outputs
            outputs.append(output)
        looped = sampler.finish()
    assert sorted(outputs) == sorted(items)
    assert (len(waited), len(looped)) == (5 * per_item, 30 * per_item)
    assert {cpus for cpus, _ in waited + looped} == {EVERYTHING}
    assert {policy for _, policy in waited + looped} == {os.SCHED_OTHER}


@pytest.mark.timeout(60)
def test_a_thread_pool_made_after_boot_runs_on_every_cpu(tmp_path):
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=1) as cluster:
        cluster.setup("pool", "1", [_hold])
        cluster.boot()
        cluster.feed(0.0)
        cluster.wait_empty(timeout=30)
        with ThreadPoolExecutor(4) as pool:
            seen = set(pool.map(lambda _: frozenset(os.sched_getaffinity(0)), range(16)))
    assert seen == {EVERYTHING}


@pytest.mark.timeout(60)
def test_the_framework_threads_are_left_where_the_process_is(tmp_path):
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=1) as cluster:
        results = cluster.run([_hold], [0.0] * 100)
        next(iter(results))
        framework = {t.name: (frozenset(os.sched_getaffinity(t.native_id)), os.sched_getscheduler(t.native_id))
                     for t in threading.enumerate() if t.native_id is not None and t is not threading.current_thread()}
        list(results)
    assert any(name.startswith("StageSupervisor") for name in framework), framework
    assert {cpus for cpus, _ in framework.values()} == {EVERYTHING}
    assert {policy for _, policy in framework.values()} == {os.SCHED_OTHER}


NO_NUMPY = """
import sys
import pipeline_cluster as pc

def loaded(x):
    return "numpy" in sys.modules

if __name__ == "__main__":
    with pc.LocalCluster(workers=1, run_dir=sys.argv[1]) as cluster:
        in_workers = set(cluster.run([loaded], range(10)))
    print(in_workers, "numpy" in sys.modules)
"""


@pytest.mark.timeout(60)
def test_numpy_is_never_imported_for_items_that_are_not_arrays(tmp_path):
    pytest.importorskip("numpy", reason="only meaningful where numpy is installed and could be imported")
    script = tmp_path / "no_numpy.py"
    script.write_text(NO_NUMPY)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=50)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["{False}", "False"]  # neither in the workers nor in the driver
