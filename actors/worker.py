"""WorkerActor: one worker process of a stage, driven from one actor thread.

The actor waits on the process's socket and its own inbox at once: it forwards results and log records, sends a
batch that had to wait for the process, notices at once when the process dies (EOF on the socket), reads which item
was running from the shared progress record, and enforces the per-item timeout by killing the process.
"""
from __future__ import annotations

import select
import sys
import time
import traceback as traceback_module
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

import pykka

from pipeline_cluster.actors.base import POLL_SLICE, Actor, PollingInbox, handles, tell
from pipeline_cluster.logs.records import Record
from pipeline_cluster.messages import (BatchDone, BatchResult, BatchUnreadable, Death, InitFailed, Part, PartDone,
                                       Readable, SendBatch, Started, Stop, Stopped, StopWorker, Tick, Unreadable,
                                       WorkerDied, WorkerInit, WorkerReady)
from pipeline_cluster.placement import Placement
from pipeline_cluster.transport import wire
from pipeline_cluster.worker.process import WorkerProcess, describe_exit


@dataclass
class WorkerConfig:
    """What a worker needs to start: the stage payload and where its logs and reports go."""

    stage_name: str
    spec: bytes
    retry_on: bytes
    timeout: float | None  # the watchdog: past it, the longest-running item's process is killed
    node: str
    log_level: int
    log_sink: Callable[[Any], None]
    placement: Placement = field(default_factory=Placement)
    item_timeout: float | None = None  # the stage timeout, for the worker to apply itself (async items)
    start_timeout: float = 60.0
    sys_path: list[str] = field(default_factory=lambda: list(sys.path))


