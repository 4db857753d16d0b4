"""The verdict on a real run: a deliberately slow middle stage is named; so are a slow input and a slow consumer.
The figures behind it (outputs per second, busy share, queue) are in stats() and in the CLI table."""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Iterator

import pytest

import pipeline_cluster as pc
from pipeline_cluster.stats import format_table


def fast(x: int) -> int:
    return x


def slow(x: int) -> int:
    time.sleep(0.004)
    return x


@pytest.mark.timeout(60)
def test_a_slow_middle_stage_is_named(tmp_path):
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=2) as cluster:
        for count, _ in enumerate(cluster.run([fast, slow, fast], range(2000)), 1):
            if count == 1000:
                said, stats = cluster.verdict(), cluster.stats()
    assert said.startswith("stage slow limits throughput: 2 worker(s) busy"), said
    assert "give slow more workers" in said
    assert stats["slow"]["busy"] > 0.75 > stats["fast"]["busy"]
    assert stats["slow"]["queued"] > 0 and stats["slow"]["out_per_s"] > 0
    table = format_table(stats)
    assert "out/s" in table and "now/s" in table and "busy" in table and "queued" in table


def _slow_source(count: int) -> Iterator[int]:
    for x in range(count):
        time.sleep(0.003)
        yield x


@pytest.mark.timeout(60)
def test_a_slow_input_and_a_slow_consumer_are_named(tmp_path):
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=2) as cluster:
        for count, _ in enumerate(cluster.run([fast, fast], _slow_source(300)), 1):
            if count == 250:
                assert cluster.verdict().startswith("the input limits throughput"), cluster.verdict()
    with pc.LocalCluster(run_dir=str(tmp_path / "run2"), workers=2, credit=64) as cluster:
        for count, _ in enumerate(cluster.run([fast, fast], range(1500)), 1):
            time.sleep(0.002)  # the caller's loop is the slow part
            if count == 1000:
                assert cluster.verdict().startswith("the consumer limits throughput"), cluster.verdict()


@pytest.mark.timeout(60)
def test_tiny_items_fed_as_fast_as_they_come_name_the_root(tmp_path):
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=1) as cluster:
        results = cluster.run([fast, fast], range(4_000_000))
        said: list[str] = []
        done = threading.Event()

        def sample() -> None:  # the verdict as another thread sees it while the caller drains the outputs
            while not done.wait(0.5):
                said.append(cluster.verdict())

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            collections.deque(results, maxlen=0)  # the caller's loop at C speed: it is not the limit
        finally:
            done.set()
            sampler.join()
    assert any(line.startswith("the root limits throughput: the driver process is busy") for line in said), said


def tagged_slow(x: int) -> tuple[int, int]:
    time.sleep(0.002)
    return x, os.getpid()


@pytest.mark.timeout(90)
def test_resize_while_streaming_keeps_every_output_exactly_once(tmp_path):
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=1) as cluster:
        outputs, pids = [], set()
        for count, (x, pid) in enumerate(cluster.run([fast, tagged_slow], range(3000)), 1):
            outputs.append(x)
            pids.add(pid)
            if count == 500:
                cluster.resize("tagged_slow", 3)
            elif count == 1500:
                grown = cluster.stats()["tagged_slow"]["workers"]
                pids_grown = len(pids)
                cluster.resize("tagged_slow", 1)
            elif count == 2800:
                shrunk = cluster.stats()["tagged_slow"]["workers"]
        with pytest.raises(pc.ClusterError, match="no pipeline is running"):
            cluster.resize("tagged_slow", 2)
    assert collections.Counter(outputs) == collections.Counter(range(3000))  # none lost, none twice
    assert grown == 3 and pids_grown >= 3 and shrunk == 1


def test_resize_refuses_an_unknown_stage_or_a_bad_count(tmp_path):
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=1) as cluster:
        cluster.setup("r", "1", [fast])
        cluster.boot()
        with pytest.raises(ValueError, match="no stage 'nope'"):
            cluster.resize("nope", 2)
        with pytest.raises(ValueError, match="positive int"):
            cluster.resize("fast", 0)


def light(x: int) -> int:
    time.sleep(0.001)
    return x


def heavy(x: int) -> int:
    time.sleep(0.005)
    return x


@pytest.mark.timeout(90)
def test_auto_workers_move_to_the_slow_stage(tmp_path):
    stages = [pc.Stage(light, workers="auto"), pc.Stage(heavy, workers=(1, 3))]
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=4) as cluster:
        outputs = list(cluster.run(stages, range(3000)))
        stats = cluster.stats()
        log = cluster.rundir.log_file.read_text()
    assert sorted(outputs) == list(range(3000))
    assert stats["heavy"]["workers"] == 3 and stats["light"]["workers"] == 1  # from 2 and 2
    assert "stage heavy: 3 worker(s) (busy" in log and "takes a worker" in log and "gives a worker up" in log


def warn_on_7(x: int) -> int:
    if x == 7:
        logging.getLogger("task").warning("item seven looks odd")
    return x


@pytest.mark.timeout(60)
def test_progress_bar_counts_the_inputs_completed_and_log_lines_print_above_it(tmp_path, capfd):
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=2) as cluster:
        assert len(list(cluster.run([warn_on_7], list(range(500)), progress=True))) == 500
        assert len(list(cluster.run([fast], iter(range(300)), progress=True))) == 300  # no length: a count
    err = capfd.readouterr().err
    assert "500/500" in err and "300" in err
    assert "item seven looks odd" in err
    line = next(line for line in err.replace("\r", "\n").splitlines() if "item seven looks odd" in line)
    assert line.index("WARNING") < line.index("item seven")  # a whole log line, not cut by the bar


def _gated(x: int) -> int:
    """Items from 20 on wait until the file the test names in GATE_FILE exists (at most a minute)."""
    deadline = time.monotonic() + 60
    while x >= 20 and not os.path.exists(os.environ["GATE_FILE"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x


@pytest.mark.timeout(60)
def test_a_stalled_stage_shows_a_recent_rate_of_zero(tmp_path, monkeypatch):
    gate = tmp_path / "gate"
    monkeypatch.setenv("GATE_FILE", str(gate))  # inherited by the workers, which start after this
    outputs: list[int] = []
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=2) as cluster:
        cluster.setup("stall", "1", [_gated])
        cluster.boot(output_handler=outputs.append)
        for item in range(40):
            cluster.feed(item)
        deadline = time.monotonic() + 30
        while True:  # some come out (those in batches without a gated item), then nothing: the recent rate falls
            figures = cluster.stats()["_gated"]  # to 0, the since-start one does not
            if figures["items_out"] > 0 and figures["out_per_s_recent"] == 0:
                break
            assert time.monotonic() < deadline, figures
            time.sleep(0.2)
        assert figures["out_per_s"] > 0 and figures["in_per_s_recent"] == 0
        gate.touch()
        cluster.wait_empty(30)
        assert cluster.stats()["_gated"]["items_out"] == 40
    assert sorted(outputs) == list(range(40))
