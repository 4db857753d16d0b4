"""Worker start-up through the node's zygote: many workers at once, what a forked worker inherits, no process left
behind when the driver, a node server or the zygote is SIGKILLed, a SIGKILLed worker reported as such, and the
fallback to spawned workers when no zygote serves."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

import pipeline_cluster as pc
from tests.helpers import REPO, is_zygote, live_children, read_line, start_script, wait_until


def pid_of(item: int) -> int:
    return os.getpid()


def _ended(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _zygote_and_workers(parent: int) -> tuple[psutil.Process, list[psutil.Process]]:
    """The one zygote under node process `parent`, and the workers it forked."""
    [zygote] = [proc for proc in psutil.Process(parent).children() if is_zygote(proc)]
    return zygote, zygote.children()


@pytest.mark.timeout(120)
def test_a_stage_of_64_workers_runs_from_one_zygote_and_leaves_nothing(tmp_path):
    cluster = pc.LocalCluster(workers=64, run_dir=str(tmp_path / "run"))
    try:
        cluster.setup([pid_of])
        cluster.boot()  # returns once all 64 are up
        assert cluster.stats()["pid_of"]["workers"] == 64
        zygote, workers = _zygote_and_workers(os.getpid())
        assert len({worker.pid for worker in workers}) == 64
        assert not any(_ended(worker) for worker in workers)
        assert zygote.num_threads() == 1  # it forks: never a thread in it
        cluster.feed(*range(640))
        cluster.wait_empty()
        assert len(cluster.outputs) == 640 and set(cluster.outputs) <= {worker.pid for worker in workers}
    finally:
        cluster.close()
    assert wait_until(lambda: all(_ended(proc) for proc in [zygote, *workers]), 10)
    assert live_children() == []


def signal_dispositions() -> dict[str, str]:
    """This process's caught, ignored and blocked signal masks, from /proc."""
    with open("/proc/self/status") as f:
        return {key: value.strip() for key, value in (line.split(":", 1) for line in f)
                if key in ("SigCgt", "SigIgn", "SigBlk")}


def what_it_inherits(item: int) -> dict:
    """A stage: what the worker sees of its process, for comparison with its node's."""
    return {"pid": os.getpid(), "sid": os.getsid(0), "cwd": os.getcwd(), "tag": os.environ.get("PC_STARTUP_TAG"),
            "random": random.random(), "path": sys.path, "argv0": sys.argv[0], "signals": signal_dispositions()}


@pytest.mark.timeout(60)
def test_a_forked_worker_inherits_the_node_as_it_is_when_the_worker_starts(tmp_path, monkeypatch):
    with pc.LocalCluster(workers=3, run_dir=str(tmp_path / "run")) as cluster:
        assert sorted(cluster.run([pid_of], range(3)))  # the zygote is started here, before the changes below
        monkeypatch.setenv("PC_STARTUP_TAG", "set-later")
        monkeypatch.chdir(tmp_path)
        seen = list(cluster.run([what_it_inherits], range(30)))
    workers = {task["pid"]: task for task in seen}.values()
    assert len(workers) >= 2
    assert all(task["tag"] == "set-later" and task["cwd"] == str(tmp_path) for task in workers)
    assert all(task["sid"] == task["pid"] for task in workers)  # each a session of its own, out of the terminal's
    assert all(task["path"][:len(sys.path)] == sys.path and task["argv0"] == "-c" for task in workers)
    assert len({task["random"] for task in workers}) == len(workers)  # random reseeded in each fork
    fresh = subprocess.run([sys.executable, "-c", "import json, tests.integration.test_worker_startup as t; "
                            "print(json.dumps(t.signal_dispositions()))"], capture_output=True, text=True,
                           check=True, cwd=REPO).stdout
    assert all(task["signals"] == json.loads(fresh) for task in workers)  # as a fresh interpreter's: the zygote
    # left no handler, ignored signal or blocked one behind


