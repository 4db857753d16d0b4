"""The runnable examples in examples/ run as the README shows them, from a checkout."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


def _run(name: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "examples" / name)], capture_output=True, text=True,
                          timeout=90, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.timeout(120)
def test_quickstart_prints_tagged_words_in_input_order():
    lines = _run("quickstart.py").splitlines()
    words = ["#quick", "#brown", "#fox", "#jumps", "#over", "#the", "#lazy", "#dog"]  # "#a" is too short
    assert lines == [*words, "9 words tagged; 0 failures"]


@pytest.mark.timeout(120)
def test_io_stage_runs_a_thousand_waiting_items():
    assert _run("io_stage.py").startswith("1000 items, 40 ms of waiting each, in ")


@pytest.mark.timeout(120)
def test_batch_stage_dead_letters_only_the_bad_reading():
    assert _run("batch_stage.py").splitlines() == [
        "999 of 1000 readings converted, 67032.0 in all",
        "1 failed, 2 retried",
        "dead letter: 'n/a' after 3 attempts: ValueError: could not convert string to float: 'n/a'",
    ]


@pytest.mark.timeout(120)
def test_arrays_match_numpy_in_the_driver():
    pytest.importorskip("numpy", reason="examples/arrays.py needs numpy (the test extra installs it)")
    assert _run("arrays.py").splitlines() == [
        "16 arrays of (256, 256) float64 in (8 MiB), 16 of (256,) out",
        "16 of 16 match numpy run here",
    ]


@pytest.mark.timeout(120)
def test_ordered_keeps_input_order_and_keys_match_inputs():
    lines = _run("ordered.py").splitlines()
    assert lines[0] == " ".join(f"{n}{part}" for n in range(8) for part in "ABC")
    assert lines[1:] == ["0 pear -> PEAR", "1 fig -> FIG", "2 banana -> BANANA", "3 kiwi -> KIWI", "4 plum -> PLUM"]


@pytest.mark.timeout(120)
def test_stream_stage_counts_two_million_outputs_of_one_input():
    assert _run("stream_stage.py").startswith(
        "2000000 outputs from 1 input, counted by weekday: 285715 on day 0; this process peaked at ")
