"""The actors' decisions as plain functions: how much credit a node gets, when it gets more, how big a batch is,
and when a stage holds the one before it back. No state, no actors: each is unit-tested on its own.
"""
from __future__ import annotations

import math

# -- credit: how many unfinished root items a node may hold -----------------------------------------------------------

DEFAULT_CREDIT = 1024  # per node, until its first size report
MIN_CREDIT = 16
MAX_CREDIT = 8192
BYTE_BUDGET = 32 * 1024 * 1024  # pickled input bytes a node may hold
REFILL = 8  # a node gets more root items once this fraction (1/REFILL) of its credit is free


def credit_for(bytes_per_item: float) -> int:
    """Credit that keeps a node's unfinished inputs within the byte budget: deep queues for tiny items."""
    return max(MIN_CREDIT, min(MAX_CREDIT, int(BYTE_BUDGET / max(bytes_per_item, 1.0))))


def free_credit(credit: int, held: int) -> int | None:
    """Root items a node may be sent now, or None while less than 1/REFILL of its credit is free (so a busy node
    gets work in few large messages rather than one small one per completion)."""
    free = credit - held
    return free if free >= math.ceil(credit / REFILL) else None


def capacity(credits: list[int]) -> int:
    """Root items the caller may have unfinished: every node's credit, plus the largest as backlog at the root."""
    return sum(credits) + max(credits, default=0)


# -- batches: how many items a worker gets at once --------------------------------------------------------------------

DEPTH = 2  # batches in flight per worker: the next one waits in the worker's inbox, no idle round trip
MAX_BATCH = 4096
TARGET_BATCH_SECONDS = 0.05  # a batch's work, by the measured time per item
MIN_BATCH_SECONDS = 0.005  # splitting a queue over workers never cuts batches below this much work
MAX_BATCH_BYTES = 4 * 1024 * 1024  # a batch of big items stays this small, so sending and running overlap


def batch_size(seconds_per_item: float | None, queued: int, ready_workers: int, fanout: float,
               bytes_per_item: float | None, concurrency: int = 1) -> int:
    """Items for the next batch: about TARGET_BATCH_SECONDS of work, the queue shared fairly over the ready workers
    (but never below MIN_BATCH_SECONDS of work), fewer when each item fans out or is big; one item until the time
    per item is known. A worker that runs `concurrency` items at once gets at least that many, as far as there are
    (the time per item is then wall time over the items run together)."""
    if seconds_per_item is None:
        by_time = fair = 1
    else:
        per_item = max(seconds_per_item, 1e-7)
        by_time = int(TARGET_BATCH_SECONDS / per_item)
        fair = max(math.ceil(queued / max(1, ready_workers * DEPTH)), int(MIN_BATCH_SECONDS / per_item))
    by_fanout = int(MAX_BATCH / max(fanout, 1.0))
    by_bytes = int(MAX_BATCH_BYTES / bytes_per_item) if bytes_per_item else MAX_BATCH
    return max(1, min(concurrency, queued), min(by_time, fair, by_fanout, by_bytes))


def moving_average(old: float | None, new: float, weight: float = 0.3) -> float:
    """An exponentially weighted moving average; the first value stands alone."""
    return new if old is None else (1 - weight) * old + weight * new


# -- backpressure between stages --------------------------------------------------------------------------------------

HIGH_WATER = 8192  # queued items at which the stage before this one stops sending new batches
LOW_WATER = HIGH_WATER // 2  # ... and at which it may go on


def hold_back(queued: int, holding: bool) -> bool:
    """Whether the previous stage should hold back: from HIGH_WATER queued items until the queue is down to
    LOW_WATER (the gap keeps it from flapping)."""
    return queued > LOW_WATER if holding else queued >= HIGH_WATER
