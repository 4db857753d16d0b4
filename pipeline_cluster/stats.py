"""Per-stage item accounting: counts, time per item (mean and p95 from a bounded sample), workers, restarts."""
from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter, deque
from functools import partial
from itertools import accumulate
from dataclasses import dataclass, field, fields, replace
from typing import Any
from collections.abc import Iterable

SAMPLE_LIMIT = 4096
BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)  # seconds per item, upper bounds
RECENT_SECONDS = 5.0  # the window of the "recent" rates
SNAPSHOT_LIMIT = 256  # snapshots kept for them (a caller polling in a tight loop shortens the window)


@dataclass
class StageStats:
    """Counters of one stage on one node, or summed over nodes."""

    stage: str
    items_in: int = 0
    items_out: int = 0
    dropped: int = 0
    failed: int = 0
    retried: int = 0
    restarts: int = 0
    workers: int = 0
    queued: int = 0  # items waiting for a worker when the stats were taken
    peak_queued: int = 0  # the most items that ever waited at once on one node (backpressure bounds it)
    busy_seconds: float = 0.0
    timed_items: int = 0
    elapsed_seconds: float = 0.0  # since the stage's first worker was up (the longest of the nodes' when combined)
    node_seconds: float = 0.0  # the same summed over nodes
    worker_seconds: float = 0.0  # workers up, times seconds: what busy_seconds is a share of
    held_seconds: float = 0.0  # held back by the next stage (its queue full)
    starved_seconds: float = 0.0  # its queue empty
    samples: list[float] = field(default_factory=list, repr=False)
    buckets: list[float] = field(default_factory=lambda: [0.0] * (len(BUCKETS) + 1), repr=False)

    def add_timing(self, seconds: float, count: int, samples: list[float]) -> None:
        """Fold one batch's timing in; the sample stays bounded by keeping every other one when it is full (spread
        over the whole run like a random half, without a Python call per kept sample). The histogram counts every
        item of the run: each timed item stands for its share of the batch's items."""
        self.busy_seconds += seconds
        self.timed_items += count
        if samples:
            weight = count / len(samples)
            for bucket, times in Counter(map(partial(bisect_left, BUCKETS), samples)).items():
                self.buckets[bucket] += times * weight
        self.samples.extend(samples)
        if len(self.samples) > SAMPLE_LIMIT:
            del self.samples[::2]

    def copy(self) -> StageStats:
        """A snapshot that later batches do not change."""
        return replace(self, samples=list(self.samples), buckets=list(self.buckets))

    @property
    def mean_seconds(self) -> float | None:
        """Mean time per item in a worker."""
        return self.busy_seconds / self.timed_items if self.timed_items else None

    def percentile(self, share: float) -> float | None:
        """A percentile of the time per item (`share` 0.5 for the median), estimated from the sample."""
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]

    @property
    def p95_seconds(self) -> float | None:
        """95th percentile of time per item, estimated from the sample."""
        return self.percentile(0.95)

    def public(self) -> dict[str, Any]:
        """The user-facing dict: counts, mean and p95 seconds per item, workers and restarts."""
        hidden = ("samples", "buckets", "busy_seconds", "timed_items", "node_seconds", "worker_seconds",
                  "held_seconds", "starved_seconds")  # not asdict: it deep-copies the sample, float by float
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in hidden}
        data["mean_s"] = self.mean_seconds
        data["p50_s"] = self.percentile(0.5)
        data["p95_s"] = self.p95_seconds
        data["out_per_s"] = self.items_out / self.elapsed_seconds if self.elapsed_seconds else None
        data["busy"] = min(1.0, self.busy_seconds / self.worker_seconds) if self.worker_seconds else None
        data["held"] = self.held_seconds / self.node_seconds if self.node_seconds else None
        data["starved"] = self.starved_seconds / self.node_seconds if self.node_seconds else None
        data["seconds_histogram"] = {"le": [*BUCKETS, "+Inf"], "cumulative": list(accumulate(self.buckets)),
                                     "sum": self.busy_seconds, "count": self.timed_items}
        return data

    @classmethod
    def combine(cls, parts: Iterable[StageStats]) -> StageStats:
        """Sum the same stage over several nodes."""
        parts = list(parts)
        total = cls(parts[0].stage)
        for part in parts:
            for name in ("items_in", "items_out", "dropped", "failed", "retried", "restarts", "workers", "queued",
                         "busy_seconds", "timed_items", "node_seconds", "worker_seconds", "held_seconds",
                         "starved_seconds"):
                setattr(total, name, getattr(total, name) + getattr(part, name))
            total.buckets = [mine + theirs for mine, theirs in zip(total.buckets, part.buckets)]
            total.peak_queued = max(total.peak_queued, part.peak_queued)
            total.elapsed_seconds = max(total.elapsed_seconds, part.elapsed_seconds)
            total.samples.extend(part.samples)
        return total


