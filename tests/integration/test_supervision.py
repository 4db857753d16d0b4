"""Supervision with real processes and signals: crashes, segfaults, timeouts, restart budgets, dead letters."""
from __future__ import annotations

import collections
import ctypes
import os
import random
import signal
import textwrap
import time

import psutil
import pytest

import pipeline_cluster as pc
from tests.helpers import is_zygote, live_workers, read_line, returns_within, start_script, wait_until

FAST_RESTARTS = dict(max_restarts=1000, restart_window=60.0, backoff=(0.01, 0.05))


def chaos_stage_one(x, marks):
    if x == 777:
        raise RuntimeError("poison item 777")
    if x % 100 == 13:  # 1% of items kill their worker on their first attempt
        mark = os.path.join(marks, str(x))
        if not os.path.exists(mark):
            open(mark, "w").close()
            os._exit(7)
    return (x, -x)


def chaos_stage_two(x):
    time.sleep(0.0005)
    return x * 10


@pytest.mark.timeout(180)
def test_chaos_kills_exits_and_a_poison_item(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    pipeline = pc.Pipeline([
        pc.Stage(chaos_stage_one, generator=True, args=(str(marks),), supervision=pc.Supervision(**FAST_RESTARTS)),
        pc.Stage(chaos_stage_two, supervision=pc.Supervision(**FAST_RESTARTS))])
    rng = random.Random(1)
    killed = []

    def kill_a_worker() -> None:
        """SIGKILL a random live worker (one that exits meanwhile is skipped for another)."""
        workers = live_workers()
        for victim in rng.sample(workers, len(workers)):
            try:
                victim.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                continue
            killed.append(victim.pid)
            return

    outputs = collections.Counter()
    kill_at = {500, 1500, 2500}  # outputs in: the run is under way each time (3,998 outputs in all)
    with pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run"), credit=64) as cluster:
        for count, output in enumerate(cluster.run(pipeline, range(2000)), 1):
            outputs[output] += 1
            if count in kill_at:
                kill_a_worker()
        stats = cluster.stats()
        failures = cluster.failures()
    expected = collections.Counter(y * 10 for x in range(2000) if x != 777 for y in (x, -x))
    assert outputs == expected  # every other input's outputs exactly once
    assert [f.item for f in failures] == [777]
    poison = failures[0]
    assert poison.cause == "exception" and "poison item 777" in poison.traceback and poison.attempts == 3
    assert len(killed) == 3, killed
    restarts = stats["chaos_stage_one"]["restarts"] + stats["chaos_stage_two"]["restarts"]
    assert restarts >= 20 + len(killed) // 2  # 20 os._exit items plus the SIGKILLs that hit a worker
    assert stats["chaos_stage_one"]["failed"] == 1


def segfault_on_500(x):
    if x == 500:
        ctypes.string_at(0)  # SIGSEGV
    return x


@pytest.mark.timeout(120)
def test_segfaulting_poison_item_in_a_large_batch_sinks_only_itself(tmp_path):
    with pc.LocalCluster(workers=1, run_dir=str(tmp_path / "run")) as cluster:
        # a warm-up makes the supervisor size batches for tiny items, so item 500 sits inside a big batch
        stage = pc.Stage(segfault_on_500, supervision=pc.Supervision(max_attempts=2, backoff=(0.01, 0.05)))
        outputs = sorted(cluster.run([stage], range(1000)))
        failures = cluster.failures()
        stats = cluster.stats()["segfault_on_500"]
    assert outputs == [x for x in range(1000) if x != 500]
    assert len(failures) == 1
    letter = failures[0]
    assert letter.item == 500 and letter.cause == "crash" and letter.signal == "SIGSEGV" and letter.attempts == 2
    assert letter.pid is not None and stats["restarts"] == 2


def sleeps_forever_on_3(x):
    if x == 3:
        time.sleep(3600)
    return x


@pytest.mark.timeout(60)
def test_hung_item_is_dead_lettered_after_max_attempts_timeouts(tmp_path):
    stage = pc.Stage(sleeps_forever_on_3,
                     supervision=pc.Supervision(timeout=0.5, max_attempts=2, backoff=(0.01, 0.05)))
    with pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run")) as cluster:
        with returns_within("a run with an item that hangs forever"):
            assert sorted(cluster.run([stage], range(20))) == [x for x in range(20) if x != 3]
        [letter] = cluster.failures()
    assert letter.item == 3 and letter.cause == "timeout" and letter.attempts == 2 and letter.signal == "SIGKILL"


class ExitsAtStart:
    def __init__(self):
        os._exit(3)

    def __call__(self, x):
        return x


@pytest.mark.timeout(60)
def test_workers_that_exit_at_start_fail_the_run(tmp_path):
    with pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run")) as cluster:
        with returns_within("a run whose workers exit at start"), pytest.raises(pc.StageFailed) as info:
            list(cluster.run([ExitsAtStart], range(5)))
    assert info.value.stage == "ExitsAtStart" and "exit code 3" in str(info.value)


def always_crash(x):
    os._exit(9)


@pytest.mark.timeout(60)
def test_restart_budget_exhausted_fails_with_stage_cause_and_item(tmp_path):
    stage = pc.Stage(always_crash, supervision=pc.Supervision(max_attempts=100, max_restarts=3,
                                                              backoff=(0.01, 0.02)))
    with pc.LocalCluster(workers=1, run_dir=str(tmp_path / "run")) as cluster:
        with pytest.raises(pc.StageFailed) as info:
            list(cluster.run([stage], range(5)))
    error = info.value
    assert error.stage == "always_crash" and "more than 3 worker restarts" in error.cause
    assert "exit code 9" in error.cause and error.item in range(5)


def crash_in_pid_file_worker(x, path):
    # the first worker to take an item writes its pid and dies; the others work
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(5)
    except FileExistsError:
        return x


@pytest.mark.timeout(60)
def test_degrade_goes_on_with_the_workers_left(tmp_path, capfd):
    stage = pc.Stage(crash_in_pid_file_worker, args=(str(tmp_path / "pid"),),
                     supervision=pc.Supervision(max_restarts=0, on_exhausted="degrade"))
    with pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run")) as cluster:
        assert sorted(cluster.run([stage], range(50))) == list(range(50))
        assert cluster.stats()["crash_in_pid_file_worker"]["workers"] == 1
        log = cluster.rundir.log_file
    said = "stage 'crash_in_pid_file_worker': restart budget exhausted, going on with 1 worker(s)"
    assert said in capfd.readouterr().err  # the degraded stage is a warning on stderr ...
    assert said in log.read_text()  # ... and in the run's log


def fails_until_fixed(x, flag):
    if x % 2 and not os.path.exists(flag):
        raise KeyError(f"missing {x}")
    return x


@pytest.mark.timeout(60)
def test_dead_letters_refeed_after_the_cause_is_fixed(tmp_path):
    flag = tmp_path / "fixed"
    stage = pc.Stage(fails_until_fixed, args=(str(flag),), supervision=pc.Supervision(retry_on=(ValueError,)))
    with pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run")) as cluster:
        received = []
        cluster.setup("refeed", 1, [abs, stage])  # abs first: letters fail in stage 1 and re-enter there
        cluster.boot(output_handler=received.append)
        cluster.feed(*range(10))
        cluster.wait_empty()
        letters = cluster.failures()
        assert sorted(received) == [0, 2, 4, 6, 8] and len(letters) == 5
        assert all(letter.attempts == 1 and letter.stage_index == 1 for letter in letters)  # KeyError not retried
        flag.touch()
        assert cluster.refeed() == 5
        cluster.wait_empty()
        assert sorted(received) == list(range(10)) and cluster.failures() == []


@pytest.mark.timeout(60)
def test_on_failure_drop_logs_instead_of_keeping(tmp_path):
    stage = pc.Stage(fails_until_fixed, args=(str(tmp_path / "never"),),
                     supervision=pc.Supervision(max_attempts=1, on_failure="drop"))
    log_file = tmp_path / "log.txt"
    with pc.LocalCluster(workers=1, run_dir=str(tmp_path / "run"), log_file=str(log_file)) as cluster:
        assert sorted(cluster.run([stage], range(4))) == [0, 2]
        assert cluster.failures() == []
        assert cluster.stats()["fails_until_fixed"]["failed"] == 2
    assert wait_until(lambda: log_file.read_text().count("dropped item") == 2, 10)


def test_supervision_from_toml_names_bad_keys(tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text(textwrap.dedent("""
        [stages.chaos_stage_two]
        workers = 3
        [stages.chaos_stage_two.supervision]
        max_attempts = 5
        timeout = 2.5
        retry_on = ["ValueError", "OSError"]
        backoff = [0.5, 4]
        on_exhausted = "degrade"
    """))
    pipeline = pc.Pipeline([chaos_stage_two]).configure(str(config))
    stage = pipeline.stages[0]
    assert stage.workers == 3 and stage.supervision == pc.Supervision(
        max_attempts=5, timeout=2.5, retry_on=(ValueError, OSError), backoff=(0.5, 4.0), on_exhausted="degrade")
    config.write_text("[stages.chaos_stage_two.supervision]\nmax_attempts = 0\n")
    with pytest.raises(ValueError, match=r"\[stages.chaos_stage_two.supervision\]: supervision.max_attempts"):
        pc.Pipeline([chaos_stage_two]).configure(str(config))
    config.write_text("[stages.chaos_stage_two.supervision]\ntimout = 1\n")
    with pytest.raises(ValueError, match=r"unknown supervision key\(s\) \['timout'\]"):
        pc.Pipeline([chaos_stage_two]).configure(str(config))
    config.write_text('[stages.chaos_stage_two.supervision]\nretry_on = ["NoSuchError"]\n')
    with pytest.raises(ValueError, match="'NoSuchError' is not an exception type"):
        pc.Pipeline([chaos_stage_two]).configure(str(config))


@pytest.mark.timeout(60)
def test_cluster_config_applies_stage_overrides(tmp_path):
    config = tmp_path / "cluster.toml"
    config.write_text("[stages.chaos_stage_two]\nworkers = 1\n")
    with pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run"), config=str(config)) as cluster:
        assert sorted(cluster.run([chaos_stage_two], [1, 2])) == [10, 20]
        assert cluster.stats()["chaos_stage_two"]["workers"] == 1


CTRL_C_SCRIPT = textwrap.dedent("""
    import sys, time
    import pipeline_cluster as pc

    def slow(x):
        time.sleep(0.2)
        return x

    with pc.LocalCluster(workers=2, run_dir=sys.argv[1]) as cluster:
        for i, out in enumerate(cluster.run([slow, slow], iter(int, 1))):
            if i == 2:
                print("RUNNING", flush=True)
""")


@pytest.mark.timeout(60)
def test_ctrl_c_during_run_stops_everything(tmp_path):
    proc = start_script(tmp_path, CTRL_C_SCRIPT)
    assert read_line(proc, 30) == "RUNNING"
    tree = psutil.Process(proc.pid).children(recursive=True)  # its workers and the zygote they came from
    assert len([p for p in tree if not is_zygote(p)]) == 4
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert "KeyboardInterrupt" in err
    assert wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree), 10)


