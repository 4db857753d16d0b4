"""WorkerActor: one worker process of a stage, driven from one actor thread.

The actor sends a batch (or, when the process was idle, the supervisor already wrote it to the socket), then waits
on the process's socket for the result while forwarding its log records.
It notices at once when the process dies (EOF on the socket), reads which item was running from the shared
progress record, and enforces the per-item timeout by killing the process.
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
from dataclasses import dataclass, field
from typing import Any, Callable

import pykka

from pipeline_cluster import affinity, taskrunner, wire
from pipeline_cluster.actors.base import Actor, tell

# `python -c` puts the current directory first on sys.path; drop it so a source checkout there cannot shadow the
# installed package (the task runner then takes the node's own sys.path).
LAUNCH = "import sys; del sys.path[0]; from pipeline_cluster.taskrunner import main; sys.exit(main(sys.argv[1:]))"
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(taskrunner.__file__)))
POLL_SLICE = 3600.0  # seconds: a longer wait (a stage timeout of weeks) is polled in slices


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
    """Runs batches on one worker process and reports results or its death to the stage supervisor."""

    def __init__(self, supervisor: pykka.ActorRef, wid: int, proc: WorkerProcess, config: WorkerConfig) -> None:
        super().__init__()
        self.supervisor = supervisor
        self.wid = wid
        self.proc = proc
        self.config = config
        self.dead = False
        self.poller = select.poll()  # made once: a wait with a deadline costs one poll call
        self.poller.register(proc.conn.fileno(), select.POLLIN)
        self.escalate = lambda text: tell(supervisor, "worker_died", wid, Death("crash", message=text))

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
        reply = self._wait_for(("ready", "init_failed"), deadline=time.monotonic() + self.config.start_timeout,
                               death_cause="init_failed")
        if reply is None:
            return
        if reply[0] == "ready":
            tell(self.supervisor, "worker_ready", self.wid, self.proc.pid)
        else:
            self.proc.reap()
            self._died("init_failed", message=reply[1], traceback=reply[2])

    def on_batch(self, bid: int, message: wire.Packed | None) -> None:
        """Send a batch (None: the supervisor already wrote it to the idle process) and report its result."""
        if self.dead:
            return
        if message is not None:
            try:
                self.proc.conn.send_packed(message)
            except OSError:
                pass  # the process died: the wait below sees EOF and reports it
        reply = self._wait_for(("result", "unreadable"), item_timeout=self.config.timeout)
        if reply is None:
            return
        if reply[0] == "result":
            tell(self.supervisor, "batch_done", self.wid, bid, reply[1])
        else:
            tell(self.supervisor, "batch_unreadable", self.wid, bid, reply[1], reply[2])

    def on_stop_worker(self, grace: float) -> None:
        """Ask the process to run close() and exit; kill it after `grace` seconds."""
        if not self.dead:
            try:
                self.proc.conn.send(("stop",))
                self._wait_for(("stopped",), deadline=time.monotonic() + grace, report=False)
            except OSError:
                pass
        self.proc.reap(timeout=grace)
        self.proc.kill()
        self.dead = True

    def on_stop(self) -> None:
        self.proc.kill()
        self.proc.reap()
        self.proc.release()

    def _wait_for(self, kinds: tuple[str, ...], deadline: float | None = None, item_timeout: float | None = None,
                  report: bool = True, death_cause: str = "crash") -> tuple | None:
        """Read messages until one of `kinds` arrives; on death or timeout report it and return None."""
        conn = self.proc.conn
        while True:
            wait = None
            if deadline is not None:
                wait = max(0.0, deadline - time.monotonic())
            if item_timeout is not None:
                index, started = self.proc.running_item()
                left = item_timeout - (time.monotonic() - started) if index >= 0 else item_timeout
                wait = left if wait is None else min(wait, left)
                if index >= 0 and left <= 0:
                    self.proc.kill()
                    if report:
                        self._died("timeout", index=index,
                                   message=f"item ran longer than the stage timeout of {item_timeout} s")
                    return None
            try:
                if conn.closed:  # a failed send closed it: the process is gone or its stream is out of step
                    raise EOFError("channel closed")
                # no deadline: recv blocks; else poll in slices (poll takes at most INT_MAX ms)
                if wait is not None and not self.poller.poll(min(wait, POLL_SLICE) * 1000):
                    if deadline is not None and time.monotonic() >= deadline:
                        self.proc.kill()
                        if report:
                            self._died("init_failed", message="worker did not start in time")
                        return None
                    continue
                message = conn.recv()
            except wire.UnpicklingFailed as exc:  # the reply cannot be read here: the batch fails, the worker goes on
                message = ("unreadable", f"the worker's reply cannot be unpickled: {exc}", traceback_module.format_exc())
            except Exception as exc:
                if not (conn.closed or isinstance(exc, (EOFError, OSError))):
                    raise
                if report:  # gone, or closed by a failed send (even during the poll)
                    index, _ = self.proc.running_item()
                    self._died(death_cause, index=index)
                return None
            if message[0] == "log":
                self.config.log_sink(message[1])
            elif message[0] in kinds:
                return message

    def _died(self, cause: str, index: int = -1, message: str = "", traceback: str = "") -> None:
        self.dead = True
        code, sig = describe_exit(self.proc.reap())
        if not message:
            message = f"worker process died ({f'signal {sig}' if sig else f'exit code {code}'})"
        tell(self.supervisor, "worker_died", self.wid,
             Death(cause, index, code, sig, self.proc.pid, message, traceback))
