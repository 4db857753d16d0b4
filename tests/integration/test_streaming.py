"""Generator stages that yield many outputs per input stream them on in parts: bounded memory, backpressure, and
what a failure after some outputs went on means (the item is dead-lettered, never run twice)."""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import pipeline_cluster as pc
from tests.helpers import REPO, returns_within, wait_until

ONCE = pc.Supervision(max_attempts=3, backoff=(0.01, 0.05))

PEAK_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import pipeline_cluster as pc

    def burst(n):
        return range(n)

    def halve(x):
        return x // 2

    if __name__ == "__main__":
        per_input = int(sys.argv[1])
        with pc.LocalCluster(workers=1, run_dir=sys.argv[2]) as cluster:
            count = total = 0
            for out in cluster.run([pc.Stage(burst, generator=True), halve], [per_input]):
                count += 1
                total += out
        driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        print(json.dumps({"count": count, "total": total, "driver_kb": driver, "worker_kb": workers}))
""")


def _peak_rss(tmp_path, per_input: int) -> dict:
    script = tmp_path / "peak.py"
    script.write_text(PEAK_RSS_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(per_input), str(tmp_path / f"run{per_input}")],
                          capture_output=True, text=True, timeout=240, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.timeout(300)
def test_ten_million_outputs_per_input_in_bounded_memory(tmp_path):
    small = _peak_rss(tmp_path, 100_000)
    big = _peak_rss(tmp_path, 10_000_000)
    n = 10_000_000
    assert big["count"] == n and big["total"] == (n // 2) * (n // 2 - 1)  # the sum of x // 2 over range(n)
    # held whole, 10 million ints take some 400 MB in the worker and again in the driver
    assert big["worker_kb"] < small["worker_kb"] + 40_000, (small, big)
    assert big["driver_kb"] < small["driver_kb"] + 60_000, (small, big)


def fan_out(n):
    for i in range(n):
        yield (n, i)


def slow_identity(pair):
    if pair[1] % 1000 == 0:
        time.sleep(0.001)
    return pair


@pytest.mark.timeout(120)
def test_streamed_outputs_pass_a_slower_stage_exactly_once(tmp_path):
    inputs = [3, 5000, 200_000, 0, 70_000]
    with pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run")) as cluster:
        seen = collections.Counter(cluster.run([pc.Stage(fan_out, generator=True), slow_identity], inputs))
        stats = cluster.stats()
    assert len(seen) == sum(inputs) and set(seen.values()) == {1}
    assert seen.keys() == {(n, i) for n in inputs for i in range(n)}
    assert stats["fan_out"]["items_out"] == sum(inputs)
    assert cluster.failures() == []


def breaks_after(n):
    yield from range(n)
    if n > 4000:
        raise ValueError(f"broke after {n}")


@pytest.mark.timeout(120)
def test_a_streaming_item_that_raises_is_dead_lettered_not_retried(tmp_path):
    with pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run")) as cluster:
        outputs = list(cluster.run([pc.Stage(breaks_after, generator=True, supervision=ONCE)], [10, 5000, 20]))
        failures = cluster.failures()
    # every output it yielded before it raised went on, once; the item is not run again
    assert sorted(outputs) == sorted([*range(10), *range(5000), *range(20)])
    [letter] = failures
    assert letter.item == 5000 and letter.attempts == 1 and letter.error_type == "ValueError"
    assert "not retried" in letter.message


def small_then_retried(n, marks):
    mark = os.path.join(marks, str(n))
    if not os.path.exists(mark):
        open(mark, "w").close()
        raise ValueError("first attempt")
    return range(n)


@pytest.mark.timeout(120)
def test_a_generator_under_a_part_is_still_retried_whole(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    stage = pc.Stage(small_then_retried, generator=True, args=(str(marks),), supervision=ONCE)
    with pc.LocalCluster(workers=1, run_dir=str(tmp_path / "run")) as cluster:
        outputs = sorted(cluster.run([stage], [100, 1000]))
        assert cluster.failures() == []
    assert outputs == sorted([*range(100), *range(1000)])


def stalls_after_a_while(n, flag):
    for i in range(n):
        if i == 3000:
            with open(flag, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(60)  # killed here by the test
        yield (n, i)


@pytest.mark.timeout(120)
def test_a_worker_killed_mid_stream_charges_that_item_once_and_repeats_nothing(tmp_path):
    flag = tmp_path / "streaming.pid"
    stage = pc.Stage(stalls_after_a_while, generator=True, args=(str(flag),), supervision=ONCE)
    outputs: list = []
    with pc.LocalCluster(workers=1, run_dir=str(tmp_path / "run")) as cluster:
        results = cluster.run([stage], [100, 10_000, 50])
        for out in results:
            outputs.append(out)
            if len(outputs) == 1:  # the run is under way: wait for the stall, then kill that worker
                wait_until(flag.exists, 30)
                wait_until(lambda: flag.read_text() != "", 5)
                os.kill(int(flag.read_text()), signal.SIGKILL)
        failures = cluster.failures()
    counts = collections.Counter(outputs)
    assert set(counts.values()) == {1}  # nothing delivered twice
    [letter] = failures
    assert letter.item == 10_000 and letter.cause == "crash" and letter.attempts == 1
    assert "not retried" in letter.message and letter.signal == "SIGKILL"
    streamed = sorted(i for n, i in outputs if n == 10_000)  # what the killed item sent on before it stalled
    assert 0 < len(streamed) <= 3000 and streamed == list(range(len(streamed)))
    assert sorted(out for out in outputs if out[0] != 10_000) == [*((50, i) for i in range(50)),
                                                                   *((100, i) for i in range(100))]


@pytest.mark.timeout(120)
def test_ordered_run_keeps_a_streaming_generators_order(tmp_path):
    inputs = [2500, 3, 4100]
    with pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run")) as cluster:
        outputs = list(cluster.run([pc.Stage(fan_out, generator=True), slow_identity], inputs, ordered=True))
    assert outputs == [(n, i) for n in inputs for i in range(n)]


def tagged_stream(n):
    for i in range(n):
        if n > 1000 and i == 2048:  # two whole parts have gone on
            time.sleep(60)  # its node is killed while it waits here
        yield (n, i, os.environ.get("NODE_TAG"))


@pytest.mark.timeout(120)
def test_a_node_lost_mid_stream_dead_letters_that_input_and_repeats_nothing(nodes):
    servers = {tag: nodes(f"127.0.0.{40 + i}", env={"NODE_TAG": tag}) for i, tag in enumerate("ab")}
    inputs = [5000, *range(1, 200)]
    outputs: list = []
    with pc.Cluster.connect([s.address for s in servers.values()], heartbeat=0.2, dead_after=2.0) as cluster:
        for out in cluster.run([pc.Stage(tagged_stream, generator=True)], inputs):
            outputs.append(out)
            streamed = [o for o in outputs if o[0] == 5000]
            if len(streamed) == 2048 and len(outputs) == len(set(outputs)):
                servers[streamed[0][2]].proc.send_signal(signal.SIGKILL)
        failures = cluster.failures()
    assert len(outputs) == len(set(outputs))
    [letter] = failures
    assert letter.item == 5000 and letter.cause == "node_lost" and "not run again" in letter.message
    assert sorted(i for n, i, _ in outputs if n == 5000) == list(range(2048))
    assert sorted((n, i) for n, i, _ in outputs if n != 5000) == [(n, i) for n in range(1, 200) for i in range(n)]


@pytest.mark.timeout(120)
def test_an_output_handler_takes_a_long_stream(tmp_path):
    """The older interface's output handler is a caller too: streams held back for it are let go as it takes them."""
    got: list = []
    with pc.LocalCluster(workers=1, run_dir=str(tmp_path / "run")) as cluster:
        cluster.setup("streams", 1.0, [{"function": fan_out, "is_generator": True}])
        cluster.boot(output_handler=got.append)
        cluster.feed(100_000, 7)
        cluster.wait_empty()
    assert sorted(got) == sorted([*((100_000, i) for i in range(100_000)), *((7, i) for i in range(7))])


