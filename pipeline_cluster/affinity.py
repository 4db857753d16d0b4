"""Thread placement: the framework's own threads in a process share one CPU, its "home".

They take turns on the GIL anyway, so spreading them over CPUs buys no parallelism, while every hand-off between
threads (an actor message, a queue) then wakes a thread on another CPU, which costs several times as much as on the
same one (~50 us against ~8 us per pykka message on a 2-vCPU VM). Only threads the framework starts for its own
code are placed: not the user's threads, nor the threads that run the user's input iterable or output handler (what
the user's code starts keeps the user's CPUs); worker processes start on the CPUs the main thread may use, and a
node's `WorkerPlacement` moves a worker beside the threads while it runs a short batch as the node's only busy
worker (a trickle of single items then never waits for a halted CPU to wake up). A thread of the user's, or one
that runs the user's code, joins the home CPU only while it blocks in the framework (`waiting_at_home`), so the
thread that ends its wait wakes it there too.
The framework's threads and the worker processes are also SCHED_BATCH tasks (see `batch_policy`), except the
worker actors: one woken by its worker's result must preempt a busy worker to hand the next batch over at once.
`PIPELINE_CLUSTER_PIN_THREADS=0` turns placement and the batch policy off.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from typing import Any, Callable, Iterator

ENV_SWITCH = "PIPELINE_CLUSTER_PIN_THREADS"

_can_pin = hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")
_can_batch = hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_BATCH")
ALLOWED: frozenset[int] = frozenset(os.sched_getaffinity(0)) if _can_pin else frozenset()  # before any placement
_home: int | None = None
_main_thread_cpus: set[int] | None = None  # the main thread's own CPUs while join_home() holds it on the home CPU
_lock = threading.Lock()


def supported() -> bool:
    """Placement means something here: Linux, and more than one CPU allowed."""
    return _can_pin and len(ALLOWED) > 1


def enabled() -> bool:
    """Placement applies: supported and not switched off."""
    return supported() and os.environ.get(ENV_SWITCH, "1") != "0"


def _current_cpu() -> int | None:
    try:
        cpu = ctypes.CDLL(None, use_errno=True).sched_getcpu()
    except (OSError, AttributeError):
        return None
    return cpu if cpu in ALLOWED else None


def batch_policy(batch: bool = True) -> None:
    """Make the calling framework thread, or a worker process, a SCHED_BATCH task (`batch=False`: a normal one,
    for a thread that inherited the batch policy from the thread that started it).

    A woken batch task waits for the running task's turn to end instead of preempting it. A framework thread woken by
    a message would otherwise preempt the thread that sent it while that one still holds the GIL, only to wait for
    the GIL (two context switches for nothing), and a worker handed a batch would preempt the thread that handed it
    over. One item through two stages then takes 14 context switches, not 28.
    """
    if _can_batch and os.environ.get(ENV_SWITCH, "1") != "0":
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH if batch else os.SCHED_OTHER, os.sched_param(0))
        except OSError:  # not allowed here (a seccomp profile, say): keep the policy it has
            pass


def pin_this_thread(batch: bool = True) -> None:
    """Set the calling framework thread's policy (see `batch_policy`) and move it to this process's home CPU (chosen
    by the first caller: where it runs)."""
    global _home
    batch_policy(batch)
    if not enabled():
        return
    with _lock:
        if _home is None:
            _home = _current_cpu()
            if _home is None:
                _home = min(ALLOWED)
    try:
        if _home in os.sched_getaffinity(0):  # never onto a CPU that the user's restriction (inherited) excludes
            os.sched_setaffinity(0, {_home})
    except OSError:  # e.g. a cgroup that changed its CPU set: stay where the kernel put us
        pass


def start_thread(target: Callable[..., Any], *args: Any, name: str, placed: bool = True) -> threading.Thread:
    """Start a daemon thread: a framework thread on the home CPU, or (`placed=False`) one that runs the user's code
    on the user's CPUs."""

    def run() -> None:
        if placed:
            pin_this_thread()
        target(*args)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def unplaced() -> Iterator[None]:
    """Let a placed calling thread run, for a while, on the CPUs the process's main thread may use now (the user's
    own restriction, if any): a worker process it starts gets those CPUs, not the home CPU."""
    placed = _home is not None and os.sched_getaffinity(0) == {_home}  # even if placement was switched off since
    if placed:
        os.sched_setaffinity(0, _user_cpus())
    try:
        yield
    finally:
        if placed:
            os.sched_setaffinity(0, {_home})