class RecentRates:
    """Adds `in_per_s_recent` and `out_per_s_recent` to a run's merged stage figures: the rates since the newest
    earlier snapshot at least RECENT_SECONDS old (or, early in a run, the oldest one), so they follow a stage that
    speeds up or stalls where the since-start `out_per_s` barely moves. Snapshots are the figures' own earlier calls
    (stats.json is refreshed every few seconds, so there always are some)."""

    def __init__(self, window: float = RECENT_SECONDS) -> None:
        self.window = window
        self._snapshots: deque[tuple[float, dict[str, tuple[int, int]]]] = deque(maxlen=SNAPSHOT_LIMIT)
        self._lock = threading.Lock()

    def add(self, now: float, stages: dict[str, dict[str, Any]]) -> None:
        """Annotate `stages` (as `stats()` returns them) taken at `now` (a monotonic time), and keep them as a
        snapshot. Counts lower than a snapshot's mean a new run: earlier snapshots are dropped."""
        counts = {name: (figures["items_in"], figures["items_out"]) for name, figures in stages.items()}
        with self._lock:
            snapshots = self._snapshots
            if snapshots and any(counts.get(name, (0, 0))[1] < out for name, (_, out) in snapshots[-1][1].items()):
                snapshots.clear()
            while len(snapshots) > 1 and now - snapshots[1][0] >= self.window:
                snapshots.popleft()
            base = snapshots[0] if snapshots and now > snapshots[0][0] else None
            snapshots.append((now, counts))
        for name, figures in stages.items():
            if base is None or name not in base[1]:
                figures["in_per_s_recent"] = figures["out_per_s_recent"] = None
                continue
            seconds, (items_in, items_out) = now - base[0], base[1][name]
            figures["in_per_s_recent"] = (figures["items_in"] - items_in) / seconds
            figures["out_per_s_recent"] = (figures["items_out"] - items_out) / seconds


def format_table(stats: dict[str, dict[str, Any]]) -> str:
    """Render `cluster.stats()` as a plain text table ("out/s" since the start, "now/s" over the last seconds)."""
    header = ("stage", "in", "out", "out/s", "now/s", "busy", "queued", "dropped", "failed", "retried", "restarts",
              "workers", "mean ms", "p95 ms")
    rows = [header]
    for name, s in stats.items():
        busy = s.get("busy")
        rows.append((name, s["items_in"], s["items_out"], _rate(s.get("out_per_s")), _rate(s.get("out_per_s_recent")),
                     "-" if busy is None else f"{busy:.0%}", s["queued"], s["dropped"], s["failed"], s["retried"],
                     s["restarts"], s["workers"], _ms(s["mean_s"]), _ms(s["p95_s"])))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).rjust(w) if i else str(cell).ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join(lines)


def _rate(per_second: float | None) -> str:
    return "-" if per_second is None else f"{per_second:,.0f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.3f}"
