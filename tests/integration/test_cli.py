"""The command line as a user runs it: demo, run over a file, stats of the latest run, help."""
from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli, wait_until


@pytest.mark.timeout(120)
def test_demo_prints_per_stage_stats_and_stats_reads_the_run():
    result = run_cli("demo", "--count", "300", "--workers", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "demo: 300 sentences" in out
    for stage in ("split_words", "Normalize", "drop_stop_words"):
        assert stage in out
    stats = run_cli("benchmark")  # the seed's name for the stats summary of the latest run
    assert stats.returncode == 0, stats.stderr
    assert "pipeline wordcount" in stats.stdout and "drop_stop_words" in stats.stdout
    raw = json.loads(run_cli("stats", "--json").stdout)
    assert raw["stages"]["split_words"]["items_in"] == 300


@pytest.mark.timeout(120)
def test_run_module_attr_over_a_file_writes_json_lines(tmp_path):
    (tmp_path / "mypipe.py").write_text(
        "import pipeline_cluster as pc\n"
        "def words(line):\n    return line.split()\n"
        "pipeline = pc.Pipeline([pc.Stage(words, generator=True), str.upper])\n")
    (tmp_path / "in.txt").write_text("a b\nc\n\nd\n")
    result = run_cli("run", "mypipe:pipeline", "--input", str(tmp_path / "in.txt"), "--output",
                 str(tmp_path / "out.jsonl"), "--workers", "1", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert sorted(json.loads(line) for line in lines) == ["A", "B", "C", "D"]
    assert "words" in result.stderr  # the stats table


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["demo", "run", "node", "log", "stats", "top", "dashboard"])
def test_every_command_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout and len(result.stdout) > 200


def _slow(x: int) -> int:
    import time

    time.sleep(0.01)
    return x


@pytest.mark.timeout(120)
def test_top_shows_a_running_run_and_then_its_end(tmp_path):
    import pipeline_cluster as pc

    run_dir = tmp_path / "run"
    with pc.LocalCluster(run_dir=str(run_dir), workers=1) as cluster:
        results = iter(cluster.run([_slow], range(600)))
        for _ in range(300):  # by now stats.json has been written while running (every 2 s)
            next(results)
        assert wait_until(lambda: (run_dir / "stats.json").exists(), 10)
        live = run_cli("top", str(run_dir), "--once")
        list(results)
    assert live.returncode == 0, live.stderr
    assert "(running)" in live.stdout and "_slow" in live.stdout and "busy" in live.stdout
    done = run_cli("top", str(run_dir), "--interval", "0.1")  # a finished run: one screen, then it exits
    assert done.returncode == 0 and "(finished)" in done.stdout and "limits throughput" in done.stdout
