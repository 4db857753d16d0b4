"""Ordered and keyed output: outputs in input order (a generator's outputs of one input in the order yielded) under
random per-item delays, within a bounded reorder window; outputs as (input index, output); the CLI's --ordered."""
from __future__ import annotations

import json
import random
import time

import pytest

import pipeline_cluster as pc
from tests.helpers import REPO, run_cli


def _jitter(x: int) -> int:
    time.sleep(random.random() * 0.003)
    return x


def _fan_out(x: int) -> list[tuple[int, int]]:
    return [(x, i) for i in range(x % 4)]  # 0 to 3 outputs: inputs with none still take their place in order


def _fail_on_5(x: int) -> int:
    if x % 10 == 5:
        raise ValueError(x)
    return x


@pytest.mark.timeout(60)
def test_ordered_output_follows_the_input_order_under_random_delays(tmp_path):
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=2) as cluster:
        outputs = list(cluster.run([_jitter, pc.Stage(_fan_out, generator=True)], range(2000), ordered=True))
    assert outputs == [(x, i) for x in range(2000) for i in range(x % 4)]


@pytest.mark.timeout(60)
def test_ordered_output_skips_dead_letters_and_keyed_output_names_each_input(tmp_path):
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=2) as cluster:
        ordered = list(cluster.run([pc.Stage(_fail_on_5, supervision={"max_attempts": 1}), _jitter], range(300),
                                   ordered=True, keyed=True))
        assert ordered == [(x, x) for x in range(300) if x % 10 != 5]
        assert sorted(letter.item for letter in cluster.failures()) == list(range(5, 300, 10))
        keyed = list(cluster.run([_jitter, str], range(500), keyed=True))
    assert sorted(keyed) == [(i, str(i)) for i in range(500)]  # in completion order, each matched to its input


def _slow_first(x: int) -> int:
    if x == 0:
        time.sleep(1.0)
    return x


@pytest.mark.timeout(60)
def test_one_slow_input_holds_the_window_not_memory(tmp_path):
    pulled = []

    def inputs():
        for x in range(10_000):
            pulled.append(x)
            yield x

    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=2) as cluster:
        results = cluster.run([_slow_first], inputs(), ordered=True, window=50)
        first = next(iter(results))
        pulled_while_held = len(pulled)  # input 0 took a second: the others waited within the window
        rest = list(results)
    assert first == 0 and rest == list(range(1, 10_000))
    assert pulled_while_held <= 50 + 1024, pulled_while_held  # the window, plus at most one feed chunk in hand


@pytest.mark.timeout(60)
def test_cli_run_ordered_writes_each_output_with_its_input_line(tmp_path):
    (tmp_path / "mypipe.py").write_text(
        "import random, time\nimport pipeline_cluster as pc\n"
        "def words(line):\n    time.sleep(random.random() / 500)\n    return line.split()\n"
        "pipeline = pc.Pipeline([pc.Stage(words, generator=True), str.upper])\n")
    (tmp_path / "in.txt").write_text("".join(f"w{i} x{i}\n" for i in range(300)) + "\nlast\n")
    result = run_cli("run", "mypipe:pipeline", "--input", str(tmp_path / "in.txt"), "--output",
                     str(tmp_path / "out.jsonl"), "--ordered", "--workers", "2", cwd=tmp_path, timeout=50,
                     env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = [{"line": i + 1, "output": word} for i in range(300) for word in (f"W{i}", f"X{i}")]
    assert lines == expected + [{"line": 302, "output": "LAST"}]
