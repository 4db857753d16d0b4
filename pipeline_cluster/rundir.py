"""The run directory: one per cluster run, holding its log, stats snapshot and dead letters."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from pipeline_cluster.messages import DeadLetter


def runs_root() -> Path:
    """Where runs live by default: $XDG_CACHE_HOME or ~/.cache, then pipeline_cluster/runs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pipeline_cluster" / "runs"


def new_run_id() -> str:
    """A sortable, unique run id: date, time and a random suffix."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class RunDir:
    """Files of one run: log.txt, stats.json, dead_letters.jsonl."""

    def __init__(self, path: str | os.PathLike | None = None, run_id: str | None = None) -> None:
        self.run_id = run_id or new_run_id()
        if path is None:
            root = runs_root()
            self.path = root / self.run_id
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            latest = root / "latest"
            try:
                tmp = root / f".latest-{self.run_id}"
                tmp.symlink_to(self.run_id)
                os.replace(tmp, latest)
            except OSError:
                pass
        else:  # the user's own directory: made private if we create it, left as it is otherwise
            self.path = Path(path)
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)

    @property
    def log_file(self) -> Path:
        """The cluster log."""
        return self.path / "log.txt"

    @property
    def stats_file(self) -> Path:
        """The stats snapshot."""
        return self.path / "stats.json"

    @property
    def dead_letter_file(self) -> Path:
        """Dead letters, one JSON object a line."""
        return self.path / "dead_letters.jsonl"

    def write_stats(self, snapshot: dict[str, Any], trouble: WriteTrouble) -> None:
        """Replace stats.json atomically, so a reader never sees half a file; a failed write is reported."""
        tmp = self.stats_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(snapshot, indent=2, default=str))
            os.replace(tmp, self.stats_file)
        except OSError as exc:
            trouble.failed(self.stats_file, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()


class WriteTrouble:
    """Writes under a run directory that failed (a full disk, say): each file is reported once on stderr when it
    first fails, and the records it lost are counted and summed up by `summary()`. The run itself goes on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lost: dict[str, int] = {}  # records lost per file since the last summary
        self.reported: set[str] = set()

    def failed(self, path: os.PathLike | str, error: OSError, records: int = 1) -> None:
        """`records` records could not be written to `path`."""
        with self.lock:
            first = str(path) not in self.reported
            self.reported.add(str(path))
            self.lost[str(path)] = self.lost.get(str(path), 0) + records
        if first:
            sys.stderr.write(f"pipeline_cluster: cannot write {path}: {error}; the run goes on without it "
                             "(records not written are counted)\n")

    def summary(self) -> None:
        """Say on stderr how many records each failing file lost, once, at the end of a run."""
        with self.lock:
            lost, self.lost = self.lost, {}
        for path, records in lost.items():
            if records:
                sys.stderr.write(f"pipeline_cluster: {records} record(s) could not be written to {path}\n")


def append_whole(path: Path, data: bytes) -> None:
    """Append `data` to the file (created owner-only), all of it or nothing: a failed write is cut off again."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


class DeadLetterStore:
    """A run's dead letters, kept in its dead_letters.jsonl and read back on demand, so memory does not grow with
    their number. Letters that cannot be written stay in memory (up to OVERFLOW of them) so none is lost silently.
    """

    OVERFLOW = 10_000
    LATEST = 10  # letters kept in memory too, for the dashboard's "recent dead letters"

    def __init__(self, path: Path, trouble: WriteTrouble) -> None:
        self.path = path
        self.trouble = trouble
        self.lock = threading.Lock()
        self.start = path.stat().st_size if path.exists() else 0  # an earlier cluster's letters are not ours
        self.stored = 0  # letters given a place (a seq) so far
        self.refed: set[int] = set()  # seqs fed again: no longer failures
        self.unwritten: list[DeadLetter] = []  # letters the disk refused
        self.dropped = 0  # letters refused beyond OVERFLOW: only counted
        self.latest: deque[DeadLetter] = deque(maxlen=self.LATEST)

    def __len__(self) -> int:
        return self.stored - len(self.refed) - self.dropped

    def add(self, letters: list[DeadLetter]) -> None:
        """Append letters to the file (a failed write leaves no half line behind)."""
        with self.lock:
            for letter in letters:
                letter.seq = self.stored
                self.stored += 1
            self.latest.extend(letters)
            data = "".join(letter.to_json() + "\n" for letter in letters).encode()
            try:
                append_whole(self.path, data)
            except OSError as exc:
                self.trouble.failed(self.path, exc, len(letters))
                room = max(0, self.OVERFLOW - len(self.unwritten))
                self.unwritten.extend(letters[:room])
                self.dropped += len(letters) - min(room, len(letters))

    def read(self) -> list[DeadLetter]:
        """Every dead letter of the run that was not fed again, oldest first."""
        with self.lock:
            letters: list[DeadLetter] = []
            if self.path.exists():
                with open(self.path, "rb") as f:
                    f.seek(self.start)
                    letters = [DeadLetter.from_json(line.decode()) for line in f if line.endswith(b"\n")]
            letters += self.unwritten
            return [letter for letter in letters if letter.seq not in self.refed]

    def recent(self) -> list[DeadLetter]:
        """The last few dead letters (at most LATEST) not fed again, newest first, without reading the file."""
        with self.lock:
            return [letter for letter in reversed(self.latest) if letter.seq not in self.refed]

    def forget(self, letters: Iterable[DeadLetter]) -> None:
        """These letters were fed again: they are failures no more."""
        with self.lock:
            self.refed.update(letter.seq for letter in letters if letter.seq is not None)


def find_run(run: str | None = None) -> Path:
    """A run directory by id or path; the latest run when `run` is None."""
    if run and Path(run).is_dir():
        return Path(run)
    path = runs_root() / (run or "latest")
    if not path.exists():
        raise FileNotFoundError(f"no run directory {path}" + ("" if run else " (no run yet)"))
    return path.resolve()
