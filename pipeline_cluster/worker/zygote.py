"""The fork server ("zygote"): a fresh interpreter that imports the worker program once and forks a worker per
request, so a worker starts in a few milliseconds instead of an interpreter's start-up and imports.

The node never forks itself (its threads may hold locks): it starts this interpreter, on its first worker, and sends
it over a unix socket (SCM_RIGHTS) each new worker's socket-pair end and progress record, with what a process the
node started itself would inherit from the spawning thread (environment, working directory, CPUs, scheduling policy,
nice value). The zygote forks; the child takes those, starts a session of its own and runs
`pipeline_cluster.worker.main.main`. The zygote answers with the child's pid and a pidfd (so the node signals and
polls exactly that process, even once it is reaped), reaps its children and reports each one's wait status.

The zygote stays single-threaded and changes no signal handling, so a child starts as a fresh interpreter would. It
ends, killing the children it has left, at EOF on its socket (the node closed it, or died) or when the node process
ends; its children die with it (PR_SET_PDEATHSIG, set by `main`).
"""
from __future__ import annotations

import ctypes
import gc
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
from typing import Any, NamedTuple
from collections.abc import Callable

from pipeline_cluster.worker import main as worker_main

LAUNCH = ("import sys; sys.path[0] = sys.argv[1]; from pipeline_cluster.worker.zygote import serve_main; "
          "sys.exit(serve_main(sys.argv[2:]))")
# the directory the package is imported from: first on sys.path of a worker (spawned or forked), so that a source
# checkout in the working directory cannot shadow the package the node runs
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(worker_main.__file__))))
MAX_REQUEST = 1 << 20  # bytes: an environment and a few numbers
MAX_REPLY = 4096  # bytes: a pid, or a pid and a status
REPLY_TIMEOUT = 30.0  # seconds: a zygote that answers nothing in this time is taken for broken


class Fork(NamedTuple):
    """node -> zygote, with the worker's socket and progress fds: fork a worker that inherits this."""

    environ: dict[bytes, bytes]
    cwd: str | None
    cpus: set[int]
    policy: int
    priority: int  # the static priority for the policy (0 but for real-time ones)
    nice: int

    @classmethod
    def here(cls) -> Fork:
        """What a child started from the calling thread now would inherit."""
        try:
            cwd: str | None = os.getcwd()
        except OSError:  # removed: the child keeps the zygote's
            cwd = None
        return cls(_environment(), cwd, os.sched_getaffinity(0), os.sched_getscheduler(0),
                   os.sched_getparam(0).sched_priority, os.getpriority(os.PRIO_PROCESS, 0))

    def apply(self) -> None:
        """Make the calling (child) process inherit this: each part changed only where it differs."""
        if self.environ != dict(os.environb):
            os.environb.clear()
            os.environb.update(self.environ)
        changes: list[tuple[Callable[..., Any], tuple]] = []
        if self.cwd is not None and self.cwd != os.getcwd():
            changes.append((os.chdir, (self.cwd,)))
        if self.cpus != os.sched_getaffinity(0):
            changes.append((os.sched_setaffinity, (0, self.cpus)))
        if (self.policy, self.priority) != (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority):
            changes.append((os.sched_setscheduler, (0, self.policy, os.sched_param(self.priority))))
        if self.nice != os.getpriority(os.PRIO_PROCESS, 0):
            changes.append((os.setpriority, (os.PRIO_PROCESS, 0, self.nice)))
        for change, args in changes:
            try:
                change(*args)
            except OSError:  # not allowed (a lower nice value, say): the child keeps the zygote's
                pass


class Forked(NamedTuple):
    """zygote -> node, with a pidfd of the child: the worker runs as `pid`."""

    pid: int


class ForkFailed(NamedTuple):
    """zygote -> node: fork() failed (out of memory or pids, say)."""

    error: str


class Exited(NamedTuple):
    """zygote -> node: child `pid` is reaped; `status` as os.waitpid gives it."""

    pid: int
    status: int


