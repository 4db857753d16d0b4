"""Running up to N items of a batch at once in one worker process, for stages that wait on I/O (`concurrency=N`):
a plain task on a thread pool, an `async def` task on the worker's own event loop.

Each item's failure is its own, as in a sequential batch. For the supervisor's timeout and blame, the progress
record shows the item that has run longest: past the stage timeout, a thread-pool worker is killed and that item is
charged (the others go back uncharged). An async item past the timeout is cancelled and fails alone.
"""
from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline_cluster.messages import ItemError, Timing
from pipeline_cluster.worker.main import Outcome


class ConcurrentRunner:
    """Runs a batch's items up to `concurrency` at a time with `run_one(index, item) -> outputs | None` (which may
    raise); `timeout` bounds each async item."""

    def __init__(self, run_one: Callable[[int, Any], Any], concurrency: int, is_async: bool,
                 timeout: float | None, retry_on: tuple[type[BaseException], ...], publish: Callable[[int, float], None]
                 ) -> None:
        self.run_one = run_one
        self.concurrency = concurrency
        self.is_async = is_async
        self.timeout = timeout
        self.retry_on = retry_on
        self.publish = publish  # (index, start) of the item that has run longest; -1 when none runs
        self.running: dict[int, float] = {}
        self.lock = threading.Lock()
        self.pool = None if is_async else ThreadPoolExecutor(concurrency, thread_name_prefix="pipeline-cluster-task")
        self.loop = asyncio.new_event_loop() if is_async else None

    def run_batch(self, items: list) -> tuple[list[Outcome], Timing]:
        """Every item's outcome, in batch order, and the batch's timing (its wall time spread over its items)."""
        started = time.monotonic()
        if self.loop is not None:
            outcomes = self.loop.run_until_complete(self._run_async(items))
        else:
            assert self.pool is not None
            outcomes = list(self.pool.map(self._run_in_thread, range(len(items)), items))
        wall = time.monotonic() - started
        samples = [outcome.seconds for outcome in outcomes[:: max(1, len(items) // 64)]]
        return outcomes, Timing(wall, len(items), samples)

    def _started(self, index: int) -> float:
        now = time.monotonic()
        with self.lock:
            self.running[index] = now
            if len(self.running) == 1:
                self.publish(index, now)
        return now

    def _finished(self, index: int) -> None:
        with self.lock:
            del self.running[index]
            if self.running:
                oldest = min(self.running, key=self.running.__getitem__)
                self.publish(oldest, self.running[oldest])
            else:
                self.publish(-1, 0.0)

    def _run_in_thread(self, index: int, item: Any) -> Outcome:
        started = self._started(index)
        try:
            return Outcome(self.run_one(index, item), None, time.monotonic() - started)
        except Exception as exc:
            return Outcome(None, self._error(index, exc), time.monotonic() - started)
        finally:
            self._finished(index)

    async def _run_async(self, items: list) -> list[Outcome]:
        room = asyncio.Semaphore(self.concurrency)

        async def one(index: int, item: Any) -> Outcome:
            async with room:
                started = self._started(index)
                try:
                    awaitable = self.run_one(index, item)
                    outputs = await asyncio.wait_for(awaitable, self.timeout)
                    return Outcome(outputs, None, time.monotonic() - started)
                except asyncio.TimeoutError:
                    error = ItemError(index, "TimeoutError", f"item ran longer than the stage timeout of "
                                      f"{self.timeout} s and was cancelled", "", True)
                    return Outcome(None, error, time.monotonic() - started)
                except Exception as exc:
                    return Outcome(None, self._error(index, exc), time.monotonic() - started)
                finally:
                    self._finished(index)

        return list(await asyncio.gather(*(one(index, item) for index, item in enumerate(items))))

    def _error(self, index: int, exc: Exception) -> ItemError:
        try:
            message = str(exc)
        except Exception:
            message = repr(exc)
        return ItemError(index, type(exc).__name__, message, traceback.format_exc(), isinstance(exc, self.retry_on))

    def close(self) -> None:
        """Stop the thread pool or the event loop."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        if self.loop is not None:
            self.loop.close()
