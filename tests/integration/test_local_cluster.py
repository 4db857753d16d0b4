"""Pipelines on the embedded LocalCluster: stage kinds, exact outputs, laziness, failures, logs, cleanup."""
from __future__ import annotations

import collections
import itertools
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import pipeline_cluster as pc
import pipeline_cluster.actors.policies
import pipeline_cluster.run
from pipeline_cluster import multiprocess_logging as mpl
from tests.helpers import NO_HANG, live_children, live_workers, returns_within, wait_until


def split(x):
    return (x, x + 1000000)


def square(x):
    return x * x


def drop_odd(x):
    return None if x % 2 else x


class Scale:
    """A class stage with constructor args; close() leaves a mark so the test can see it ran."""

    def __init__(self, factor, mark_dir=None):
        self.factor = factor
        self.mark_dir = mark_dir

    def __call__(self, x):
        return x * self.factor

    def close(self):
        if self.mark_dir:
            with open(os.path.join(self.mark_dir, f"closed-{os.getpid()}"), "w") as f:
                f.write("closed")


def words(line):
    yield from line.split()


def fail_on_multiples_of_7(x):
    if x % 7 == 0:
        raise ValueError(f"bad item {x}")
    return x


@pytest.fixture
def cluster(tmp_path):
    with pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run")) as c:
        yield c


