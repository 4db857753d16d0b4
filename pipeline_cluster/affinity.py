"""Thread placement: the framework's own threads in a process share one CPU, its "home".

They take turns on the GIL anyway, so spreading them over CPUs buys no parallelism, while every hand-off between
threads (an actor message, a queue) then wakes a thread on another CPU, which costs several times as much as on the
same one (~50 us against ~8 us per pykka message on a 2-vCPU VM). Only threads the framework starts for its own
code are placed: not the user's threads, and a placed thread that runs the user's input iterable or output handler
leaves its placement for that while (what the user's code starts inherits the user's CPUs); worker processes start
on the CPUs the main thread may use.
`PIPELINE_CLUSTER_PIN_THREADS=0` turns placement off.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from typing import Any, Callable, Iterator

ENV_SWITCH = "PIPELINE_CLUSTER_PIN_THREADS"

_can_pin = hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")
ALLOWED: frozenset[int] = frozenset(os.sched_getaffinity(0)) if _can_pin else frozenset()  # before any placement
_home: int | None = None
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


def pin_this_thread() -> None:
    """Move the calling framework thread to this process's home CPU (chosen by the first caller: where it runs)."""
    global _home
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


def start_thread(target: Callable[..., Any], *args: Any, name: str) -> threading.Thread:
    """Start a daemon framework thread that runs on the home CPU."""

    def run() -> None:
        pin_this_thread()
        target(*args)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def unplaced() -> Iterator[None]:
    """Let a placed calling thread run, for a while, on the CPUs the process's main thread may use now (the user's
    own restriction, if any): a worker process it starts, or the user's code it runs (an input iterable, an output
    handler) and what that starts, get those CPUs, not the home CPU. Three system calls, so used per batch."""
    placed = _home is not None and os.sched_getaffinity(0) == {_home}  # even if placement was switched off since
    if placed:
        os.sched_setaffinity(0, _user_cpus())
    try:
        yield
    finally:
        if placed:
            os.sched_setaffinity(0, {_home})


def _user_cpus() -> set[int]:
    try:
        return os.sched_getaffinity(threading.main_thread().native_id or 0)
    except OSError:  # the main thread has ended
        return set(ALLOWED)
