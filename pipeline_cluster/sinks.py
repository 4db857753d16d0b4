"""Sinks: where a durable run writes its outputs, committed together with its journal so each output is there
exactly once after any number of crashes and resumes.

A sink is any object with these four methods (`Sink` spells them out); `JsonLines` is the built-in one. For a
database table, `write` inserts rows in an open transaction, `commit` commits it and returns, say, the table's row
count, and `open(marker)` deletes the rows beyond that count (or a column holding the run's attempt) first.
"""
from __future__ import annotations

import json
import os
from typing import Any, Protocol
from collections.abc import Callable


class Sink(Protocol):
    """Where a durable run's outputs go."""

    def open(self, marker: str | None) -> None:
        """Start writing. `marker` is what `commit()` returned at the journal's last commit (None for a new run):
        drop whatever was written after that point, since those outputs' inputs run again."""

    def write(self, outputs: list) -> None:
        """Take a batch of outputs (not yet durable)."""

    def commit(self) -> str:
        """Make everything written so far durable and return a marker of this point; the journal stores it in
        the same transaction that records those outputs' inputs as complete."""

    def close(self) -> None:
        """Let go of the file or connection (after a last commit)."""


_json = json.JSONEncoder().encode  # json.dumps(output) with its default settings, without the per-call checks


class JsonLines:
    """Outputs as JSON lines appended to `path`. The marker is the file's length at the commit; on resume the file
    is cut back to it. `sync=True` also fsyncs at each commit, so a power cut (not only a crash of the process)
    loses nothing committed. `encode(output) -> str` replaces `json.dumps` (the CLI writes non-JSON outputs as
    their repr this way)."""

    def __init__(self, path: str | os.PathLike, *, sync: bool = False,
                 encode: Callable[[Any], str] = _json) -> None:
        self.path = os.fspath(path)
        self.sync = sync
        self.encode = encode
        self.fd: int | None = None
        self.size = 0

    def open(self, marker: str | None) -> None:
        """Create the file, or cut it back to the committed length `marker`."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | (0 if marker else os.O_TRUNC), 0o644)
        if marker is not None:
            committed, size = int(marker), os.fstat(fd).st_size
            if size < committed:
                os.close(fd)
                raise ValueError(f"{self.path} is shorter ({size} bytes) than at the run's last commit "
                                 f"({committed} bytes): it was changed outside the run")
            os.ftruncate(fd, committed)
        self.fd = fd
        self.size = os.lseek(fd, 0, os.SEEK_END)

    def write(self, outputs: list) -> None:
        """Append the outputs, one JSON line each."""
        if not outputs:
            return
        assert self.fd is not None, "open() first"
        data = memoryview(("\n".join(map(self.encode, outputs)) + "\n").encode())
        while data:
            written = os.write(self.fd, data)
            self.size += written
            data = data[written:]

    def commit(self) -> str:
        """The file's length (fsynced first with `sync=True`)."""
        if self.sync and self.fd is not None:
            os.fsync(self.fd)
        return str(self.size)

    def close(self) -> None:
        """Close the file."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
