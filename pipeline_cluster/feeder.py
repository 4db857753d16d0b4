"""Feeder: reads a user's iterable lazily into a running cluster.

It pulls only as the cluster makes room (its capacity of unfinished root items) and sends items in chunks. A chunk
goes out when it is full, or `FLUSH_SECONDS` after its first item even while the iterable is blocked waiting for its
next item, so a bursty source (a socket, a queue) is never held back behind the item it has not produced yet.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator

from pipeline_cluster import affinity
from pipeline_cluster.runstate import RunState

CHUNK = 1024
FLUSH_SECONDS = 0.002


class Feeder:
    """Two threads: one pulls items from the iterable, one sends a waiting partial chunk when it is due.

    The puller appends to the chunk without taking the lock (it only locks when an item is the first one not yet
    sent, to start the flusher's clock, and to send a full chunk); the flusher sends the unsent tail and moves
    `sent` on. Only the puller replaces the chunk, so nothing is sent twice or skipped.
    """

    def __init__(self, inputs: Iterator[Any], state: RunState, send: Callable[[list], None],
                 stop: threading.Event) -> None:
        self.inputs = inputs
        self.state = state
        self.send = send
        self.stop = stop
        self.cond = threading.Condition()
        self.chunk: list = []
        self.sent = 0  # items at the front of `chunk` that the flusher has sent already
        self.first_at = 0.0  # when the oldest unsent item arrived
        self.done = False

    def start(self) -> list[threading.Thread]:
        """Start pulling; returns the threads (they end when the inputs end or the run stops)."""
        return [affinity.start_thread(self._pull, name="pipeline-cluster-feeder", placed=False),  # the user's code
                affinity.start_thread(self._flush_when_due, name="pipeline-cluster-flusher")]

    def _room(self) -> int:
        state = self.state
        return state.capacity - (state.fed - state.consumed) - (len(self.chunk) - self.sent)

    def _pull(self) -> None:
        state = self.state
        try:
            while not self.stop.is_set() and state.error is None:
                state.wait(lambda: self._room() > 0 or self.stop.is_set(), what="room to feed")
                chunk = self.chunk
                for _ in range(min(CHUNK, self._room())):
                    chunk.append(next(self.inputs))
                    if len(chunk) == self.sent + 1:  # the only unsent item: start the flusher's clock
                        self._first_unsent()
                with self.cond:
                    self._send_unsent()
                    self.chunk, self.sent = [], 0
        except StopIteration:
            pass
        except BaseException as exc:  # the user's input iterable raised: end the run with its error
            state.fail(exc)
        finally:
            with self.cond:
                self._send_unsent()
                self.done = True
                self.cond.notify()
            with state.cond:
                state.inputs_done = True
                state.cond.notify_all()
            state.outputs.put(("wake",))

    def _first_unsent(self) -> None:
        with self.cond:
            if len(self.chunk) > self.sent:
                self.first_at = time.monotonic()
                self.cond.notify()

    def _flush_when_due(self) -> None:
        with self.cond:
            while not self.done:
                if len(self.chunk) == self.sent:
                    self.cond.wait()
                    continue
                due = self.first_at + FLUSH_SECONDS - time.monotonic()
                if due > 0:
                    self.cond.wait(due)
                else:
                    self._send_unsent()

    def _send_unsent(self) -> None:
        """Send the chunk's unsent items (caller holds the lock); nothing goes out once the run is stopping."""
        end = len(self.chunk)
        items = self.chunk[self.sent:end]
        if items and not self.stop.is_set():
            self.state.change(fed=len(items), at_root=len(items))  # before `sent` moves: room is never overcounted
            self.sent = end
            self.send(items)
        else:
            self.sent = end