def _user_cpus() -> set[int]:
    with _lock:  # not while join_home or leave_home is half done: the main thread's CPUs and the record agree
        if _main_thread_cpus is not None:  # the main thread sits on the home CPU for now: not a restriction
            return set(_main_thread_cpus)
        try:
            return os.sched_getaffinity(threading.main_thread().native_id or 0)
        except OSError:  # the main thread has ended
            return set(ALLOWED)


def join_home() -> tuple[int, set[int]] | None:
    """Move the calling thread (the user's, or one that runs the user's code) to the home CPU, beside the framework's
    threads; returns what `leave_home` needs to move it back, or None when nothing moved.

    Worker processes keep the CPUs the main thread had: they follow what it had before, not the home CPU.
    """
    global _main_thread_cpus
    if not enabled() or _home is None:
        return None
    before = os.sched_getaffinity(0)
    if _home not in before or before == {_home}:
        return None
    with _lock:
        try:
            os.sched_setaffinity(0, {_home})
        except OSError:  # e.g. a cgroup that changed its CPU set: stay where we are
            return None
        if threading.current_thread() is threading.main_thread():
            _main_thread_cpus = before
    return threading.get_native_id(), before


def leave_home(joined: tuple[int, set[int]] | None) -> None:
    """Give a thread moved by `join_home` its CPUs back (if it still runs: its id is only ever one of ours)."""
    global _main_thread_cpus
    if joined is None:
        return
    tid, before = joined
    mine = tid == threading.get_native_id()
    with _lock:
        if mine or os.path.exists(f"/proc/self/task/{tid}"):
            try:
                os.sched_setaffinity(0 if mine else tid, before)
            except OSError:
                pass
        if threading.main_thread().native_id == tid:
            _main_thread_cpus = None


@contextlib.contextmanager
def waiting_at_home() -> Iterator[None]:
    """Hold the calling thread on the home CPU while it blocks in the framework (for outputs, for room to feed, for
    the run to empty): the framework thread that ends the wait then wakes it on its own CPU rather than another one
    (on a VM that halts idle CPUs, one that must first be woken up). The thread gets its CPUs back as soon as the
    wait ends, so what it runs or starts afterwards keeps every CPU; it goes on where it woke, beside the framework.
    """
    joined = None
    try:
        joined = join_home()
        yield
    finally:
        leave_home(joined)


class WorkerPlacement:
    """Where one node's worker processes run, decided each time a worker takes a batch while it has none.

    A worker that takes a short batch (little work, few bytes, nothing of its stage queued behind it) while no other
    worker of the node has any runs on the home CPU beside the framework's threads: one item at a time then travels
    its whole way on one CPU, where on a VM every hop to another, idle CPU waits for that virtual CPU to be woken
    (50-150 us a hop measured here). Longer batches, and any batch while another worker is busy, run on the user's
    CPUs, so throughput keeps every CPU and never competes with the node's own busy threads (receiving big items,
    say). A move is one system call, made only when a worker's place changes. A node's stage supervisors share one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: dict[int, int] = {}  # pid -> batches in flight, for the node's busy workers
        self._at_home: set[int] = set()  # pids of workers moved to the home CPU

    def took(self, pid: int, short: bool) -> None:
        """Worker `pid` is given a batch; `short`: a small one with nothing of its stage queued behind it."""
        with self._lock:
            batches = self._batches
            if pid in batches:
                batches[pid] += 1
                return
            alone = short and not batches
            batches[pid] = 1
            if alone == (pid in self._at_home) or not enabled() or _home is None:
                return
            (self._at_home.add if alone else self._at_home.discard)(pid)
        user = _user_cpus()
        try:
            os.sched_setaffinity(pid, {_home} if alone and _home in user else user)
        except OSError:  # the process has just died: its actor reports that
            pass

    def done(self, pid: int) -> None:
        """Worker `pid` returned a batch."""
        with self._lock:
            left = self._batches.get(pid, 0) - 1
            if left > 0:
                self._batches[pid] = left
            else:
                self._batches.pop(pid, None)

    def gone(self, pid: int) -> None:
        """Worker `pid` has died or been stopped, with whatever batches it had."""
        with self._lock:
            self._batches.pop(pid, None)
            self._at_home.discard(pid)
