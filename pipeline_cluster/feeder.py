"""Feeder: reads a user's iterable lazily into a running cluster.

It pulls only as the cluster makes room (its capacity of unfinished root items) and sends items in chunks. A chunk
goes out when it is full, or `FLUSH_SECONDS` after its first item even while the iterable is blocked waiting for its
next item, so a bursty source (a socket, a queue) is never held back behind the item it has not produced yet.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator

from pipeline_cluster.runstate import RunState

CHUNK = 1024
FLUSH_SECONDS = 0.002


class Feeder:
    """Two threads: one pulls items from the iterable, one sends a waiting partial chunk when it is due."""

    def __init__(self, inputs: Iterator[Any], state: RunState, send: Callable[[list], None],
                 stop: threading.Event) -> None:
        self.inputs = inputs
        self.state = state
        self.send = send
        self.stop = stop
        self.cond = threading.Condition()
        self.chunk: list = []
        self.first_at = 0.0
        self.done = False

    def start(self) -> list[threading.Thread]:
        """Start pulling; returns the threads (they end when the inputs end or the run stops)."""
        threads = [threading.Thread(target=self._pull, name="pipeline-cluster-feeder", daemon=True),
                   threading.Thread(target=self._flush_when_due, name="pipeline-cluster-flusher", daemon=True)]
        for thread in threads:
            thread.start()
        return threads

    def _room(self) -> int:
        state = self.state
        return state.capacity - (state.fed - state.consumed) - len(self.chunk)

    def _pull(self) -> None:
        state = self.state
        try:
            while not self.stop.is_set() and state.error is None:
                state.wait(lambda: self._room() > 0 or self.stop.is_set(), what="room to feed")
                for _ in range(min(CHUNK, self._room())):
                    item = next(self.inputs)
                    with self.cond:
                        if not self.chunk:
                            self.first_at = time.monotonic()
                            self.cond.notify()
                        self.chunk.append(item)
                with self.cond:
                    self._flush()
        except StopIteration:
            pass
        except BaseException as exc:  # the user's input iterable raised: end the run with its error
            state.fail(exc)
        finally:
            with self.cond:
                self._flush()
                self.done = True
                self.cond.notify()
            with state.cond:
                state.inputs_done = True
                state.cond.notify_all()
            state.outputs.put(("wake",))

    def _flush_when_due(self) -> None:
        with self.cond:
            while not self.done:
                if not self.chunk:
                    self.cond.wait()
                    continue
                due = self.first_at + FLUSH_SECONDS - time.monotonic()
                if due > 0:
                    self.cond.wait(due)
                else:
                    self._flush()

    def _flush(self) -> None:
        """Send the waiting chunk (caller holds the lock); nothing goes out once the run is stopping."""
        chunk, self.chunk = self.chunk, []
        if chunk and not self.stop.is_set():
            self.state.change(fed=len(chunk), at_root=len(chunk))
            self.send(chunk)
