"""Batch stages (`batch_size=N`): the task gets lists; a list that raises is split until only the failing items are
charged; a partial list goes after `max_wait`; generator batch stages; bad returns are the task's fault."""
from __future__ import annotations

import os
import threading

import pytest

import pipeline_cluster as pc
from tests.helpers import run_stage


def squares(items: list[int]) -> list[int | None]:
    """Vectorised-style: one call per list. Item 13 poisons any list it is in; odd multiples of 5 are dropped."""
    if 13 in items:
        raise ValueError("13 is in this list")
    return [None if x % 10 == 5 else x * x for x in items]


@pytest.mark.timeout(60)
def test_a_failing_item_is_found_by_splitting_and_charged_alone(tmp_path):
    stage = pc.Stage(squares, batch_size=32, workers=2, supervision={"max_attempts": 2})
    with pc.LocalCluster(run_dir=str(tmp_path / "run")) as cluster:
        outputs = sorted(cluster.run([stage], range(200)))
        failures = cluster.failures()
        stats = cluster.stats()["squares"]
    assert outputs == sorted(x * x for x in range(200) if x != 13 and x % 10 != 5)
    [letter] = failures
    assert letter.item == 13 and letter.attempts == 2 and letter.error_type == "ValueError"
    assert stats["retried"] == 1 and stats["failed"] == 1 and stats["dropped"] == 20  # nobody else charged


class ListSizes:
    """Records the size of every list it is called with (one worker), and passes items on."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, items: list[int]) -> list[int]:
        with open(self.path, "a") as f:
            f.write(f"{len(items)}\n")
        return items


@pytest.mark.timeout(60)
def test_lists_are_full_and_a_partial_one_goes_after_max_wait(tmp_path):
    sizes = tmp_path / "sizes"
    stage = pc.Stage(ListSizes, args=(str(sizes),), batch_size=100, max_wait=0.2, workers=1)
    gate = threading.Event()

    def inputs():
        yield from range(250)
        gate.wait(30)  # the source goes quiet with 50 items short of a list: they go after max_wait

    with pc.LocalCluster(run_dir=str(tmp_path / "run")) as cluster:
        results = cluster.run([stage], inputs())
        outputs = [next(iter(results)) for _ in range(250)]  # all 250 arrive while the source is still open
        gate.set()
        outputs += list(results)
    assert sorted(outputs) == list(range(250))
    recorded = [int(line) for line in sizes.read_text().split()]
    assert sum(recorded) == 250 and recorded.count(100) == 2 and max(recorded) == 100


def words_of(lines: list[str]) -> list[list[str]]:
    return [line.split() for line in lines]


def wrong_length(items: list[int]) -> list[int]:
    return items[:-1]


@pytest.mark.timeout(60)
def test_generator_batch_stages_and_a_wrong_length_result(tmp_path):
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=1) as cluster:
        words = sorted(cluster.run([pc.Stage(words_of, batch_size=8, generator=True)],
                                   [f"w{i} x{i}" for i in range(20)]))
        assert words == sorted([f"w{i}" for i in range(20)] + [f"x{i}" for i in range(20)])
        assert list(cluster.run([pc.Stage(wrong_length, batch_size=4, supervision={"max_attempts": 1})],
                                range(4))) == []
        failures = cluster.failures()
    assert len(failures) == 4 and all(letter.error_type == "TypeError" for letter in failures)
    assert "must return a list of as many results" in failures[0].message


def crash_on_7(items: list[int]) -> list[int]:
    if 7 in items:
        os._exit(9)
    return items


@pytest.mark.timeout(90)
def test_a_crash_in_a_list_call_is_charged_only_to_its_cause(tmp_path):
    stage = pc.Stage(crash_on_7, batch_size=16, workers=2,
                     supervision={"max_attempts": 2, "backoff": (0.01, 0.05), "max_restarts": 20})
    outputs, failures, _ = run_stage(tmp_path, stage, range(64))
    assert outputs == [x for x in range(64) if x != 7]
    [letter] = failures
    assert letter.item == 7 and letter.attempts == 2 and letter.exit_code == 9


def test_bad_batch_stage_options_are_refused():
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        pc.Pipeline([pc.Stage(squares, batch_size=0)])
    with pytest.raises(ValueError, match="cannot also have concurrency"):
        pc.Pipeline([pc.Stage(squares, batch_size=8, concurrency=4)])
    with pytest.raises(ValueError, match="max_wait"):
        pc.Pipeline([pc.Stage(squares, batch_size=8, max_wait=-1)])
