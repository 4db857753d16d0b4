"""Durable runs: the journal, resume after a crash, exactly-once file sinks, and the `runs` command.

The crash tests SIGKILL real `pipeline-cluster run` drivers at random moments and check the output file and the
journal's dead letters hold every expected record exactly once at the end.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pipeline_cluster as pc
from pipeline_cluster.journal import IdentityChanged, RunExists
from pipeline_cluster.rundir import runs_root
from tests.helpers import REPO, run_cli, wait_until

PIPELINE_MODULE = '''
import time
import pipeline_cluster as pc

def parse(line):
    n = int(line)
    if n % 997 == 0:
        raise ValueError(f"bad input {n}")
    until = time.perf_counter() + 0.0002  # 100,000 inputs: about 10 s on two workers
    while time.perf_counter() < until:
        pass
    return n

def twice(n):
    yield n * 2
    yield n * 2 + 1

pipeline = pc.Pipeline([pc.Stage(parse), pc.Stage(twice, generator=True)], name="crashy")
'''
INPUTS = 100_000
BAD = {n for n in range(INPUTS) if n % 997 == 0}


def _journal_letters(run_id: str) -> list[tuple]:
    """(input, stage) of every dead letter of the run not fed again, read straight from its journal."""
    with sqlite3.connect(runs_root() / run_id / "journal.sqlite") as db:
        return [(json.loads(i), json.loads(letter)["stage"])
                for i, letter in db.execute("SELECT input, letter FROM dead_letters WHERE refed = 0")]


def _start(tmp_path: Path, attempt: int, *args: str) -> subprocess.Popen:
    with open(tmp_path / f"driver-{attempt}.log", "w") as log:
        return subprocess.Popen([sys.executable, "-m", "pipeline_cluster.cli", "run", "crashy:pipeline",
                                 "--input", "in.txt", "--output", "out.jsonl", *args],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log,
                                env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})


def _ended_or_wrote(proc: subprocess.Popen, out: Path, size: int) -> bool:
    return proc.poll() is not None or (out.exists() and out.stat().st_size > size)


def _crash_and_resume(tmp_path: Path, kills: int, *cluster_args: str) -> None:
    (tmp_path / "crashy.py").write_text(PIPELINE_MODULE)  # node servers load it from $PYTHONPATH
    (tmp_path / "in.txt").write_text("".join(f"{n}\n" for n in range(INPUTS)))
    out = tmp_path / "out.jsonl"
    rng = random.Random(int(os.environ.get("PC_CHAOS_SEED", "16")))
    killed = 0
    for attempt in range(kills + 1):
        args = ["--run-id", "chaos"] if attempt == 0 else ["--resume", "chaos"]
        size = out.stat().st_size if out.exists() else 0
        proc = _start(tmp_path, attempt, *args, *cluster_args)
        try:
            if attempt == kills:  # the last resume runs to the end
                assert proc.wait(timeout=120) == 1, (tmp_path / f"driver-{attempt}.log").read_text()[-3000:]
                break
            if attempt % 4 == 3:  # during start-up: opening the journal, cutting the file back, starting workers
                time.sleep(rng.uniform(0.2, 1.5))
            else:  # while outputs are being written
                wait_until(functools.partial(_ended_or_wrote, proc, out, size), 60)
                time.sleep(rng.uniform(0.0, 0.4))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed += 1
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert killed >= kills * 3 // 4, f"only {killed} of {kills} attempts were still running when killed"
    lines = collections.Counter(out.read_text().splitlines())
    expected = collections.Counter(str(v) for n in range(INPUTS) if n not in BAD for v in (2 * n, 2 * n + 1))
    assert lines == expected, (f"{sum((lines - expected).values())} extra, {sum((expected - lines).values())} "
                               f"missing output line(s)")
    letters = _journal_letters("chaos")
    assert sorted(letters) == sorted((n, "parse") for n in BAD)
    listed = run_cli("runs").stdout
    assert any(line.split()[:2] == ["chaos", "crashy"] and "finished" in line and f"{INPUTS}/{INPUTS}" in line
               for line in listed.splitlines()), listed


@pytest.mark.timeout(300)
def test_sigkilled_driver_resumes_to_every_output_exactly_once(tmp_path):
    _crash_and_resume(tmp_path, 20, "--workers", "2")


@pytest.mark.timeout(300)
def test_sigkilled_driver_of_node_servers_resumes_exactly_once(tmp_path, nodes):
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    servers = [nodes("127.0.0.1", workers=1, env=env), nodes("127.0.0.1", workers=1, env=env)]
    _crash_and_resume(tmp_path, 20, *[arg for node in servers for arg in ("--connect", "{}:{}".format(*node.address))])


# -- in one process ------------------------------------------------------------------------------------------------

def double(x):
    return 2 * x


def triple(x):
    return 3 * x


def failing_at(items, position):
    """The items, until the one at `position`, where reading raises (a file on a disk that fails, say)."""
    for index, item in enumerate(items):
        if index == position:
            raise OSError("the input disk failed")
        yield item


def test_changed_pipeline_is_refused_unless_forced():
    with pc.LocalCluster(workers=1) as cluster:
        with pytest.raises(pc.InputFailed):
            list(cluster.run([double], failing_at(range(50), 30), run_id="ident"))
        with pytest.raises(RunExists, match="resume=True"):
            cluster.run([double], range(50), run_id="ident")
        with pytest.raises(IdentityChanged, match="resume='force'"):
            cluster.run([triple], range(50), run_id="ident", resume=True)
        rest = cluster.run([triple], range(50), run_id="ident", resume="force")
        assert sorted(rest) == [3 * x for x in range(30, 50)]
        assert cluster.status()["inputs_complete"] == 50  # earlier attempts count
        assert list(cluster.run([triple], range(50), run_id="ident", resume="force")) == []  # finished: nothing


def test_key_inputs_resume_in_any_order_into_a_sink_exactly_once(tmp_path):
    names = [f"item-{i}" for i in range(1000)]
    out = tmp_path / "out.jsonl"
    with pc.LocalCluster(workers=2) as cluster:
        with pytest.raises(pc.InputFailed):
            cluster.run([str.upper], failing_at(names, 300), run_id="keys", key=str, sink=pc.sinks.JsonLines(out))
        assert len(out.read_text().splitlines()) == 300
        shuffled = names[:]
        random.Random(5).shuffle(shuffled)
        summary = cluster.run([str.upper], shuffled, run_id="keys", key=str, resume=True,
                              sink=pc.sinks.JsonLines(out))
    assert summary == pc.RunSummary("keys", 1000, 1000, 1000, 0)
    assert sorted(json.loads(line) for line in out.read_text().splitlines()) == sorted(n.upper() for n in names)


def test_an_ordered_resume_gives_the_rest_in_order_with_their_first_indices():
    with pc.LocalCluster(workers=2) as cluster:
        first = []
        for index, output in cluster.run([double], range(5_000), run_id="ordered", ordered=True, keyed=True):
            first.append((index, output))
            if len(first) == 1_000:
                break  # stopped early: inputs in flight may run again, and come again
        rest = list(cluster.run([double], range(5_000), run_id="ordered", ordered=True, keyed=True, resume=True))
    assert first == [(i, 2 * i) for i in range(1_000)]
    indices = [index for index, _ in rest]
    assert indices == sorted(indices) and indices[-1] == 4_999 and rest == [(i, 2 * i) for i in indices]
    assert set(range(1_000, 5_000)) <= set(indices)  # nothing after the stop is missing


def test_resumed_run_refeeds_the_first_attempts_dead_letters(tmp_path):
    broken = tmp_path / "broken"
    broken.touch()

    def fragile(x):
        if x % 10 == 0 and os.path.exists(broken):
            raise ValueError(f"{x} met the broken part")
        return x

    stage = pc.Stage(fragile, supervision={"max_attempts": 1})
    with pc.LocalCluster(workers=2) as cluster:
        assert len(list(cluster.run([stage], range(100), run_id="fix"))) == 90
        assert sorted(letter.input_id for letter in cluster.failures()) == list(range(0, 100, 10))
    broken.unlink()  # the cause is fixed; a new driver goes on with the run
    with pc.LocalCluster(workers=2) as cluster:
        results = cluster.run([stage], range(100), run_id="fix", resume=True)
        assert cluster.refeed() == 10
        assert sorted(results) == list(range(0, 100, 10))
        assert cluster.failures() == []
    with pc.LocalCluster(workers=1) as cluster:  # fed again for good: the journal says so
        assert list(cluster.run([stage], range(100), run_id="fix", resume=True)) == []
        assert cluster.failures() == []


def test_cli_refuses_to_resume_a_changed_pipeline_without_force(tmp_path):
    (tmp_path / "in.txt").write_text("".join(f"{n}\n" for n in range(20)))
    module = tmp_path / "changing.py"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return run_cli("run", "changing:pipeline", "--input", "in.txt", "--output", "out.jsonl", "--workers", "1",
                       *args, cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})

    module.write_text("def pipeline_stage(line):\n    return int(line)\n\npipeline = [pipeline_stage]\n")
    assert cli("--run-id", "v1").returncode == 0
    again = cli("--resume", "v1")
    assert again.returncode == 0 and "run v1 finished before (20 input(s) complete): nothing to do" in again.stderr
    module.write_text("def pipeline_stage(line):\n    return -int(line)\n\npipeline = [pipeline_stage]\n")
    refused = cli("--resume", "v1")
    assert refused.returncode != 0 and "--force on the command line" in refused.stderr, refused.stderr
    assert "exists already" in cli("--run-id", "v1").stderr
    assert cli("--resume", "v1", "--force").returncode == 0
    assert "no run 'v9' to resume" in cli("--resume", "v9").stderr
    assert sorted(map(int, (tmp_path / "out.jsonl").read_text().split())) == list(range(20))


def _good_or_loud_failure(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd item {x}: " + "y" * 500)
    return x


@pytest.mark.timeout(120)
def test_a_full_disk_under_the_journal_loses_no_output(full_disk, monkeypatch, capfd):
    monkeypatch.setenv("XDG_CACHE_HOME", full_disk)
    with pc.LocalCluster(workers=2) as cluster:
        stage = pc.Stage(_good_or_loud_failure, supervision={"max_attempts": 1})
        outputs = list(cluster.run([stage], range(10_000), run_id="full"))
        status = cluster.status()
        failures = cluster.failures()
    assert sorted(outputs) == list(range(0, 10_000, 2))  # every good output arrived
    assert status["failures"] == 5_000 and len(failures) == 5_000  # those the disk refused were kept to retry
    journal = runs_root() / "full" / "journal.sqlite"
    err = capfd.readouterr().err
    assert err.count(f"cannot write {journal}: database or disk is full") == 1, err[-3000:]


def test_bad_run_ids_and_resume_without_one_are_refused():
    with pc.LocalCluster(workers=1) as cluster:
        for bad in ("../escape", "", "latest", "a/b"):
            with pytest.raises(ValueError, match="run_id"):
                cluster.run([double], range(3), run_id=bad)
        with pytest.raises(ValueError, match="resume needs the run_id"):
            cluster.run([double], range(3), resume=True)
        assert sorted(cluster.run([double], range(3), run_id="fine")) == [0, 2, 4]


def test_runs_lists_removes_and_prunes(capsys):
    from pipeline_cluster import cli

    with pc.LocalCluster(workers=1) as cluster:
        list(cluster.run([double], range(10), run_id="old"))
        for _ in cluster.run([double], range(10_000), run_id="stopped"):
            break  # leaving the loop stops the run
        list(cluster.run([double], range(10), run_id="new"))
    capsys.readouterr()
    assert cli.main(["runs"]) == 0
    table = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(table) == {"old", "stopped", "new"}, table  # the cluster's unused first run directory is gone
    assert table["old"][4:7] == ["finished", "10/10", "0"]
    assert table["stopped"][4] == "stopped"
    with sqlite3.connect(runs_root() / "old" / "journal.sqlite") as db:  # as if it last ran eight days ago
        db.execute("UPDATE meta SET value = ? WHERE name = 'updated'", (json.dumps(time.time() - 8 * 86400),))
    assert cli.main(["runs", "prune", "--older-than", "7d"]) == 0
    assert "removed 1 run(s): old" in capsys.readouterr().out
    assert cli.main(["stats", "new"]) == 0
    assert "10/10 input(s) complete" in capsys.readouterr().out
    assert cli.main(["runs", "rm", "stopped"]) == 0
    assert not (runs_root() / "stopped").exists()
    assert cli.main(["runs", "prune", "--keep", "1"]) == 0
    assert sorted(path.name for path in runs_root().iterdir()) == ["latest", "new"]
    with pytest.raises(SystemExit, match="no run"):
        cli.main(["runs", "rm", "nope"])
