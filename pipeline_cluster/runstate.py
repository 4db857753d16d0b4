"""RunState: the counters that the user's threads wait on and the RootActor moves, under one condition."""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

from pipeline_cluster import affinity


class RunState:
    """Counts of one run: fed, held by the root, delivered, consumed; plus the first fatal error."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.fed = 0          # root items accepted by feed()
        self.at_root = 0      # fed but not yet handed to a node
        self.consumed = 0     # root items whose outputs the iterator or handler has taken
        self.capacity = 0     # root items allowed unfinished at once (set by the RootActor from node credits)
        self.inputs_done = False
        self.error: BaseException | None = None
        self.ready_nodes: set[str] = set()
        self.waiters = 0      # threads in wait(): change() wakes them only when there are some
        self.outputs: queue.SimpleQueue = queue.SimpleQueue()  # ("out", outputs, n_roots) | ("wake",) | ("error",)

    def change(self, **deltas: int) -> None:
        """Add to counters and wake every waiter (if any: most changes have none, and notify_all is Python code)."""
        with self.cond:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)
            if self.waiters:
                self.cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """Record the first fatal error; every wait raises it from now on."""
        with self.cond:
            if self.error is None:
                self.error = error
            self.cond.notify_all()
        self.outputs.put(("error",))

    def wait(self, predicate: Callable[[], bool], timeout: float | None = None, what: str = "the cluster") -> None:
        """Block until `predicate()` holds; raise the run's error, or TimeoutError naming `what`."""
        if self.error is None and predicate():  # the usual case, without the lock: the caller acts after the check
            return                               # either way, so a check under the lock promises no more
        deadline = None if timeout is None else time.monotonic() + timeout
        with affinity.waiting_at_home(), self.cond:
            while True:
                if self.error is not None:
                    raise self.error
                if predicate():
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
                self.waiters += 1
                try:
                    self.cond.wait(left)
                finally:
                    self.waiters -= 1

    def next_output(self) -> tuple:
        """The next message on `outputs`; a thread that has to wait for it waits on the home CPU (see
        `affinity.waiting_at_home`), one that need not makes no system call for that."""
        try:
            return self.outputs.get_nowait()
        except queue.Empty:
            with affinity.waiting_at_home():
                return self.outputs.get()

    def all_consumed(self) -> bool:
        """Every fed root item is finished and its outputs were handed over."""
        return self.consumed == self.fed