class Zygote:
    """The node's end of one running zygote: asks it for workers and collects their exit statuses (thread-safe)."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", LAUNCH, PACKAGE_ROOT, str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(REPLY_TIMEOUT)
        self.sock = ours
        self.lock = threading.Lock()  # one reader and writer of the socket at a time
        self.statuses: dict[int, int] = {}  # reported, not yet collected
        self.alive = True
        self.forked = 0  # workers started so far

    def fork(self, request: Fork, fds: tuple[int, int]) -> ForkedChild:
        """A new worker with socket and progress record `fds`; OSError when the zygote cannot fork (then `alive`
        tells whether it is still there)."""
        with self.lock:
            try:
                socket.send_fds(self.sock, [pickle.dumps(request)], list(fds))
                while True:
                    reply, pidfds = self._read()
                    if isinstance(reply, Forked):
                        self.forked += 1
                        return ForkedChild(self, reply.pid, pidfds[0])
                    if isinstance(reply, ForkFailed):
                        break
            except (OSError, EOFError) as exc:
                self._broken()
                raise OSError(f"the zygote is gone: {exc}") from exc
        raise OSError(f"the zygote could not fork: {reply.error}")

    def status(self, pid: int) -> int:
        """The wait status of child `pid`, once it has exited; SIGKILL's if the zygote went away (its children die
        with it)."""
        with self.lock:
            try:
                while pid not in self.statuses:
                    self._read()
            except (OSError, EOFError):
                self._broken()
                return int(signal.SIGKILL)
            return self.statuses.pop(pid)

    def _read(self) -> tuple[Forked | ForkFailed | Exited, list[int]]:
        """The zygote's next message (exit reports are kept in `statuses`)."""
        data, fds, _, _ = socket.recv_fds(self.sock, MAX_REPLY, 1)
        if not data:
            raise EOFError("the zygote closed its socket")
        message = pickle.loads(data)
        if isinstance(message, Exited):
            self.statuses[message.pid] = message.status
        return message, fds

    def _broken(self) -> None:
        """The zygote stopped answering: end it (its children die with it)."""
        self.alive = False
        self.popen.kill()

    def close(self) -> None:
        """End the zygote (it kills any child left) and reap it."""
        self.alive = False
        self.sock.close()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class ForkedChild:
    """A worker forked by a zygote, with the part of `subprocess.Popen`'s interface that `WorkerProcess` uses."""

    def __init__(self, zygote: Zygote, pid: int, pidfd: int) -> None:
        self.zygote = zygote
        self.pid = pid
        self.pidfd: int | None = pidfd  # closed once the exit is known, under `lock` (kill() must not signal a
        # reused descriptor)
        self.lock = threading.Lock()
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The returncode if the process has exited, else None."""
        if self.returncode is None and self._exited(0) and self.lock.acquire(blocking=False):
            try:
                self._collect()
            finally:
                self.lock.release()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The returncode, waiting up to `timeout` s (subprocess.TimeoutExpired after that)."""
        if self.returncode is None:
            if not self._exited(timeout):
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            with self.lock:
                self._collect()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the process if it still runs."""
        with self.lock:
            if self.pidfd is not None:
                try:
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _exited(self, timeout: float | None) -> bool:
        pidfd = self.pidfd
        if pidfd is None:
            return True
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else timeout * 1000))

    def _collect(self) -> None:
        """Take the exit status from the zygote (called under `lock`, once the process has exited)."""
        if self.returncode is None and self.pidfd is not None:
            self.returncode = os.waitstatus_to_exitcode(self.zygote.status(self.pid))
            os.close(self.pidfd)
            self.pidfd = None


class Launcher:
    """A node's way to start workers: through its zygote, started on first need (again if it died after serving),
    or, when a zygote cannot start or serve its first worker, as fresh interpreters."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.zygote: Zygote | None = None
        self.unavailable = False  # no zygote here: spawn directly from now on

    def fork(self, fds: tuple[int, int]) -> ForkedChild | None:
        """A worker forked with socket and progress record `fds`, inheriting the calling thread's state; None when
        no zygote can give one (the caller spawns it itself)."""
        request = Fork.here()
        with self.lock:
            if self.unavailable:
                return None
            if self.zygote is None or not self.zygote.alive:
                if self.zygote is not None:
                    self.zygote.close()  # reap the one that died
                try:
                    self.zygote = Zygote()
                except OSError:
                    self.unavailable = True
                    return None
            zygote = self.zygote
        try:
            return zygote.fork(request, fds)
        except OSError:
            if not zygote.forked:
                with self.lock:
                    self.unavailable = True
            return None

    def close(self) -> None:
        """End the zygote (after the node's workers are stopped)."""
        with self.lock:
            zygote, self.zygote = self.zygote, None
        if zygote is not None:
            zygote.close()


