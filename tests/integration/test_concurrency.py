"""Concurrent stages (`concurrency=N`): N items truly in flight at once in one worker, on threads or on an event loop;
a per-item timeout under concurrency; a crash among concurrent items charged only to the item that caused it."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

import pipeline_cluster as pc
from tests.helpers import run_stage


class Gauge:
    """A stage that records, inside the worker, how many of its items are in flight at once: each item holds its
    place for 50 ms and returns the most seen so far."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def _enter(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def _leave(self) -> int:
        with self.lock:
            self.now -= 1
            return self.peak

    def __call__(self, item: int) -> int:
        self._enter()
        time.sleep(0.05)
        return self._leave()


class AsyncGauge(Gauge):
    """The same with an `async def` __call__, on the worker's event loop."""

    async def __call__(self, item: int) -> int:  # type: ignore[override]
        self._enter()
        await asyncio.sleep(0.05)
        return self._leave()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stage_class", [Gauge, AsyncGauge])
def test_n_items_are_in_flight_at_once_in_one_worker(tmp_path, stage_class):
    stage = pc.Stage(stage_class, workers=1, concurrency=8, supervision={"max_attempts": 1})
    with pc.LocalCluster(run_dir=str(tmp_path / "run")) as cluster:
        peaks = list(cluster.run([stage], range(64)))
        failures = cluster.failures()
    assert failures == [] and len(peaks) == 64
    assert max(peaks) == 8  # eight at once, never more


def _slow_one(item: int) -> int:
    if item == 7:
        time.sleep(60)
    time.sleep(0.01)
    return item


async def _slow_one_async(item: int) -> int:
    await asyncio.sleep(60 if item == 7 else 0.01)
    return item


@pytest.mark.timeout(90)
@pytest.mark.parametrize("task", [_slow_one, _slow_one_async])
def test_a_timeout_under_concurrency_fails_only_the_slow_item(tmp_path, task):
    stage = pc.Stage(task, workers=1, concurrency=8, supervision={"timeout": 1.0, "max_attempts": 2})
    outputs, failures, stats = run_stage(tmp_path, stage, range(40))
    assert outputs == [x for x in range(40) if x != 7]
    [letter] = failures
    assert letter.item == 7 and letter.attempts == 2
    assert stats["retried"] == 1  # the slow item's second try; no neighbour was charged
    if task is _slow_one_async:  # cancelled on the worker's event loop: the worker lives on
        assert letter.error_type == "TimeoutError" and stats["restarts"] == 0
    else:  # a thread cannot be cancelled: its worker is replaced, the other items go back uncharged
        assert letter.cause == "timeout" and stats["restarts"] == 2


def _poison(item: int) -> int:
    time.sleep(0.02)
    if item == 13:
        os._exit(3)  # takes the whole worker, and every item in flight with it
    return item


@pytest.mark.timeout(90)
def test_a_crash_among_concurrent_items_is_charged_only_to_its_cause(tmp_path):
    stage = pc.Stage(_poison, workers=2, concurrency=8,
                     supervision={"max_attempts": 3, "backoff": (0.01, 0.05), "max_restarts": 20})
    outputs, failures, stats = run_stage(tmp_path, stage, range(100))
    assert outputs == [x for x in range(100) if x != 13]
    [letter] = failures
    assert letter.item == 13 and letter.attempts == 3 and letter.exit_code == 3
    assert stats["retried"] == 2 and stats["failed"] == 1  # neighbours in flight at each crash were never charged
