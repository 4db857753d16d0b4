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
