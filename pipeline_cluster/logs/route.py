"""Where this process's log records go: a worker's socket, a LogActor, a log server, or stderr.

Inside a task, `log(msg)` and stdlib `logging` records travel to the cluster's LogActor, which writes them with time,
node, pid and stage. Outside a cluster process, `log()` goes to the log server set by `configure(addr)`, or to
stderr when there is none.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any
from collections.abc import Callable

from pipeline_cluster.logs.records import Record


class _Route:
    """Where this process's records go: a sink function (worker pipe, LogActor, log server) or stderr."""

    def __init__(self) -> None:
        self.sink: Callable[[Record], None] | None = None
        self.node: str | None = None
        self.stage: str | None = None
        self.lock = threading.Lock()

    def emit(self, record: Record) -> None:
        sink = self.sink
        if sink is None:
            sys.stderr.write(record.format() + "\n")
            return
        try:
            sink(record)
        except Exception as exc:  # the route is gone (pipe closed, server down): never lose the line silently
            sys.stderr.write(f"{record.format()}  (log route failed: {exc})\n")


_route = _Route()


class ForwardHandler(logging.Handler):
    """A stdlib logging handler that sends records along this process's route."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            _route.emit(Record(record.created, record.levelno, record.name, message,
                               _route.node, os.getpid(), _route.stage))
        except Exception:
            self.handleError(record)


def make_record(msg: Any, level: int = logging.INFO, logger: str = "task") -> Record:
    """A Record for `msg` stamped with this process's node, pid and stage."""
    return Record(time.time(), level, logger, str(msg), _route.node, os.getpid(), _route.stage)


_clients: dict[tuple[str, int], LogClient] = {}


def log(msg: Any, addr: tuple[str, int] | None = None, level: int = logging.INFO) -> None:
    """Log `msg` from anywhere: a task, the root, a node; to the log server at `addr` when given (the older
    project's form). Never blocks on a missing server."""
    record = make_record(msg, level)
    if addr is None:
        _route.emit(record)
        return
    key = (addr[0], int(addr[1]))
    with _route.lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = LogClient(key)
    client(record)


def attach_worker(sink: Callable[[Record], None], node: str | None, stage: str | None, level: int) -> None:
    """In a worker process: route `log()` and stdlib logging to the WorkerActor through `sink`."""
    _route.sink, _route.node, _route.stage = sink, node, stage
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(ForwardHandler())
    root.setLevel(level)


def attach_local(sink: Callable[[Record], None] | None, node: str | None = None) -> None:
    """In a root or node process: route `log()` to a LogActor's sink (None detaches)."""
    _route.sink, _route.node = sink, node


def detach_local(sink: Callable[[Record], None]) -> None:
    """Stop routing `log()` to `sink`, if it still is the route (another cluster may have taken it since)."""
    if _route.sink == sink:
        attach_local(None)


class LogClient:
    """Sends records to a log server; when none answers, writes to stderr (saying so once) and retries later."""

    RETRY_SECONDS = 10.0

    def __init__(self, addr: tuple[str, int], authkey: bytes | str | None = None, timeout: float = 2.0) -> None:
        from pipeline_cluster.transport.auth import resolve_authkey

        self.addr = (addr[0], int(addr[1]))
        self.authkey = resolve_authkey(authkey)
        self.timeout = timeout
        self.channel: Any = None
        self.down_since: float | None = None
        self.warned = False
        self.lock = threading.Lock()

    def __call__(self, record: Record) -> None:
        with self.lock:
            if self.channel is None and not self._connect():
                sys.stderr.write(record.format() + "\n")
                return
            try:
                self.channel.send(record)
            except OSError:
                self.channel = None
                sys.stderr.write(record.format() + "\n")

    def _connect(self) -> bool:
        from pipeline_cluster.transport import wire

        if self.down_since is not None and time.monotonic() - self.down_since < self.RETRY_SECONDS:
            return False
        try:
            self.channel = wire.connect(self.addr, self.authkey, timeout=self.timeout)
            self.down_since = None
            return True
        except (OSError, EOFError) as exc:
            self.down_since = time.monotonic()
            if not self.warned:
                self.warned = True
                sys.stderr.write(f"pipeline_cluster: log server {self.addr[0]}:{self.addr[1]} unreachable ({exc}); "
                                 "logging to stderr until it answers\n")
            return False


def configure(addr: tuple[str, int], authkey: bytes | str | None = None) -> None:
    """Send this process's `log()` records to the log server at `addr` (the seed's call)."""
    _route.sink = LogClient(addr, authkey)


def emit(record: Record) -> None:
    """Send an already made record along this process's route (a node forwarding its workers' records)."""
    _route.emit(record)
