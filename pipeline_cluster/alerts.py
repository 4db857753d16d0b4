"""Warnings a person should see while a run goes on (items dead-lettered, workers restarted), as summaries: the
first occurrence at once, then at most one line per subject every INTERVAL seconds, and what is left at the end."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Alerts:
    """Rate-limited summaries per subject (a stage, say), handed to `emit` as one line each."""

    INTERVAL = 5.0

    def __init__(self, emit: Callable[[str], None], what: str, interval: float = INTERVAL) -> None:
        """`what` names the events counted, e.g. "item(s) dead-lettered"."""
        self.emit = emit
        self.what = what
        self.interval = interval
        self.lock = threading.Lock()
        self.totals: dict[str, int] = {}  # subject -> events so far
        self.first: dict[str, str] = {}  # subject -> what the first event was
        self.unsaid: set[str] = set()  # subjects with events not yet in a line
        self.said_at: dict[str, float] = {}

    def count(self, subject: str, n: int, detail: str) -> None:
        """`n` more events for `subject` (e.g. "stage parse"); `detail` describes the first of them. Says so now if
        this subject has been quiet for the interval."""
        now = time.monotonic()
        with self.lock:
            self.totals[subject] = self.totals.get(subject, 0) + n
            self.first.setdefault(subject, detail)
            self.unsaid.add(subject)
            if now - self.said_at.get(subject, now - self.interval) < self.interval:
                return
            self.said_at[subject] = now
            line = self._line(subject)
        self.emit(line)

    def _line(self, subject: str) -> str:
        self.unsaid.discard(subject)
        return f"{subject}: {self.totals[subject]} {self.what} so far (first: {self.first[subject]})"

    def flush(self) -> None:
        """Say what is still unsaid (at the end of a run), and start counting afresh."""
        with self.lock:
            lines = [self._line(subject) for subject in sorted(self.unsaid)]
            self.totals.clear()
            self.first.clear()
            self.said_at.clear()
        for line in lines:
            self.emit(line)
