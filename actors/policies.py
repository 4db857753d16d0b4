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


ERROR_WEIGHT = 16  # a failed item comes back with its traceback and message: as heavy as this many outputs


def reply_weight(outputs: int, errors: int, items: int) -> float:
    """What a batch's reply carried per input item, in outputs: its outputs, and each error as ERROR_WEIGHT of
    them, so batches of failing items shrink as those of generators do and dead letters in flight stay few."""
    return (outputs + ERROR_WEIGHT * errors) / items


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


# -- autoscaling: a node's CPUs moved between its stages by busy share ------------------------------------------------

REBALANCE_SECONDS = 0.5  # how often a node looks at its autoscaled stages
HOT = 0.8  # a stage busy this share of the last round wants a worker more ...
COLD = 0.5  # ... and one busy at most this share can give one up
COOLDOWN = 2  # rounds without a move after a move, so a stage's new size shows in its figures first
PILED_UP = 1000  # items queued at a busy stage: the stages before it run ahead, and can spare a worker


class Autoscaler:
    """Sizes a node's autoscaled stages (`workers="auto"` or (min, max)): they start with an even share of the node's
    CPUs, and each round at most one worker moves to a stage that was busy 80% of the time or more, from one that
    was idle at least half of it, or from one before it when its queue has piled up (that stage runs ahead of it);
    or the busy stage grows, while the node has CPUs to spare. Never below a stage's min or above its max; then
    nothing moves for COOLDOWN rounds."""

    def __init__(self, sizes: list[int], bounds: dict[int, tuple[int, int]], budget: int) -> None:
        self.workers = sizes  # per stage index
        self.bounds = bounds  # stage index -> (min, max), autoscaled stages only
        self.budget = budget
        self.seen: dict[int, tuple[float, float]] = {}  # stage -> (busy seconds, worker seconds) a round ago
        self.quiet = 0

    @classmethod
    def for_stages(cls, stages: list, budget: int) -> Autoscaler | None:
        """An autoscaler for these stages (with `.workers` and `.autoscaled`), or None if none is autoscaled."""
        bounds: dict[int, tuple[int, int]] = {}
        for index, stage in enumerate(stages):
            if stage.autoscaled is not None:
                low, high = stage.autoscaled
                bounds[index] = (low, budget if high is None else high)
        if not bounds:
            return None
        share = max(1, budget // len(bounds))
        sizes = [min(max(share, bounds[i][0]), bounds[i][1]) if i in bounds else stage.workers or budget
                 for i, stage in enumerate(stages)]
        return cls(sizes, bounds, budget)

    def initial(self, index: int) -> int:
        """Workers stage `index` starts with."""
        return self.workers[index]

    def moves(self, stats: list) -> list[tuple[int, int, str]]:
        """This round's changes, as (stage index, new worker count, why), from the stages' StageStats."""
        shares: dict[int, float] = {}
        for index in self.bounds:
            busy, spent = stats[index].busy_seconds, stats[index].worker_seconds
            before_busy, before_spent = self.seen.get(index, (0.0, 0.0))
            self.seen[index] = (busy, spent)
            if spent > before_spent:
                shares[index] = (busy - before_busy) / (spent - before_spent)
        if self.quiet:
            self.quiet -= 1
            return []
        hot = [i for i, share in shares.items() if share >= HOT and self.workers[i] < self.bounds[i][1]]
        if not hot:
            return []
        taker = max(hot, key=shares.__getitem__)
        piled_up = stats[taker].queued >= PILED_UP
        cold = [i for i, share in shares.items() if i != taker and self.workers[i] > self.bounds[i][0]
                and (share <= COLD or (piled_up and i < taker))]
        changes = []
        if cold:
            giver = min(cold, key=shares.__getitem__)
            self.workers[giver] -= 1
            why = "gives a worker up" if shares[giver] <= COLD else f"runs ahead of stage {taker}: gives a worker up"
            changes.append((giver, self.workers[giver], f"busy {shares[giver]:.0%}: {why}"))
        elif sum(self.workers[i] for i in self.bounds) >= self.budget:
            return []
        self.workers[taker] += 1
        changes.append((taker, self.workers[taker], f"busy {shares[taker]:.0%}: takes a worker"))
        self.quiet = COOLDOWN
        return changes