DRIVER_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import pipeline_cluster as pc

    def hold(x):
        time.sleep(60)
        return x

    with pc.LocalCluster(workers=4, run_dir=sys.argv[1]) as cluster:
        cluster.setup([hold])
        cluster.boot()
        cluster.feed(*range(8))
        print("BOOTED", flush=True)
        time.sleep(120)
""")


@pytest.mark.timeout(60)
def test_a_sigkilled_driver_leaves_no_zygote_or_worker(tmp_path):
    proc = start_script(tmp_path, DRIVER_SCRIPT)
    try:
        assert read_line(proc, 30) == "BOOTED"
        zygote, workers = _zygote_and_workers(proc.pid)
        assert len(workers) == 4
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    assert wait_until(lambda: all(_ended(p) for p in [zygote, *workers]), 10), \
        [p.pid for p in [zygote, *workers] if not _ended(p)]


@pytest.mark.timeout(60)
def test_a_sigkilled_node_server_leaves_no_zygote_or_worker(nodes):
    server = nodes("127.0.0.41", workers=3)
    with pc.Cluster.connect([server.address], heartbeat=0.2, dead_after=2.0) as cluster:
        assert sorted(cluster.run([abs], [-1, -2, -3])) == [1, 2, 3]
        cluster.setup([pid_of])
        cluster.boot()
        zygote, workers = _zygote_and_workers(server.proc.pid)
        assert len(workers) == 3
        server.proc.send_signal(signal.SIGKILL)
        assert wait_until(lambda: all(_ended(p) for p in [zygote, *workers]), 10), \
            [p.pid for p in [zygote, *workers] if not _ended(p)]


@pytest.mark.timeout(60)
def test_a_killed_zygote_takes_its_workers_and_the_node_starts_another(tmp_path):
    with pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run")) as cluster:
        cluster.setup([pid_of])
        cluster.boot()
        zygote, workers = _zygote_and_workers(os.getpid())
        zygote.send_signal(signal.SIGKILL)
        assert wait_until(lambda: all(_ended(p) for p in [zygote, *workers]), 10)
        cluster.feed(*range(20))  # the stage restarts its workers: from a new zygote
        cluster.wait_empty()
        assert len(cluster.outputs) == 20
        new_zygote, new_workers = _zygote_and_workers(os.getpid())
        assert new_zygote.pid != zygote.pid and set(cluster.outputs) <= {w.pid for w in new_workers}


def sigkilled_by_3(x: int) -> int:
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


@pytest.mark.timeout(60)
def test_a_forked_worker_killed_by_sigkill_is_reported_so(tmp_path):
    stage = pc.Stage(sigkilled_by_3, supervision=pc.Supervision(max_attempts=2, backoff=(0.01, 0.05)))
    with pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run")) as cluster:
        assert sorted(cluster.run([stage], range(10))) == [x for x in range(10) if x != 3]
        [letter] = cluster.failures()
        zygote, _ = _zygote_and_workers(os.getpid())  # the workers came from the zygote
    assert letter.item == 3 and letter.cause == "crash" and letter.signal == "SIGKILL" and letter.attempts == 2
    assert wait_until(lambda: _ended(zygote), 10)


@pytest.mark.timeout(60)
def test_without_a_zygote_workers_are_spawned_as_fresh_interpreters(tmp_path, monkeypatch):
    from pipeline_cluster.worker import zygote

    monkeypatch.setattr(zygote, "LAUNCH", "import sys; sys.exit(3)")  # a zygote that dies before it serves
    with pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run")) as cluster:
        cluster.setup([pid_of])
        cluster.boot()
        workers = [proc for proc in live_children() if not is_zygote(proc)]
        assert len(workers) == 2 and all(proc.ppid() == os.getpid() for proc in workers)  # the node's own children
        cluster.feed(*range(20))
        cluster.wait_empty()
        assert set(cluster.outputs) <= {proc.pid for proc in workers}
        cluster.reset()
        assert sorted(cluster.run([abs], [-1, -2])) == [1, 2]  # later workers too
        assert not [proc for proc in live_children() if is_zygote(proc)]
    assert wait_until(lambda: live_children() == [], 10)