def tick(pair):
    time.sleep(0.0002)
    return pair


@pytest.mark.timeout(120)
def test_a_generator_held_back_longer_than_its_timeout_is_not_timed_out(tmp_path):
    """The stage timeout counts the time a streaming item runs, not the time the stages after it hold it back."""
    timed = pc.Stage(fan_out, generator=True, supervision=pc.Supervision(timeout=0.3))
    with pc.LocalCluster(workers=1, run_dir=str(tmp_path / "run")) as cluster:
        outputs = list(cluster.run([timed, tick], [12_000]))
        failures, stats = cluster.failures(), cluster.stats()
    assert failures == [] and len(outputs) == 12_000
    held = stats["fan_out"]["held"] * stats["fan_out"]["elapsed_seconds"]
    assert held > 0.3, stats["fan_out"]  # it was held back longer than its timeout


def filler_then_marked(n, marks):
    """The 10,000 outputs of one input fill the next stage; the other input waits for that, then ends its stream
    while the stage after it is full, so its worker is stuck sending its last part."""
    if n != 10_000:
        with open(os.path.join(marks, "pid"), "w") as f:
            f.write(str(os.getpid()))
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(marks, "go")) and time.monotonic() < deadline:
            time.sleep(0.01)
    for i in range(n):
        yield (n, i)


