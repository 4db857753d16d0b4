"""Faults found by an audit, each produced for real: an input iterable that raises, an output handler that raises,
a full disk under the run directory."""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator

import psutil
import pytest

import pipeline_cluster as pc
from tests.helpers import wait_until


def _fail_on_7(x: int) -> int:
    if x % 100 == 7:
        raise ValueError(f"bad {x}")
    return x


def _lines_then_error(count: int) -> Iterator[int]:
    yield from range(count)
    raise OSError("the input file went away")


@pytest.mark.timeout(60)
def test_an_input_iterable_that_raises_loses_nothing_it_gave(tmp_path):
    outputs: list[int] = []
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=2) as cluster:
        with pytest.raises(pc.InputFailed) as raised:
            for output in cluster.run([pc.Stage(_fail_on_7, supervision={"max_attempts": 1})],
                                      _lines_then_error(500)):
                outputs.append(output)
        failures = cluster.failures()
    error = raised.value
    assert error.read == 500 and isinstance(error.__cause__, OSError), error
    assert "after 500 item(s)" in str(error) and "the input file went away" in str(error)
    # every item read ended delivered or dead-lettered, and the error came only after all of them
    assert sorted(outputs + [letter.item for letter in failures]) == list(range(500))
    assert sorted(letter.item for letter in failures) == [x for x in range(500) if x % 100 == 7]


@pytest.mark.timeout(60)
def test_an_output_handler_that_raises_ends_the_run_and_the_cluster_goes_on(tmp_path):
    def handler(output: int) -> None:
        if output == 50:
            raise RuntimeError("handler broke")

    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=2) as cluster:
        cluster.setup("handler", "1", [lambda x: x])
        cluster.boot(handler)
        with pytest.raises(RuntimeError, match="handler broke"):
            cluster.feed(*range(100))
            cluster.wait_empty(timeout=30)
        assert wait_until(lambda: cluster.status()["phase"] == "idle", 30), cluster.status()
        with pytest.raises(pc.ClusterError, match="last run ended with RuntimeError"):
            cluster.feed(1)  # not the same error again and again: the run is over, and says how it ended
        assert sorted(cluster.run([lambda x: x * 10], range(5))) == [0, 10, 20, 30, 40]  # usable again
        cluster.setup("again", "2", [lambda x: x + 1])
        got: list[int] = []
        cluster.boot(got.append)
        cluster.feed(1, 2)
        cluster.wait_empty(timeout=30)
        assert sorted(got) == [2, 3]


def _good_or_loud_failure(x: int) -> int:
    if x % 2:
        logging.getLogger("task").warning("item %d fails: %s", x, "x" * 200)
        raise ValueError(f"odd item {x}: " + "y" * 500)
    return x


@pytest.mark.timeout(120)
def test_a_full_disk_under_the_run_directory_loses_no_output(full_disk, capfd):
    with pc.LocalCluster(run_dir=os.path.join(full_disk, "run"), workers=2) as cluster:
        outputs = list(cluster.run([pc.Stage(_good_or_loud_failure, supervision={"max_attempts": 1})],
                                   range(10_000)))
        failures = cluster.failures()
        status = cluster.status()
    assert sorted(outputs) == list(range(0, 10_000, 2))  # every good output arrived
    assert status["failures"] == 5_000 and len(failures) == 5_000  # kept in memory when the disk refused them
    err = capfd.readouterr().err
    for name in ("log.txt", "dead_letters.jsonl"):
        path = os.path.join(full_disk, "run", name)
        assert err.count(f"cannot write {path}: [Errno 28] No space left on device") == 1, err[-3000:]
        assert re.search(rf"\d+ record\(s\) could not be written to {re.escape(path)}", err), err[-3000:]
    with open(os.path.join(full_disk, "run", "dead_letters.jsonl")) as f:
        assert all(line.endswith("\n") for line in f)  # no line cut in half


def _noisy_failure(x: int) -> None:
    log = logging.getLogger("task")
    for line in range(10):
        log.info("item %d, line %d: %s", x, line, "z" * 100)
    raise ValueError(f"item {x} fails")


@pytest.mark.timeout(180)
def test_memory_stays_flat_with_many_dead_letters_and_log_lines(tmp_path):
    """Dead letters live on disk and the log's backlog is bounded: 20,000 failures and 200,000 log lines cost the
    driver no more memory than a few hundred do."""
    stage = pc.Stage(_noisy_failure, supervision={"max_attempts": 1})
    me = psutil.Process()
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=2) as cluster:
        assert list(cluster.run([stage], range(500))) == []
        small = me.memory_info().rss
        assert list(cluster.run([stage], range(20_000))) == []
        big = me.memory_info().rss
        failures = cluster.failures()
        run_dir = cluster.rundir.path
    assert len(failures) == 20_000 and {letter.cause for letter in failures} == {"exception"}
    assert big - small < 40 * 2**20, (small >> 20, big >> 20)
    lines = (run_dir / "log.txt").read_text().count("] item ")
    assert lines == 200_000 or "log record(s) were dropped" in (run_dir / "log.txt").read_text()


@pytest.fixture
def pids_cgroup(tmp_path) -> Iterator[str]:
    """A cgroup (v1 pids controller) whose pids.max the test sets: a process in it cannot start threads beyond it."""
    root = "/sys/fs/cgroup/pids"
    if os.geteuid() != 0 or not os.path.isdir(root):
        pytest.fail("this test needs root and the cgroup v1 pids controller at /sys/fs/cgroup/pids")
    path = os.path.join(root, f"pctest-{os.getpid()}")
    os.mkdir(path)
    try:
        yield path
    finally:
        wait_until(lambda: not open(os.path.join(path, "cgroup.procs")).read().strip(), 10)
        os.rmdir(path)


def _tasks(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.mark.timeout(120)
def test_a_node_that_cannot_start_threads_refuses_roots_and_recovers(pids_cgroup, nodes):
    node = nodes("127.0.0.21", workers=1)
    with open(os.path.join(pids_cgroup, "cgroup.procs"), "w") as f:
        f.write(str(node.proc.pid))
    with open(os.path.join(pids_cgroup, "pids.max"), "w") as f:
        f.write(str(_tasks(node.proc.pid)))  # not one thread more
    with pytest.raises(pc.ClusterError):
        pc.Cluster.connect([node.address], connect_timeout=5)
    assert node.proc.poll() is None  # still serving
    log = node.log.read_text()
    assert "can't start new thread" in log or "Resource temporarily unavailable" in log, log[-2000:]
    with open(os.path.join(pids_cgroup, "pids.max"), "w") as f:
        f.write("max")
    with pc.Cluster.connect([node.address]) as cluster:  # the same server takes roots again
        assert sorted(cluster.run([abs], [-1, -2])) == [1, 2]