class WorkerActor(Actor):
    """Runs batches on one worker process and reports results or its death to the stage supervisor.

    Its thread waits on its inbox and on the process's socket at once (a PollingInbox), so a reply wakes it directly.
    The supervisor writes a batch for an idle process to the socket itself and tells the actor nothing; a batch for a
    busy process comes as a message, numbered, and waits here until the results before it have come back. The
    process answers batches in order, so the supervisor matches each result to its oldest batch in flight.
    """

    batch_task = False  # woken by its worker's result, it must hand the worker its next batch at once

    def __init__(self, supervisor: pykka.ActorRef, wid: int, proc: WorkerProcess, config: WorkerConfig) -> None:
        super().__init__()
        self.supervisor = supervisor
        self.wid = wid
        self.proc = proc
        self.config = config
        self.dead = False
        self.answered = 0  # batches whose result (or unreadable notice) has come back
        self.pending: deque[SendBatch] = deque()  # batches waiting for the process
        self.poller = select.poll()  # made once: a wait with a deadline costs one poll call
        self.poller.register(proc.conn.fileno(), select.POLLIN)
        self.inbox: PollingInbox = self.actor_inbox  # type: ignore[assignment]  # made by _create_actor_inbox
        self.placement = config.placement
        self.escalate = lambda text: tell(supervisor, WorkerDied(wid, Death("crash", message=text)))

    @staticmethod
    def _create_actor_inbox() -> PollingInbox:  # type: ignore[override]
        return PollingInbox()

    def on_start(self) -> None:
        super().on_start()
        config = self.config
        init = WorkerInit(config.spec, config.retry_on, config.node, config.stage_name, config.log_level,
                          config.sys_path, config.item_timeout)
        try:
            self.proc.conn.send(init)
        except OSError:
            self._died("init_failed", message="worker process exited before it could be initialised")
            return
        reply = self._wait_for((Started, InitFailed), time.monotonic() + config.start_timeout)
        if isinstance(reply, Started):
            self.inbox.watch(self.proc.conn.fileno(), self._time_left)
            tell(self.supervisor, WorkerReady(self.wid, self.proc.pid))
        elif isinstance(reply, InitFailed):
            self.proc.reap()
            self._died("init_failed", message=reply.message, traceback=reply.traceback)

    @handles(SendBatch)
    def on_batch(self, message: SendBatch) -> None:
        """The supervisor's `number`th batch for this process: send it once every batch before it is answered."""
        if self.dead:
            return
        self.pending.append(message)
        self._send_next()

    def _send_next(self) -> None:
        if self.pending and self.pending[0].number == self.answered + 1:
            try:
                self.proc.conn.send_packed(self.pending.popleft().packed)
            except OSError:
                pass  # the process died: the socket reports EOF next

    @handles(Readable)
    def on_readable(self, message: Readable) -> None:
        """One message from the process: a log record, a batch's result, a part of a streaming generator item's
        outputs, or a batch it could not read."""
        reply = self._receive("crash")
        if reply is None:
            return
        if isinstance(reply, Record):
            self.config.log_sink(reply)
        elif isinstance(reply, BatchResult):
            self.answered += 1
            self._send_next()
            tell(self.supervisor, BatchDone(self.wid, reply))
        elif isinstance(reply, Part):
            tell(self.supervisor, PartDone(self.wid, reply))
        elif isinstance(reply, Unreadable):
            self.answered += 1
            self._send_next()
            tell(self.supervisor, BatchUnreadable(self.wid, reply.message, reply.traceback))

    def _time_left(self) -> float | None:
        """Seconds until the running item passes the stage timeout (a timed stage rechecks an idle process then)."""
        timeout = self.config.timeout
        if timeout is None:
            return None
        index, started = self.proc.running_item()
        return timeout - (time.monotonic() - started) if index >= 0 else timeout

    @handles(Tick)
    def on_tick(self, message: Tick) -> None:
        """The stage timeout may have passed for the running item: kill the process if it has."""
        timeout = self.config.timeout
        if self.dead or timeout is None:
            return
        index, started = self.proc.running_item()
        if index >= 0 and time.monotonic() - started >= timeout:
            self.proc.kill()
            self._died("timeout", index=index, message=f"item ran longer than the stage timeout of {timeout} s")

    @handles(StopWorker)
    def on_stop_worker(self, message: StopWorker) -> None:
        """Ask the process to run close() and exit; kill it after `grace` seconds."""
        if not self.dead:
            self.inbox.watch(None)
            try:
                self.proc.conn.send(Stop())
                self._wait_for((Stopped,), time.monotonic() + message.grace, report=False)
            except OSError:
                pass
        self.proc.reap(timeout=message.grace)
        self.proc.kill()
        self.dead = True

    def on_stop(self) -> None:
        self.inbox.watch(None)
        self.proc.kill()
        self.proc.reap()
        self.proc.release()

    def _wait_for(self, kinds: tuple[type, ...], deadline: float, report: bool = True) -> Any:
        """Read messages until one of `kinds` arrives (start-up and stop); on death or the deadline report it
        (unless `report` is False) and return None."""
        while True:
            if not self.poller.poll(max(0.0, min(deadline - time.monotonic(), POLL_SLICE)) * 1000):
                if time.monotonic() >= deadline:
                    self.proc.kill()
                    if report:
                        self._died("init_failed", message="worker did not start in time")
                    return None
                continue
            message = self._receive("init_failed", report)
            if message is None:
                return None
            if isinstance(message, Record):
                self.config.log_sink(message)
            elif isinstance(message, kinds):
                return message

    def _receive(self, death_cause: str, report: bool = True) -> Any:
        """The process's next message; None (its death reported unless `report` is False) when it is gone."""
        conn = self.proc.conn
        try:
            if conn.closed:  # a failed send closed it: the process is gone or its stream is out of step
                raise EOFError("channel closed")
            return conn.recv()
        except wire.UnpicklingFailed as exc:  # the reply cannot be read here: the batch fails, the worker goes on
            return Unreadable(f"the worker's reply cannot be unpickled: {exc}", traceback_module.format_exc())
        except Exception as exc:
            if not (conn.closed or isinstance(exc, (EOFError, OSError))):
                raise
            if report:
                index, _ = self.proc.running_item()
                self._died(death_cause, index=index)
            else:
                self.dead = True
            return None

    def _died(self, cause: str, index: int = -1, message: str = "", traceback: str = "") -> None:
        self.dead = True
        self.inbox.watch(None)
        code, sig = describe_exit(self.proc.reap())
        if not message:
            message = f"worker process died ({f'signal {sig}' if sig else f'exit code {code}'})"
        tell(self.supervisor, WorkerDied(self.wid, Death(cause, index, code, sig, self.proc.pid, message, traceback)))