def reopen(value):
    raise FileNotFoundError(f"/data/shard-{value} is not on this machine")


class Handle:
    """An object whose loading fails with an OSError (it reopens a resource that is not there)."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return reopen, (self.value,)


def handle_for_3(x):
    return Handle(x) if x == 3 else x


@pytest.mark.timeout(60)
def test_an_item_or_output_that_cannot_be_loaded_fails_alone_not_the_worker(tmp_path):
    # an OSError raised while unpickling is not a broken connection: only that batch's items fail, no worker dies
    with pc.LocalCluster(workers=1, run_dir=str(tmp_path / "run")) as cluster:
        outputs = sorted(cluster.run([lambda x: x], [1, 2, Handle(3), 4]))
        item_letters = cluster.failures()
        stats = cluster.stats()
        more = sorted(o for o in cluster.run([handle_for_3], range(8)) if isinstance(o, int))
        output_letters = cluster.failures()  # of the last run: each run has its own dead letters and run directory
        written = (cluster.rundir.dead_letter_file).read_text().count("\n")
    assert set(outputs) <= {1, 2, 4}  # the batch that cannot be read fails whole: it may hold neighbours of item 3
    assert item_letters and all("FileNotFoundError" in letter.message for letter in item_letters)
    assert len(outputs) + len(item_letters) == 4
    assert stats["<lambda>"]["restarts"] == 0
    assert 3 not in more and len(more) + len(output_letters) == 8
    assert output_letters and all("FileNotFoundError" in letter.message for letter in output_letters)
    assert written == len(output_letters)  # all are in the run directory's file, Handle items as their repr


def tenfold(x):
    return x * 10


@pytest.mark.timeout(60)
def test_a_timeout_of_weeks_is_waited_in_slices(tmp_path):
    pipeline = pc.Pipeline([pc.Stage(tenfold, workers=1, supervision=pc.Supervision(timeout=30 * 86400.0))])
    with pc.LocalCluster(run_dir=str(tmp_path / "run")) as cluster:
        assert sorted(cluster.run(pipeline, range(20))) == [x * 10 for x in range(20)]
        assert cluster.failures() == []