# -- the zygote process ------------------------------------------------------------------------------------------


def serve_main(argv: list[str]) -> int:
    """The zygote's program (`argv`: its socket's fd, the node's pid); in a forked child, the worker's."""
    job = serve(socket.socket(fileno=int(argv[0])), int(argv[1]))
    if job is None:
        return 0
    request, fds = job
    os.setsid()  # a session of its own, as a spawned worker: a Ctrl-C at the node's terminal never reaches it
    request.apply()
    args = [str(fd) for fd in fds]
    sys.argv = ["-c", PACKAGE_ROOT, *args]  # as a spawned worker's
    return worker_main.main(args)


def serve(channel: socket.socket, node: int) -> tuple[Fork, list[int]] | None:
    """Fork workers on request until the node goes; returns None in the zygote, the job in a forked child."""
    try:
        watch = os.pidfd_open(node)
    except OSError:
        return None
    if os.getppid() != node:  # the node is already gone
        return None
    gc.freeze()  # what the imports made is never collected in a child: its pages stay shared
    poller = select.poll()
    poller.register(channel, select.POLLIN)
    poller.register(watch, select.POLLIN)
    children: dict[int, int] = {}  # pidfd -> pid
    try:
        while True:
            for fd, _ in poller.poll():
                if fd == watch:
                    return None
                if fd != channel.fileno():
                    pid = children.pop(fd)
                    poller.unregister(fd)
                    os.close(fd)
                    _, status = os.waitpid(pid, 0)
                    channel.send(pickle.dumps(Exited(pid, status)))
                    continue
                data, fds, _, _ = socket.recv_fds(channel, MAX_REQUEST, 2)
                if not data:
                    return None
                request: Fork = pickle.loads(data)
                try:
                    pid = os.fork()
                except OSError as exc:
                    for received in fds:
                        os.close(received)
                    channel.send(pickle.dumps(ForkFailed(str(exc))))
                    continue
                if pid == 0:
                    channel.detach()  # closed below with the zygote's other descriptors
                    children.clear()  # this process is the child: it has none to kill on its way out
                    _close_all_but(fds)
                    return request, fds
                for received in fds:
                    os.close(received)
                pidfd = os.pidfd_open(pid)
                children[pidfd] = pid
                poller.register(pidfd, select.POLLIN)
                socket.send_fds(channel, [pickle.dumps(Forked(pid))], [pidfd])
    except OSError:  # the node's end is gone
        return None
    finally:
        for pidfd, pid in children.items():
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.waitpid(pid, 0)


def _environment() -> dict[bytes, bytes]:
    """The process's environment as a child inherits it: C's `environ`, which holds what native code set with
    setenv() as well as os.environ's changes."""
    entries = ctypes.POINTER(ctypes.c_char_p).in_dll(ctypes.CDLL(None), "environ")
    environ: dict[bytes, bytes] = {}
    index = 0
    while entries and entries[index] is not None:
        key, _, value = entries[index].partition(b"=")
        environ.setdefault(key, value)  # getenv() takes the first of a repeated name
        index += 1
    return environ


def _close_all_but(keep: list[int]) -> None:
    """Close every descriptor above stdio except `keep` (the child's own two)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:  # the listing's own descriptor, closed already
                pass
