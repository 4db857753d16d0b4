"""The journal of a durable run: which inputs are complete, its dead letters and counters, in the run directory's
`journal.sqlite` (stdlib sqlite3, WAL mode: one small transaction per commit, readable while the run writes).

An input is complete once every output of it was handed to the consumer (or written to the sink) or it was
dead-lettered. Inputs are named by their position in the input stream, kept as spans of positions (a few rows,
however long the run), or by the value `key=` gives them. A run is locked (flock on `run.lock`) while a driver
runs it, so `runs` tells a crashed run (state "running", lock free) from a live one.
"""
from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import re
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any
from collections.abc import Collection, Iterable, Iterator

from pipeline_cluster.errors import ClusterError
from pipeline_cluster.messages import DeadLetter
from pipeline_cluster.model import Pipeline

JOURNAL = "journal.sqlite"
LOCK = "run.lock"
FORMAT = 1
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS done_keys (key TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY, input TEXT, origin INTEGER, refed INTEGER NOT NULL DEFAULT 0, letter TEXT NOT NULL);
"""


class RunExists(ClusterError):
    """A run id that exists was given without `resume=True`."""


class IdentityChanged(ClusterError):
    """`resume=True` for a run made by a different pipeline (its code or config changed)."""


class RunLocked(ClusterError):
    """Another driver is running this run now."""


def check_run_id(run_id: Any) -> str:
    """A run id is a directory name: letters, digits, '.', '_', '-'."""
    if not isinstance(run_id, str) or not RUN_ID.match(run_id) or run_id == "latest":
        raise ValueError(f"run_id must be a name of letters, digits, '.', '_' and '-' (not 'latest'), got {run_id!r}")
    return run_id


def pipeline_identity(pipeline: Pipeline) -> str:
    """A hash of what decides a pipeline's outputs: its name, version, and per stage the task's source code, kind,
    arguments and failure handling (not worker counts, which only change speed)."""
    digest = hashlib.sha256()
    for part in (pipeline.name, pipeline.version):
        digest.update(repr(part).encode() + b"\0")
    for stage in pipeline.stages:
        supervision = stage.supervision
        for part in (stage.name, _source(stage.task), stage.generator, stage.batch_size, stage.args,
                     sorted(stage.kwargs.items()) if isinstance(stage.kwargs, dict) else stage.kwargs,
                     supervision.max_attempts, supervision.on_failure, supervision.timeout):
            digest.update(repr(part).encode() + b"\0")
    return digest.hexdigest()[:16]


def _source(task: Any) -> str:
    """The task's source text; its qualified name and bytecode when the source cannot be read (a lambda typed in
    a REPL, a builtin)."""
    with contextlib.suppress(OSError, TypeError):
        return inspect.getsource(task)
    code = getattr(task, "__code__", None)
    return f"{getattr(task, '__module__', '')}.{getattr(task, '__qualname__', repr(task))}" + (
        code.co_code.hex() if code is not None else "")


class Spans:
    """A set of input positions as sorted, disjoint half-open spans [start, end); adding merges neighbours."""

    def __init__(self, spans: Iterable[tuple[int, int]] = ()) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        for start, end in spans:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        """Add the positions start..end-1."""
        if end <= start:
            return
        starts, ends = self.starts, self.ends
        first = bisect.bisect_left(ends, start)  # the first span that ends at or after `start` may merge
        last = bisect.bisect_right(starts, end)  # spans starting after `end` stay apart
        if first < last:
            start = min(start, starts[first])
            end = max(end, ends[last - 1])
        starts[first:last] = [start]
        ends[first:last] = [end]

    def __contains__(self, position: int) -> bool:
        index = bisect.bisect_right(self.starts, position) - 1
        return index >= 0 and position < self.ends[index]

    def __len__(self) -> int:
        """How many positions are in the set."""
        return sum(self.ends) - sum(self.starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self.starts, self.ends)

    def gaps(self) -> Iterator[tuple[int, int | None]]:
        """The positions not in the set, as spans; the last one is open-ended (end None)."""
        position = 0
        for start, end in self:
            if start > position:
                yield position, start
            position = end
        yield position, None


class Journal:
    """One run's journal: opened (and locked) by the driver that runs it, or read by `pipeline-cluster runs`."""

    def __init__(self, path: Path, lock_fd: int | None = None) -> None:
        self.path = path
        self.lock_fd = lock_fd
        self.db = sqlite3.connect(path / JOURNAL, isolation_level=None, check_same_thread=False, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # a commit survives a crash of the process; `sync` for power
        self.db.execute("PRAGMA cache_size=-512")  # 512 KiB: the journal is written, rarely read back
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()
        self.before: dict[str, Any] = {}  # the run's facts as the last attempt left them (empty for a new run)

    # -- opening ---------------------------------------------------------------------------------------------------

    @classmethod
    def start(cls, path: Path, pipeline: Pipeline, resume: bool | str, by_key: bool) -> Journal:
        """Open the journal of the run in `path` for a driver: a new run, or (with `resume`) the existing one after
        checking it was made by the same pipeline (`resume="force"` skips that check)."""
        if resume not in (True, False, "force"):
            raise ValueError(f"resume must be True, False or 'force', got {resume!r}")
        exists = (path / JOURNAL).exists()
        if exists and not resume:
            raise RunExists(f"run {path.name!r} exists already ({path}): pass resume=True to go on with it "
                            f"(--resume {path.name} on the command line), or choose another run_id")
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            holder = _read_meta(path).get("pid")
            raise RunLocked(f"run {path.name!r} is running now (driver pid {holder}): wait for it, or stop it "
                            "first") from None
        journal = cls(path, lock_fd)
        try:
            meta = journal.meta()
            identity = pipeline_identity(pipeline)
            mode = "key" if by_key else "position"
            journal.before = meta
            if meta:
                journal._check_same(meta, pipeline, identity, mode, force=resume == "force")
            else:
                journal._write_meta({"format": FORMAT, "run_id": path.name, "pipeline": pipeline.name,
                                     "version": str(pipeline.version), "identity": identity, "inputs_by": mode,
                                     "started": time.time(), "spans": [], "complete": 0, "outputs": 0,
                                     "total": None, "sink": None, "attempts": 0})
            journal._forget_unfinished()
            journal._write_meta({"state": "running", "pid": os.getpid(), "host": socket.gethostname(),
                                 "attempts": journal.meta().get("attempts", 0) + 1, "updated": time.time(),
                                 "identity": identity})
        except BaseException:
            journal.close()
            raise
        return journal

    def _check_same(self, meta: dict[str, Any], pipeline: Pipeline, identity: str, mode: str, force: bool) -> None:
        if meta.get("inputs_by") != mode:
            raise IdentityChanged(f"run {self.path.name!r} named its inputs by {meta.get('inputs_by')}; "
                                  f"this run names them by {mode}: give (or leave out) key= as the first time")
        if meta.get("identity") != identity and not force:
            raise IdentityChanged(
                f"run {self.path.name!r} was made by pipeline {meta.get('pipeline')!r} version "
                f"{meta.get('version')!r} (identity {meta.get('identity')}); this pipeline, {pipeline.name!r} version "
                f"{pipeline.version!r}, is {identity}: its code or settings changed. Pass resume='force' (--force on "
                "the command line) to resume anyway, or start a new run_id")

    def _forget_unfinished(self) -> None:
        """Drop dead letters of inputs that are not complete (they run again), and those of refeeds whose letter
        was not marked fed again: a crash left them without the commit that made them final."""
        spans = self.spans()
        keys = self.meta().get("inputs_by") == "key"
        with self.lock, self._transaction():
            self.db.execute("DELETE FROM dead_letters WHERE origin IS NOT NULL AND origin IN "
                            "(SELECT seq FROM dead_letters WHERE refed = 0)")
            if keys:
                self.db.execute("DELETE FROM dead_letters WHERE origin IS NULL AND input NOT IN "
                                "(SELECT key FROM done_keys)")
            else:
                stale = [(seq,) for seq, input_id in self.db.execute(
                    "SELECT seq, input FROM dead_letters WHERE origin IS NULL")
                    if not isinstance(position := json.loads(input_id), int) or position not in spans]
                self.db.executemany("DELETE FROM dead_letters WHERE seq = ?", stale)

    # -- reading -----------------------------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        """The run's facts and counters."""
        with self.lock:
            return {name: json.loads(value) for name, value in self.db.execute("SELECT name, value FROM meta")}

    def spans(self) -> Spans:
        """The complete input positions."""
        return Spans(self.meta().get("spans", []))

    def done_keys(self) -> set[str]:
        """The complete inputs of a key= run, as their keys' JSON."""
        with self.lock:
            return {key for (key,) in self.db.execute("SELECT key FROM done_keys")}

    def next_seq(self) -> int:
        """The place the next dead letter gets."""
        with self.lock:
            (last,) = self.db.execute("SELECT max(seq) FROM dead_letters").fetchone()
        return 0 if last is None else last + 1

    def letters(self, hidden: Collection[int] = ()) -> list[DeadLetter]:
        """Dead letters not fed again (nor in `hidden`), oldest first."""
        with self.lock:
            rows = self.db.execute("SELECT seq, letter FROM dead_letters WHERE refed = 0 ORDER BY seq").fetchall()
        return [DeadLetter.from_json(text) for seq, text in rows if seq not in hidden]

    def count_letters(self) -> int:
        """Dead letters not fed again."""
        with self.lock:
            (count,) = self.db.execute("SELECT count(*) FROM dead_letters WHERE refed = 0").fetchone()
        return int(count)

    # -- writing -----------------------------------------------------------------------------------------------------

    def commit(self, changes: dict[str, Any], keys: list[str], letters: list[tuple[DeadLetter, Any, int | None]],
               refed: list[int]) -> None:
        """One transaction: meta `changes`, newly complete `keys`, new dead letters (letter, input id, origin
        seq) and letters now fed again."""
        with self.lock, self._transaction():
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                [(name, json.dumps(value)) for name, value in changes.items()])
            if keys:
                self.db.executemany("INSERT OR IGNORE INTO done_keys VALUES (?)", [(key,) for key in keys])
            if letters:
                self.db.executemany("INSERT OR REPLACE INTO dead_letters (seq, input, origin, letter) "
                                    "VALUES (?, ?, ?, ?)",
                                    ((letter.seq, json.dumps(input_id), origin, letter.to_json())
                                     for letter, input_id, origin in letters))  # one JSON text alive at a time
            if refed:
                self.db.executemany("UPDATE dead_letters SET refed = 1 WHERE seq = ?", [(seq,) for seq in refed])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """All of the block's statements or none (the connection is in autocommit mode otherwise)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:  # SQLite ends some failed transactions itself (a full disk, say)
                self.db.execute("ROLLBACK")
            raise

    def _write_meta(self, changes: dict[str, Any]) -> None:
        self.commit(changes, [], [], [])

    def close(self) -> None:
        """Close the database and let go of the run's lock."""
        with self.lock:
            self.db.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def _read_meta(path: Path) -> dict[str, Any]:
    """A run's meta table, read without taking its lock (empty when it has no journal)."""
    if not (path / JOURNAL).exists():
        return {}
    db = sqlite3.connect(f"file:{path / JOURNAL}?mode=ro", uri=True, timeout=10)
    try:
        return {name: json.loads(value) for name, value in db.execute("SELECT name, value FROM meta")}
    except sqlite3.Error:
        return {}
    finally:
        db.close()


def is_locked(path: Path) -> bool:
    """A driver holds this run's lock (it is running now)."""
    try:
        fd = os.open(path / LOCK, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def describe(path: Path) -> dict[str, Any] | None:
    """One run directory as `pipeline-cluster runs` lists it; None when it holds no journal."""
    meta = _read_meta(path)
    if not meta:
        return None
    state = meta.get("state", "?")
    if state == "running" and not is_locked(path):
        state = "crashed"
    with sqlite3.connect(f"file:{path / JOURNAL}?mode=ro", uri=True, timeout=10) as db:
        (letters,) = db.execute("SELECT count(*) FROM dead_letters WHERE refed = 0").fetchone()
    return {"run_id": path.name, "pipeline": meta.get("pipeline"), "started": meta.get("started"),
            "updated": meta.get("updated"), "state": state, "complete": meta.get("complete", 0),
            "total": meta.get("total"), "dead_letters": letters, "outputs": meta.get("outputs", 0), "path": str(path)}
