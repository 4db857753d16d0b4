"""Where the framework's threads and worker processes run: left alone by default, tuned when a cluster opts in.

By default (`placement=False`) nothing here changes any CPU affinity: threads and worker processes keep what they
inherit. `LocalCluster(placement=True)` (or a node server's `--placement`) trades that for latency on small machines:

- the framework's own threads in the process share one "home" CPU, so a hand-off between them (an actor message)
  never has to wake another CPU, and are SCHED_BATCH tasks, so one woken by a message waits for the sender's time
  slice to end instead of preempting it only to wait for the GIL (worker actors stay normal tasks: one woken by its
  worker's result must hand the worker its next batch at once);
- a thread of the caller's that blocks in the framework (`wait_empty`, `feed` waiting for room, a `run()` loop
  waiting for outputs) sits on the home CPU for the length of the wait, and gets its own CPUs back when it ends;
- a worker that takes a short batch while no other worker of its node is busy runs on the home CPU for that batch.

What it costs: every framework thread of the process shares one CPU the kernel may not move them from, and a busy
neighbour on that CPU slows every hand-off. It pays for a trickle of single items on an otherwise quiet machine.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from typing import Any
from collections.abc import Callable, Iterator

_CAN_PIN = hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")


def start_thread(target: Callable[..., Any], *args: Any, name: str) -> threading.Thread:
    """Start a daemon thread (a forgotten close() must not keep the user's program alive)."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


class Placement:
    """The default: every method leaves threads and processes where they are."""

    enabled = False

    def start_thread(self, target: Callable[..., Any], *args: Any, name: str) -> threading.Thread:
        """Start a framework thread (placed on the home CPU when placement is on)."""
        return start_thread(target, *args, name=name)

    def pin_this_thread(self, batch: bool = True) -> None:
        """Move the calling framework thread to the home CPU (when placement is on); `batch`: make it a SCHED_BATCH
        task too."""

    @contextlib.contextmanager
    def spawning(self) -> Iterator[None]:
        """Around starting a worker process from a framework thread: the process gets the user's CPUs."""
        yield

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Around a caller's thread blocking in the framework."""
        yield

    def took(self, pid: int, short: bool) -> None:
        """Worker `pid` is given a batch; `short`: a small one with nothing of its stage queued behind it."""

    def done(self, pid: int) -> None:
        """Worker `pid` returned a batch."""

    def gone(self, pid: int) -> None:
        """Worker `pid` has died or been stopped, with whatever batches it had."""


class HomeCpu(Placement):
    """The opt-in: framework threads on one home CPU, waiting callers and lone short batches beside them."""

    enabled = True

    def __init__(self) -> None:
        self.allowed = frozenset(os.sched_getaffinity(0))
        self.home: int | None = None  # chosen by the first framework thread: the CPU it runs on
        self.lock = threading.Lock()
        self.main_thread_cpus: set[int] | None = None  # the main thread's own CPUs while it waits at home
        self.batches: dict[int, int] = {}  # pid -> batches in flight, for the busy workers
        self.at_home: set[int] = set()  # pids of workers moved to the home CPU

    def start_thread(self, target: Callable[..., Any], *args: Any, name: str) -> threading.Thread:
        def run() -> None:
            self.pin_this_thread()
            target(*args)

        return start_thread(run, name=name)

    def pin_this_thread(self, batch: bool = True) -> None:
        # woken by a message, a batch task waits for the sender's time slice instead of preempting it for the GIL;
        # a thread started by one inherits the policy, so a normal one sets it back
        policy = os.SCHED_BATCH if batch else os.SCHED_OTHER
        if os.sched_getscheduler(0) != policy:
            try:
                os.sched_setscheduler(0, policy, os.sched_param(0))
            except OSError:  # not allowed here (a seccomp profile, say): keep the policy it has
                pass
        with self.lock:
            if self.home is None:
                self.home = _current_cpu(self.allowed)
        try:
            if self.home in os.sched_getaffinity(0):  # never onto a CPU that the user's restriction excludes
                os.sched_setaffinity(0, {self.home})
        except OSError:  # a cgroup that changed its CPU set, say: stay where the kernel put us
            pass

    @contextlib.contextmanager
    def spawning(self) -> Iterator[None]:
        home = self.home
        placed = home is not None and os.sched_getaffinity(0) == {home}
        policy = os.sched_getscheduler(0)
        if placed:
            os.sched_setaffinity(0, self._user_cpus())
        if policy != os.SCHED_OTHER:  # the worker runs the user's code: it starts as a normal task
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        try:
            yield
        finally:
            if home is not None and placed:
                os.sched_setaffinity(0, {home})
            if policy != os.SCHED_OTHER:
                os.sched_setscheduler(0, policy, os.sched_param(0))

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        joined = self._join_home()
        try:
            yield
        finally:
            self._leave_home(joined)

    def _user_cpus(self) -> set[int]:
        """The CPUs the process's main thread may use (its own, while it waits at home)."""
        with self.lock:
            if self.main_thread_cpus is not None:
                return set(self.main_thread_cpus)
        try:
            return os.sched_getaffinity(threading.main_thread().native_id or 0)
        except OSError:  # the main thread has ended
            return set(self.allowed)

    def _join_home(self) -> set[int] | None:
        home = self.home
        if home is None:
            return None
        before = os.sched_getaffinity(0)
        if home not in before or before == {home}:
            return None
        with self.lock:
            try:
                os.sched_setaffinity(0, {home})
            except OSError:
                return None
            if threading.current_thread() is threading.main_thread():
                self.main_thread_cpus = before
        return before

    def _leave_home(self, before: set[int] | None) -> None:
        if before is None:
            return
        with self.lock:
            try:
                os.sched_setaffinity(0, before)
            except OSError:
                pass
            if threading.current_thread() is threading.main_thread():
                self.main_thread_cpus = None

    def took(self, pid: int, short: bool) -> None:
        with self.lock:
            if pid in self.batches:
                self.batches[pid] += 1
                return
            alone = short and not self.batches
            self.batches[pid] = 1
            if alone == (pid in self.at_home) or self.home is None:
                return
            if alone:
                self.at_home.add(pid)
            else:
                self.at_home.discard(pid)
        user = self._user_cpus()
        try:
            os.sched_setaffinity(pid, {self.home} if alone and self.home in user else user)
        except OSError:  # the process has just died: its actor reports that
            pass

    def done(self, pid: int) -> None:
        with self.lock:
            left = self.batches.get(pid, 0) - 1
            if left > 0:
                self.batches[pid] = left
            else:
                self.batches.pop(pid, None)

    def gone(self, pid: int) -> None:
        with self.lock:
            self.batches.pop(pid, None)
            self.at_home.discard(pid)


def _current_cpu(allowed: frozenset[int]) -> int:
    try:
        cpu = ctypes.CDLL(None, use_errno=True).sched_getcpu()
    except (OSError, AttributeError):
        cpu = -1
    return cpu if cpu in allowed else min(allowed)


def make_placement(enabled: bool) -> Placement:
    """The placement a cluster or node server asked for (placement needs Linux and more than one CPU)."""
    if enabled and _CAN_PIN and len(os.sched_getaffinity(0)) > 1:
        return HomeCpu()
    return Placement()
