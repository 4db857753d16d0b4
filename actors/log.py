"""LogActor: the cluster's log. Receives records from every process and writes them to a file and/or stderr.

A log that cannot be written (a full disk) never stops the pipeline: the failure is reported once, the records
that could not be written are counted, and writing resumes when the file takes lines again.
"""
from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import IO

from tqdm import tqdm

from pipeline_cluster.actors.base import Actor, handles
from pipeline_cluster.logs.records import Record
from pipeline_cluster.messages import LogTo
from pipeline_cluster.placement import Placement
from pipeline_cluster.rundir import WriteTrouble


class LogActor(Actor):
    """Writes each record as one line (time, level, node, pid, stage, message)."""

    def __init__(self, path: str | None, to_stderr: bool = False, stderr_level: int = 30,
                 placement: Placement | None = None, forward: Callable[[Record], None] | None = None,
                 trouble: WriteTrouble | None = None, room: threading.Semaphore | None = None) -> None:
        """`forward` also gets every record (a log server's client, say); `room` is released once per record
        written, for a sender that bounds how many records may wait here."""
        super().__init__()
        self.placement = placement or Placement()
        self.forward = forward
        self.path = path
        self.to_stderr = to_stderr
        self.stderr_level = stderr_level
        self.trouble = trouble or WriteTrouble()
        self.room = room
        self.file: IO[str] | None = None

    def on_start(self) -> None:
        super().on_start()
        self._open()

    def _open(self) -> None:
        if self.path:
            try:
                self.file = open(self.path, "a", buffering=1, encoding="utf-8")
            except OSError as exc:
                self.trouble.failed(self.path, exc, 0)

    @handles(LogTo)
    def on_log_to(self, message: LogTo) -> None:
        self._close()
        old, self.path = self.path, message.path
        self._open()
        if message.move and old and self.file is not None:
            try:
                with open(old, encoding="utf-8") as lines:
                    self.file.write(lines.read())
                os.unlink(old)
                os.rmdir(os.path.dirname(old))
            except OSError:  # the old directory holds more than the log: it stays
                pass

    @handles(Record)
    def on_record(self, record: Record) -> None:
        if self.room is not None:
            self.room.release()
        line = record.format() + "\n"
        if self.file is not None:
            try:
                self.file.write(line)
            except OSError as exc:
                self.trouble.failed(self.path or "the log", exc)
        if self.to_stderr or record.level >= self.stderr_level:
            tqdm.write(line, file=sys.stderr, end="")  # above a progress bar, if one is showing
        if self.forward is not None:
            self.forward(record)

    def _close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError as exc:  # the last buffered line did not fit either
                self.trouble.failed(self.path or "the log", exc)
            self.file = None

    def on_stop(self) -> None:
        self._close()