@pytest.mark.timeout(60)
def test_function_class_generator_and_drop_stages(cluster, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    pipeline = pc.Pipeline([pc.Stage(split, generator=True),
                            pc.Stage(Scale, args=(3,), kwargs={"mark_dir": str(marks)}),
                            drop_odd])
    outputs = list(cluster.run(pipeline, range(100)))
    expected = [y * 3 for x in range(100) for y in (x, x + 1000000) if (y * 3) % 2 == 0]
    assert sorted(outputs) == sorted(expected)
    # the run is over: each Scale worker ran close() once
    assert len(list(marks.iterdir())) == 2
    stats = cluster.stats()
    assert stats["split"]["items_in"] == 100 and stats["split"]["items_out"] == 200
    assert stats["drop_odd"]["dropped"] == 200 - len(expected)
    assert stats["drop_odd"]["items_out"] == len(expected)


@pytest.mark.timeout(60)
def test_generator_function_with_yield_and_seed_taskchain(cluster):
    taskchain = [{"function": words, "is_generator": True}, {"function": str.upper, "is_generator": False}]
    outputs = list(cluster.run(taskchain, ["a b", "c", "", "d e f"]))
    assert sorted(outputs) == ["A", "B", "C", "D", "E", "F"]


@pytest.mark.timeout(60)
def test_lambdas_and_closures(cluster):
    offset = 5
    pipeline = pc.Pipeline([lambda x: x + offset, pc.Stage(lambda x: [x] * 2, generator=True)])
    assert sorted(cluster.run(pipeline, [1, 2])) == [6, 6, 7, 7]


@pytest.mark.timeout(120)
def test_ten_thousand_inputs_three_stages_exact_multiset(cluster):
    pipeline = pc.Pipeline([pc.Stage(split, generator=True), square, drop_odd])
    outputs = collections.Counter(cluster.run(pipeline, range(10000)))
    expected = collections.Counter(y * y for x in range(10000) for y in (x, x + 1000000) if (y * y) % 2 == 0)
    assert outputs == expected
    assert sum(outputs.values()) == 10000


def endless():
    yield from itertools.count()


@pytest.mark.timeout(60)
def test_endless_input_take_some_then_close_quickly(tmp_path):
    pulled = []

    def counting():
        for x in endless():
            pulled.append(x)
            yield x

    cluster = pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run"), credit=256)
    results = cluster.run([square], counting())
    taken = list(itertools.islice(results, 1000))
    assert len(taken) == 1000
    # inputs are pulled only as fast as the pipeline drains: bounded by capacity, not by the endless source
    assert len(pulled) <= 1000 + cluster.capacity + pc.run.FEED_CHUNK
    with returns_within("closing a run over an endless input"):
        results.close()
        assert list(results) == []  # close() ends the iteration at once, even inside a batch of outputs
        cluster.close()
    assert live_children() == []


@pytest.mark.timeout(60)
def test_leaving_the_loop_early_stops_the_run_at_once(cluster):
    for i, _ in enumerate(cluster.run([slow], range(100))):
        if i == 1:
            break
    # no reference to the results is kept: the run is already stopped, so another can start right away
    assert sorted(cluster.run([square], [1, 2])) == [1, 4]


@pytest.mark.timeout(60)
def test_a_bursty_source_is_not_held_back(cluster):
    # a source that pauses after each burst, like a socket or a queue, here until both of the burst's outputs came
    # out: were the burst's items held back for more input (a chunk to fill), the source would wait in vain
    delivered = [threading.Event() for _ in range(3)]
    held_back = []

    def bursts():
        for burst in range(3):
            yield from (burst, burst + 100)
            if not delivered[burst].wait(NO_HANG / 3):
                held_back.append(burst)

    outputs = []
    for out in cluster.run([square], bursts()):
        outputs.append(out)
        for b in range(3):
            if {b * b, (b + 100) ** 2} <= set(outputs):
                delivered[b].set()
    assert held_back == [], f"bursts {held_back} came out only after the source went on"
    assert sorted(outputs) == sorted(x * x for b in range(3) for x in (b, b + 100))


@pytest.mark.timeout(60)
def test_task_errors_do_not_stop_the_run(cluster):
    pipeline = pc.Pipeline([pc.Stage(fail_on_multiples_of_7, supervision=pc.Supervision(max_attempts=2))])
    outputs = sorted(cluster.run(pipeline, range(100)))
    assert outputs == [x for x in range(100) if x % 7]
    failures = cluster.failures()
    assert sorted(f.item for f in failures) == list(range(0, 100, 7))
    first = failures[0]
    assert first.stage == "fail_on_multiples_of_7" and first.cause == "exception"
    assert first.error_type == "ValueError" and "bad item" in first.message
    assert "Traceback" in first.traceback and first.attempts == 2
    stats = cluster.stats()["fail_on_multiples_of_7"]
    assert stats["failed"] == 15 and stats["retried"] == 15
    assert (cluster.rundir.dead_letter_file).read_text().count("\n") == 15


def returns_int(x):
    return 42


@pytest.mark.timeout(60)
def test_generator_stage_returning_non_iterable_fails_that_item(cluster):
    pipeline = pc.Pipeline([pc.Stage(returns_int, generator=True)])
    assert list(cluster.run(pipeline, [1, 2])) == []
    letters = cluster.failures()
    assert len(letters) == 2
    assert "generator stage 'returns_int'" in letters[0].message and letters[0].error_type == "TypeError"


def not_one_arg(a, b):
    return a


class NoCall:
    def __init__(self):
        pass


class NeedsArg:
    def __init__(self, required):
        pass

    def __call__(self, x):
        return x


@pytest.mark.parametrize("stages, message", [
    ([], "has no stages"),
    ([42], "not a stage"),
    ([pc.Stage(42, name="answer")], "stage 'answer': task 42 is not callable"),
    ([not_one_arg], "stage 'not_one_arg'"),
    ([NoCall], "stage 'NoCall'"),
    ([pc.Stage(NeedsArg)], "stage 'NeedsArg'"),
    ([pc.Stage(square, workers=0)], "stage 'square': workers must be a positive int"),
    ([pc.Stage(square, generator="yes")], "stage 'square': generator must be True or False"),
    ([{"function": square, "supervision": {"max_atempts": 3}}],
     "stage 'square': unknown supervision key(s) ['max_atempts']"),
    ([{"function": square, "supervision": {"on_failure": "explode"}}], "stage 'square': supervision.on_failure"),
    ([{"function": square, "is_generatr": True}], "unknown key(s) ['is_generatr']"),
])
@pytest.mark.timeout(30)
def test_bad_stage_definitions_raise_at_setup_naming_the_stage(cluster, stages, message):
    with pytest.raises((TypeError, ValueError)) as info:
        cluster.setup("bad", 1, stages)
    assert message in str(info.value)


class BrokenInit:
    def __init__(self):
        raise RuntimeError("no model file")

    def __call__(self, x):
        return x


@pytest.mark.timeout(60)
def test_class_whose_init_raises_fails_fast_with_stage_and_traceback(cluster):
    with returns_within("a run whose class stage cannot start"), pytest.raises(pc.StageFailed) as info:
        list(cluster.run([square, BrokenInit], range(10)))
    text = str(info.value)
    assert "stage 'BrokenInit'" in text and "no model file" in text and "Traceback" in text
    # the cluster is still usable afterwards
    assert sorted(cluster.run([square], [2, 3])) == [4, 9]


def logs_things(x):
    mpl.log(f"mpl says {x}")
    logging.getLogger("user.task").warning("stdlib says %s", x)
    return x


@pytest.mark.timeout(60)
def test_task_logs_reach_the_log_file(tmp_path):
    log_file = tmp_path / "cluster.log"
    with pc.LocalCluster(workers=1, run_dir=str(tmp_path / "run"), log_file=str(log_file)) as cluster:
        assert sorted(cluster.run([logs_things], [1, 2])) == [1, 2]
    text = log_file.read_text()
    for x in (1, 2):
        assert f"mpl says {x}" in text and f"stdlib says {x}" in text
    line = next(line for line in text.splitlines() if "mpl says 1" in line)
    assert "node=local" in line and "stage=logs_things" in line and "pid=" in line


@pytest.mark.timeout(60)
def test_step_by_step_interface_with_handler(cluster):
    received = []
    cluster.setup("steps", "1.0", [square])
    cluster.boot(output_handler=received.append)
    cluster.feed(1, 2, 3)
    cluster.feed(*range(4, 101))
    cluster.wait_input()
    cluster.wait_empty()
    assert sorted(received) == [x * x for x in range(1, 101)]
    status = cluster.status()
    assert status["phase"] == "running" and status["unfinished"] == 0 and status["fed"] == 100
    assert status["stages"]["square"]["items_in"] == 100
    cluster.sleep()
    assert cluster.status()["phase"] == "sleeping"
    cluster.wakeup()
    assert cluster.reset() == {"unfinished": 0}
    # setup again after reset works, and outputs go to cluster.outputs without a handler
    cluster.setup("again", 2, [pc.Stage(split, generator=True)])
    cluster.boot()
    cluster.feed(1)
    cluster.wait_empty()
    assert sorted(cluster.outputs) == [1, 1000001]


def slow(x):
    time.sleep(0.5)
    return x


def held(x, gate):
    """A stage that cannot finish: it waits for `gate`, a file the tests never create (60 s at most)."""
    wait_until(lambda: os.path.exists(gate), 60, 0.01)
    return x


@pytest.mark.timeout(60)
def test_reset_stops_at_once_and_reports_unfinished(cluster, tmp_path):
    cluster.setup("held", 1, [pc.Stage(held, args=(str(tmp_path / "never"),))])
    cluster.boot()
    cluster.feed(*range(20))
    with returns_within("reset() of a run whose items cannot finish"):  # it kills the workers, not waits
        report = cluster.reset()
    assert report == {"unfinished": 20}


@pytest.mark.timeout(60)
def test_close_with_an_unread_run_stops_it_at_once(tmp_path):
    cluster = pc.LocalCluster(workers=1, run_dir=str(tmp_path / "run"))
    results = cluster.run([pc.Stage(held, args=(str(tmp_path / "never"),))], range(100))
    with returns_within("close() with an unread run whose items cannot finish"):  # stopped, not drained
        cluster.close()
    with pytest.raises(pc.ClusterError):
        next(results)


@pytest.mark.timeout(60)
def test_no_child_process_after_close(tmp_path):
    cluster = pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run"))
    cluster.setup("x", 1, [square, square])
    cluster.boot()
    assert len(live_workers()) == 4
    cluster.feed(*range(10))
    cluster.close()
    assert wait_until(lambda: live_children() == [], timeout=10)
    stats = cluster.stats()
    assert stats["square"]["items_out"] == 10 and stats["square_2"]["items_out"] == 10


MAIN_SCRIPT = textwrap.dedent("""
    import pipeline_cluster as pc

    def shout(item):          # defined in __main__, no `if __name__ == "__main__"` guard
        return item.upper() + "!"

    class Counter:
        def __init__(self, start):
            self.n = start
        def __call__(self, item):
            self.n += 1
            return item

    with pc.LocalCluster(workers=1, run_dir=RUN_DIR) as cluster:
        print(sorted(cluster.run([shout, pc.Stage(Counter, args=(0,))], ["a", "b"])))
""")


@pytest.mark.timeout(60)
def test_stages_defined_in_main_module(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(f"RUN_DIR = {str(tmp_path / 'run')!r}\n" + MAIN_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['A!', 'B!']"


def explode(x):
    return range(x * 10000, x * 10000 + 2000)


def slowish(x):
    time.sleep(0.0001)
    return x


@pytest.mark.timeout(120)
def test_generator_fan_out_is_held_back_by_the_next_stage(cluster):
    pipeline = pc.Pipeline([pc.Stage(explode, generator=True), slowish])
    count = sum(1 for _ in cluster.run(pipeline, range(40)))
    assert count == 80000
    # without backpressure the first stage expands all 40 inputs into the second stage's queue at once (a peak of
    # 79,000-80,000 measured); with it the queue stops near its high water mark plus the outputs of the batches in
    # flight at the first stage (2 workers x 2 batches x 2 inputs x 2,000) and of those it cut before the throttle
    # message reached it (28,000-40,000 measured)
    most_queued = cluster.stats()["slowish"]["peak_queued"]
    assert pc.actors.policies.HIGH_WATER <= most_queued < 60000, most_queued


@pytest.mark.timeout(60)
def test_sleep_pauses_and_wakeup_resumes(cluster):
    received = []
    cluster.setup("pause", 1, [square])
    cluster.boot(output_handler=received.append)
    cluster.sleep()
    cluster.feed(*range(10))
    with pytest.raises(TimeoutError):
        cluster.wait_empty(timeout=0.5)  # asleep: nothing is started
    assert received == [] and cluster.status()["phase"] == "sleeping"
    cluster.wakeup()
    cluster.wait_empty(timeout=30)
    assert sorted(received) == [x * x for x in range(10)]
