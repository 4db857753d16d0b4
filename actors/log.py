"""LogActor: the cluster's log. Receives records from every process and writes them to a file and/or stderr."""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import IO

from pipeline_cluster.actors.base import Actor, handles
from pipeline_cluster.logs.records import Record
from pipeline_cluster.placement import Placement


class LogActor(Actor):
    """Writes each record as one line (time, level, node, pid, stage, message)."""

    def __init__(self, path: str | None, to_stderr: bool = False, stderr_level: int = 30,
                 placement: Placement | None = None, forward: Callable[[Record], None] | None = None) -> None:
        """`forward` also gets every record (a log server's client, say)."""
        super().__init__()
        self.forward = forward
        self.placement = placement or Placement()
        self.path = path
        self.to_stderr = to_stderr
        self.stderr_level = stderr_level
        self.file: IO[str] | None = None

    def on_start(self) -> None:
        super().on_start()
        if self.path:
            self.file = open(self.path, "a", buffering=1, encoding="utf-8")

    @handles(Record)
    def on_record(self, record: Record) -> None:
        line = record.format()
        if self.file is not None:
            self.file.write(line + "\n")
        if self.to_stderr or record.level >= self.stderr_level:
            sys.stderr.write(line + "\n")
        if self.forward is not None:
            self.forward(record)

    def on_stop(self) -> None:
        if self.file is not None:
            self.file.close()