def slower(pair):
    time.sleep(0.0003)
    return pair


@pytest.mark.timeout(90)
def test_a_worker_killed_after_its_streaming_item_ended_charges_nothing(tmp_path):
    """Its item ended (its last part went on) while the worker waited for room: it is done, not charged or lost."""
    marks = tmp_path / "marks"
    marks.mkdir()
    stages = [pc.Stage(filler_then_marked, generator=True, args=(str(marks),), workers=2), pc.Stage(slower, workers=1)]
    outputs: list = []
    with pc.LocalCluster(workers=1, run_dir=str(tmp_path / "run")) as cluster:
        results = cluster.run(stages, [10_000, 1500])
        outputs.append(next(results))
        stats = lambda: cluster.stats()  # noqa: E731
        wait_until(lambda: stats()["filler_then_marked"]["items_out"] == 10_000 and stats()["slower"]["queued"]
                   >= 8192, 30)  # the next stage is full: no part is acknowledged now
        (marks / "go").touch()
        wait_until(lambda: stats()["filler_then_marked"]["items_out"] == 11_500, 30)  # both parts are in
        os.kill(int((marks / "pid").read_text()), signal.SIGKILL)
        with returns_within("a run whose worker died after its streaming item ended"):
            outputs.extend(results)
        failures = cluster.failures()
    assert failures == []
    assert sorted(outputs) == sorted([*((10_000, i) for i in range(10_000)), *((1500, i) for i in range(1500))])


class Unloadable(Exception):
    """Pickles in the worker; unpickling it calls Unloadable(text), which lacks `code`."""

    def __init__(self, text, code):
        super().__init__(text)
        self.code = code


def yields_an_unloadable(n):
    for i in range(n):
        yield Unloadable("odd", 1) if (n == 3000 and i == 1500) else (n, i)


@pytest.mark.timeout(60)
def test_a_streamed_part_the_node_cannot_read_fails_only_its_item(tmp_path):
    with pc.LocalCluster(workers=1, run_dir=str(tmp_path / "run")) as cluster:
        outputs = list(cluster.run([pc.Stage(yields_an_unloadable, generator=True)], [3000, 5, 2000, 7]))
        failures = cluster.failures()
    by_input = collections.Counter(n for n, _ in outputs)
    assert by_input == {3000: 1024, 5: 5, 2000: 2000, 7: 7}  # its first part went on; the others are whole
    assert sorted(i for n, i in outputs if n == 3000) == list(range(1024))
    [letter] = failures
    assert letter.item == 3000 and letter.error_type == "UnpicklingError" and "not retried" in letter.message


SINK_DRIVER = """
import os, sys, time
import pipeline_cluster as pc
from pipeline_cluster import sinks

def stream(n, flag):
    for i in range(n):
        if i and i % 1024 == 0:
            time.sleep(0.1)  # each part reaches the sink, and a commit is due, before the next
        if n == 5000 and i == 3500 and os.environ.get("STALL"):
            open(flag, "w").close()
            time.sleep(60)  # the driver is killed meanwhile
        yield [n, i]

if __name__ == "__main__":
    with pc.LocalCluster(workers=1, run_dir=sys.argv[1]) as cluster:
        cluster.run([pc.Stage(stream, generator=True, args=(sys.argv[3],))], [1, 2, 5000], run_id="sinkstream",
                    resume=not os.environ.get("STALL"), sink=sinks.JsonLines(sys.argv[2]))
"""


@pytest.mark.timeout(120)
def test_a_streaming_input_reaches_a_sink_once_across_a_driver_crash(tmp_path):
    script, out, stalled = tmp_path / "driver.py", tmp_path / "out.jsonl", tmp_path / "stalled"
    script.write_text(SINK_DRIVER)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = [sys.executable, str(script), str(tmp_path / "run"), str(out), str(stalled)]
    driver = subprocess.Popen(args, env={**env, "STALL": "1"}, stderr=subprocess.DEVNULL)
    try:
        wait_until(stalled.exists, 60)  # 3,072 of its outputs are in the sink, with inputs 1 and 2 complete
    finally:
        driver.kill()
        driver.wait()
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=90)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    lines = [tuple(json.loads(line)) for line in out.read_text().splitlines()]
    assert collections.Counter(lines) == collections.Counter([(n, i) for n in (1, 2, 5000) for i in range(n)])
