"""WorkerActor: one worker process of a stage, driven from one actor thread.

The actor waits on the process's socket and its own inbox at once: it forwards results and log records, sends a
batch that had to wait for the process, notices at once when the process dies (EOF on the socket), reads which item
was running from the shared progress record, and enforces the per-item timeout by killing the process.
"""
from __future__ import annotations

import mmap
import os
import select
import signal
import traceback as traceback_module
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import pykka

from pipeline_cluster import affinity, taskrunner, wire
from pipeline_cluster.actors.base import POLL_SLICE, Actor, PollingInbox, tell

# `python -c` puts the current directory first on sys.path; drop it so a source checkout there cannot shadow the
# installed package (the task runner then takes the node's own sys.path).
LAUNCH = "import sys; del sys.path[0]; from pipeline_cluster.taskrunner import main; sys.exit(main(sys.argv[1:]))"
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(taskrunner.__file__)))


@dataclass
class Death:
    """Why and where a worker process ended: cause is "crash", "timeout" or "init_failed"."""

    cause: str
    index: int = -1  # item index in the running batch, -1 when it was idle
    exit_code: int | None = None
    signal: str | None = None
    pid: int | None = None
    message: str = ""
    traceback: str = ""


class WorkerProcess:
    """A started worker process with its socket and progress record; `kill()` is safe from any thread."""

    def __init__(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        self.progress_fd = os.memfd_create("pipeline-cluster-progress")
        os.ftruncate(self.progress_fd, taskrunner.PROGRESS_SIZE)
        self.progress = mmap.mmap(self.progress_fd, taskrunner.PROGRESS_SIZE)
        taskrunner.PROGRESS.pack_into(self.progress, 0, -1, 0.0)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
        try:
            with affinity.unplaced():  # the worker may run on every CPU, not on the node's threads' home one
                self.popen = subprocess.Popen(
                    [sys.executable, "-c", LAUNCH, str(child_sock.fileno()), str(self.progress_fd)],
                    pass_fds=(child_sock.fileno(), self.progress_fd), env=env, stdin=subprocess.DEVNULL,
                )
        finally:
            child_sock.close()
        self.pid = self.popen.pid
        self.conn = wire.Channel(parent_sock, max_frame=taskrunner.MAX_FRAME)

    def running_item(self) -> tuple[int, float]:
        """(index in batch, start time) of the item being run now; index -1 when idle."""
        return taskrunner.PROGRESS.unpack_from(self.progress, 0)

    def kill(self) -> None:
        """SIGKILL the process if it still runs."""
        if self.popen.poll() is None:
            try:
                self.popen.kill()
            except ProcessLookupError:
                pass

    def reap(self, timeout: float = 5.0) -> int:
        """Wait for the exit (killing after `timeout`) and return its returncode."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.popen.wait()

    def release(self) -> None:
        """Close the socket and the progress record."""
        self.conn.close()
        self.progress.close()
        os.close(self.progress_fd)


def describe_exit(returncode: int | None) -> tuple[int | None, str | None]:
    """(exit code, signal name) of a finished process."""
    if returncode is not None and returncode < 0:
        try:
            return None, signal.Signals(-returncode).name
        except ValueError:
            return None, f"signal {-returncode}"
    return returncode, None


@dataclass
class WorkerConfig:
    """What a worker needs to start: the stage payload and where its logs and reports go."""

    stage_name: str
    spec: bytes
    retry_on: bytes
    timeout: float | None
    node: str
    log_level: int
    log_sink: Callable[[Any], None]
    start_timeout: float = 60.0
    sys_path: list[str] = field(default_factory=lambda: list(sys.path))


class WorkerActor(Actor):
    """Runs batches on one worker process and reports results or its death to the stage supervisor.

    Its thread waits on its inbox and on the process's socket at once (a PollingInbox), so a reply wakes it directly.
    The supervisor writes a batch for an idle process to the socket itself and tells the actor nothing; a batch for a
    busy process comes as a message, numbered, and waits here until the results before it have come back. The
    process answers batches in order, so the supervisor matches each result to its oldest batch in flight.
    """

    # a normal task, not a batch one: woken by its worker's result while another worker computes on this CPU, it
    # preempts that one and hands its worker the next batch at once (as a batch task it waited for the other's time
    # slice to end)
    batch_task = False

    def __init__(self, supervisor: pykka.ActorRef, wid: int, proc: WorkerProcess, config: WorkerConfig) -> None:
        super().__init__()
        self.supervisor = supervisor
        self.wid = wid
        self.proc = proc
        self.config = config
        self.dead = False
        self.answered = 0  # batches whose result (or unreadable notice) has come back
        self.pending: deque[tuple[int, wire.Packed]] = deque()  # (number, batch) waiting for the process
        self.poller = select.poll()  # made once: a wait with a deadline costs one poll call
        self.poller.register(proc.conn.fileno(), select.POLLIN)
        self.escalate = lambda text: tell(supervisor, "worker_died", wid, Death("crash", message=text))

    @staticmethod
    def _create_actor_inbox() -> PollingInbox:
        return PollingInbox()

    def on_start(self) -> None:
        super().on_start()
        init = {"spec": self.config.spec, "retry_on": self.config.retry_on, "node": self.config.node,
                "stage": self.config.stage_name, "log_level": self.config.log_level, "sys_path": self.config.sys_path,
                "timed": self.config.timeout is not None}
        try:
            self.proc.conn.send(("init", init))
        except OSError:
            self._died("init_failed", message="worker process exited before it could be initialised")
            return
        reply = self._wait_for(("ready", "init_failed"), time.monotonic() + self.config.start_timeout)
        if reply is None:
            return
        if reply[0] == "ready":
            self.actor_inbox.watch(self.proc.conn.fileno(), self._time_left)
            tell(self.supervisor, "worker_ready", self.wid, self.proc.pid)
        else:
            self.proc.reap()
            self._died("init_failed", message=reply[1], traceback=reply[2])

    def on_batch(self, number: int, message: wire.Packed) -> None:
        """The supervisor's `number`th batch for this process: send it once every batch before it is answered."""
        if self.dead:
            return
        self.pending.append((number, message))
        self._send_next()

    def _send_next(self) -> None:
        if self.pending and self.pending[0][0] == self.answered + 1:
            try:
                self.proc.conn.send_packed(self.pending.popleft()[1])
            except OSError:
                pass  # the process died: the socket reports EOF next

    def on_readable(self) -> None:
        """One message from the process: a log record, a batch's result, or a batch it could not read."""
        reply = self._receive("crash")
        if reply is None:
            return
        if reply[0] == "log":
            self.config.log_sink(reply[1])
        elif reply[0] in ("result", "unreadable"):
            self.answered += 1
            self._send_next()
            if reply[0] == "result":
                tell(self.supervisor, "batch_done", self.wid, reply[1])
            else:
                tell(self.supervisor, "batch_unreadable", self.wid, reply[1], reply[2])

    def _time_left(self) -> float | None:
        """Seconds until the running item passes the stage timeout (a timed stage rechecks an idle process then)."""
        timeout = self.config.timeout
        if timeout is None:
            return None
        index, started = self.proc.running_item()
        return timeout - (time.monotonic() - started) if index >= 0 else timeout

    def on_tick(self) -> None:
        """The stage timeout may have passed for the running item: kill the process if it has."""
        if self.dead:
            return
        index, started = self.proc.running_item()
        if index >= 0 and time.monotonic() - started >= self.config.timeout:
            self.proc.kill()
            self._died("timeout", index=index, message=f"item ran longer than the stage timeout of "
                                                       f"{self.config.timeout} s")

    def on_stop_worker(self, grace: float) -> None:
        """Ask the process to run close() and exit; kill it after `grace` seconds."""
        if not self.dead:
            self.actor_inbox.watch(None)
            try:
                self.proc.conn.send(("stop",))
                self._wait_for(("stopped",), time.monotonic() + grace, report=False)
            except OSError:
                pass
        self.proc.reap(timeout=grace)
        self.proc.kill()
        self.dead = True

    def on_stop(self) -> None:
        self.actor_inbox.watch(None)
        self.proc.kill()
        self.proc.reap()
        self.proc.release()

    def _wait_for(self, kinds: tuple[str, ...], deadline: float, report: bool = True) -> tuple | None:
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
            if message[0] == "log":
                self.config.log_sink(message[1])
            elif message[0] in kinds:
                return message

    def _receive(self, death_cause: str, report: bool = True) -> tuple | None:
        """The process's next message; None (its death reported unless `report` is False) when it is gone."""
        conn = self.proc.conn
        try:
            if conn.closed:  # a failed send closed it: the process is gone or its stream is out of step
                raise EOFError("channel closed")
            return conn.recv()
        except wire.UnpicklingFailed as exc:  # the reply cannot be read here: the batch fails, the worker goes on
            return ("unreadable", f"the worker's reply cannot be unpickled: {exc}", traceback_module.format_exc())
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
        self.actor_inbox.watch(None)
        code, sig = describe_exit(self.proc.reap())
        if not message:
            message = f"worker process died ({f'signal {sig}' if sig else f'exit code {code}'})"
        tell(self.supervisor, "worker_died", self.wid,
             Death(cause, index, code, sig, self.proc.pid, message, traceback))
