"""One run of a pipeline, as the caller sees it: its counters (RunState), the feeder that reads the inputs, and the
Results iterator that hands outputs over.

The caller's threads wait on RunState; the RootActor moves it (items handed to nodes, outputs delivered).
"""
from __future__ import annotations

import enum
import queue
import threading
import time
from itertools import chain
from typing import TYPE_CHECKING, Any, NamedTuple
from collections.abc import Callable, Generator, Iterator, Sequence

from pipeline_cluster.errors import ClusterError, InputFailed
from pipeline_cluster.placement import Placement, start_thread

if TYPE_CHECKING:
    from pipeline_cluster.durable import DurableRun

FEED_CHUNK = 1024  # items per message from the feeder (or feed()) to the root
FLUSH_SECONDS = 0.002  # a partial chunk goes out this long after its first item, even while the input blocks


class RunPhase(enum.Enum):
    """Where a cluster is in its life: no pipeline, set up, running, closed."""

    IDLE = "idle"
    SETUP = "setup"
    RUNNING = "running"
    CLOSED = "closed"


class Delivery(NamedTuple):
    """Outputs of the finished root items `done`; `rids` gives each output's root item when the run is keyed;
    `streamed`: outputs of root items still running, whose generators stream."""

    outputs: list
    done: list[int]
    rids: list[int] | None = None
    streamed: bool = False


STREAMED_HIGH = 16  # streamed deliveries waiting for the caller before the nodes hold their streams back ...
STREAMED_LOW = 4  # ... and as few as this when they let them go on


class RunState:
    """The counts of one run (fed, held by the root, consumed), the outputs waiting for the caller, and the first
    fatal error; every change wakes the threads waiting on it."""

    def __init__(self, placement: Placement, on_fail: Callable[[BaseException], None] | None = None) -> None:
        """`on_fail(error)` is called once, when the run's first fatal error is recorded."""
        self._placement = placement
        self._on_fail = on_fail
        self._cond = threading.Condition()
        self._waiters = 0  # threads in wait(): changes wake them only when there are some
        self._outputs: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()  # None: look at the state again
        self.fed = 0  # root items accepted
        self.at_root = 0  # fed but not yet handed to a node
        self.consumed = 0  # root items whose outputs the caller has taken
        self.capacity = 0  # root items allowed unfinished at once (the nodes' credit)
        self.window: int | None = None  # a smaller bound the caller chose (ordered output's reorder window)
        self.first_rid = 0  # the root item id of the run's first input (inputs are numbered in order)
        self.inputs_done = False
        self.input_error: InputFailed | None = None  # the feeder's iterable raised: raised once the rest is done
        self.error: BaseException | None = None
        self.ready_nodes: set[str] = set()
        self.streamed_waiting = 0  # streamed deliveries the caller has not taken yet
        self.streams_held = False
        self.hold_streams: Callable[[bool], None] = lambda held: None  # the root tells the nodes; never blocks

    # -- changes (from the feeder, the RootActor and the caller's side) --------------------------------------------

    def _changed(self) -> None:
        if self._waiters:
            self._cond.notify_all()

    def fed_items(self, n: int) -> int:
        """`n` root items were accepted and wait at the root; returns the root item id of the first (root items are
        numbered in the order they are fed, from `first_rid`)."""
        with self._cond:
            first = self.first_rid + self.fed
            self.fed += n
            self.at_root += n
            self._changed()
        return first

    def sent_to_nodes(self, n: int) -> None:
        """`n` root items left the root for nodes (negative: a lost node's items came back)."""
        with self._cond:
            self.at_root -= n
            self._changed()

    def consume(self, roots: int, streamed: bool = False) -> None:
        """The caller took the outputs of `roots` root items; `streamed`: it took a streamed delivery, so streams
        held back for it go on once it is down to STREAMED_LOW."""
        with self._cond:
            self.consumed += roots
            if streamed:
                self.streamed_waiting -= 1
                if self.streams_held and self.streamed_waiting <= STREAMED_LOW:
                    self.streams_held = False
                    self.hold_streams(False)
            self._changed()

    def set_capacity(self, capacity: int) -> None:
        """The root items the nodes may hold, plus backlog, changed."""
        with self._cond:
            self.capacity = capacity
            self._cond.notify_all()

    def node_ready(self, name: str, ready: bool = True) -> None:
        """Node `name` has its workers up (or is gone)."""
        with self._cond:
            if ready:
                self.ready_nodes.add(name)
            else:
                self.ready_nodes.discard(name)
            self._cond.notify_all()

    def inputs_finished(self) -> None:
        """The input iterable is exhausted (or failed): nothing more will be fed by the feeder."""
        with self._cond:
            self.inputs_done = True
            self._cond.notify_all()
        self._outputs.put(None)

    def deliver(self, outputs: list, done: list[int], rids: list[int] | None = None) -> None:
        """Hand the outputs of the finished root items `done` to the caller (`rids`: each output's root item)."""
        self._outputs.put(Delivery(outputs, done, rids))

    def deliver_streamed(self, outputs: list, rids: list[int]) -> None:
        """Hand the caller outputs of root items that are still running (`rids`: each output's); past
        STREAMED_HIGH deliveries waiting, the streams are held back until the caller has taken all but
        STREAMED_LOW."""
        with self._cond:
            self.streamed_waiting += 1
            if not self.streams_held and self.streamed_waiting > STREAMED_HIGH:
                self.streams_held = True
                self.hold_streams(True)  # under the lock: holds and releases reach the nodes in their order
        self._outputs.put(Delivery(outputs, [], rids, True))

    def wake(self) -> None:
        """Make a thread waiting for outputs look at the state again (the run stops, say)."""
        self._outputs.put(None)

    def fail(self, error: BaseException) -> None:
        """Record the first fatal error; every wait raises it from now on."""
        with self._cond:
            first = self.error is None
            if first:
                self.error = error
            self._cond.notify_all()
        self._outputs.put(None)
        if first and self._on_fail is not None:
            self._on_fail(error)

    # -- queries and waits --------------------------------------------------------------------------------------

    def room(self) -> int:
        """Root items that may still be fed before the run holds its capacity (or its window)."""
        limit = self.capacity if self.window is None else min(self.capacity, self.window)
        return limit - (self.fed - self.consumed)

    def outputs_waiting(self) -> bool:
        """The run holds all the inputs it may while finished outputs wait for the caller to take them."""
        return self.room() <= 0 and self._outputs.qsize() > 0

    def all_consumed(self) -> bool:
        """Every fed root item is finished and its outputs were handed over."""
        return self.consumed == self.fed

    def finished(self) -> bool:
        """The inputs ended and every one of them was handed over."""
        return self.inputs_done and self.consumed == self.fed

    def wait(self, predicate: Callable[[], bool], timeout: float | None = None, what: str = "the cluster") -> None:
        """Block until `predicate()` holds; raise the run's error, or TimeoutError naming `what`."""
        if self.error is None and predicate():  # the usual case, without the lock
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._placement.waiting(), self._cond:
            while True:
                if self.error is not None:
                    raise self.error
                if predicate():
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
                self._waiters += 1
                try:
                    self._cond.wait(left)
                finally:
                    self._waiters -= 1

    def next_delivery(self) -> Delivery | None:
        """The next outputs for the caller, or None when the state should be looked at again."""
        try:
            return self._outputs.get_nowait()
        except queue.Empty:
            with self._placement.waiting():
                return self._outputs.get()


class RunSummary(NamedTuple):
    """How a durable run into a sink ended: its id, inputs complete (and their number, once known), outputs
    written and dead letters, counting earlier attempts of the run."""

    run_id: str
    complete: int
    total: int | None
    outputs: int
    failures: int


class Results:
    """The outputs of `cluster.run(...)`: in completion order, or in input order (`ordered`), each as
    `(input_index, output)` when `keyed`. Leaving the loop early (or `close()`) stops the run."""

    def __init__(self, state: RunState, on_end: Callable[[bool], None], ordered: bool = False,
                 keyed: bool = False, progress: Any = None, durable: DurableRun | None = None) -> None:
        """`progress`: a tqdm bar to advance by the inputs completed; `durable`: the run's journal side, told
        which inputs are complete (and, for keyed output, what each input's index is)."""
        self._current: list[list] = [[]]  # the batch being handed out, so close() can cut it short
        arrange = _in_order if ordered else _keyed if keyed else None
        index = durable.ids.input_ids if durable is not None else None
        self._batches = _batches(state, self._current, on_end, arrange, keyed, progress, durable, index)
        self._outputs = chain.from_iterable(self._batches)  # Python runs once per batch, not per output (W1)

    def __iter__(self) -> Iterator[Any]:
        return self._outputs  # a for loop drives the iterator itself: no wrapper call per output

    def __next__(self) -> Any:
        return next(self._outputs)

    def close(self) -> None:
        """Stop the run now (unfinished items are dropped) and stop its workers; iteration ends at once."""
        self._current[0].clear()  # the batch's list iterator inside chain stops at its next step
        self._batches.close()

    def drain(self, before: Callable[[], None], write: Callable[[list], None]) -> None:
        """Hand every batch of outputs to `write` (calling `before` first each time) until the run ends."""
        for outputs in self._batches:
            before()
            write(outputs)


Index = Callable[[Sequence[int]], list]  # root item ids -> the input indices keyed output shows, a batch at a time
Arrange = Callable[[Delivery, RunState, dict[int, list], bool, Index], tuple[list, Sequence[int]]]


def _keyed(delivery: Delivery, state: RunState, held: dict[int, list], keyed: bool,
           index: Index) -> tuple[list, Sequence[int]]:
    """Outputs as (input index, output), in completion order; every finished root item is consumed at once."""
    return list(zip(index(delivery.rids or ()), delivery.outputs)), delivery.done


def _in_order(delivery: Delivery, state: RunState, held: dict[int, list], keyed: bool,
              index: Index) -> tuple[list, Sequence[int]]:
    """The outputs of the next root items in input order, as far as they are finished; later ones wait in `held`
    (bounded: they are not consumed yet, so they count against the room to feed)."""
    for rid in delivery.done:
        held.setdefault(rid, [])
    for rid, output in zip(delivery.rids or (), delivery.outputs):
        held[rid].append(output)
    ready: list = []
    first = rid = state.first_rid + state.consumed
    while rid in held:
        outputs = held.pop(rid)
        if keyed:
            (input_index,) = index((rid,))
            ready.extend([(input_index, output) for output in outputs])
        else:
            ready.extend(outputs)
        rid += 1
    return ready, range(first, rid)


def _batches(state: RunState, current: list[list], on_end: Callable[[bool], None], arrange: Arrange | None,
             keyed: bool, progress: Any, durable: DurableRun | None,
             index: Index | None) -> Generator[list, None, None]:
    """Yield lists of outputs until every input is done; a root item's outputs count as consumed once the caller
    asks for what follows them. A module-level generator, so nothing refers back to it: when the caller's loop lets
    go of it (break, an exception), CPython closes it at once and `on_end(finished)` stops the run."""
    finished = False
    held: dict[int, list] = {}  # ordered output: finished root items waiting for earlier ones
    if index is None:
        base = state.first_rid

        def index(rids: Sequence[int]) -> list:  # inputs are numbered in order from the run's first root item
            return [rid - base for rid in rids]
    try:
        while True:
            if state.error is not None:
                raise state.error
            if state.finished():
                finished = True
                if state.input_error is not None:
                    raise state.input_error
                return
            delivery = state.next_delivery()
            if delivery is None:
                continue
            done: Sequence[int]
            if arrange is None:
                outputs, done = delivery.outputs, delivery.done
            else:
                outputs, done = arrange(delivery, state, held, keyed, index)
            current[0] = outputs
            yield outputs
            state.consume(len(done), delivery.streamed)
            if durable is not None:
                durable.completed(done, len(outputs), (delivery.rids or ()) if delivery.streamed else ())
            if progress is not None:
                progress.update(len(done))
    finally:
        if progress is not None:
            progress.close()
        on_end(finished)


class Feeder:
    """Reads the caller's iterable lazily into a running cluster, as room allows, in chunks.

    One thread pulls items (it runs the caller's iterable, so it is never placed); another sends a partial chunk
    `FLUSH_SECONDS` after its first item, so a bursty source is never held back behind an item it has not produced
    yet. The puller appends without the lock and locks only to start the flusher's clock and to send a full chunk;
    only the puller replaces the chunk, so nothing is sent twice or skipped.
    """

    def __init__(self, inputs: Iterator[Any], state: RunState, send: Callable[[list, int], None],
                 stop: threading.Event, placement: Placement) -> None:
        self.inputs = inputs
        self.state = state
        self.send = send
        self.stop = stop
        self.placement = placement
        self.cond = threading.Condition()
        self.chunk: list = []
        self.sent = 0  # items at the front of `chunk` that the flusher has sent already
        self.first_at = 0.0  # when the oldest unsent item arrived
        self.done = False
        self.input_seconds = 0.0  # time spent in the caller's iterable (for the verdict: is the input the limit?)

    def start(self) -> list[threading.Thread]:
        """Start pulling; returns the threads (they end when the inputs end or the run stops)."""
        return [start_thread(self._pull, name="pipeline-cluster-feeder"),
                self.placement.start_thread(self._flush_when_due, name="pipeline-cluster-flusher")]

    def _room(self) -> int:
        return self.state.room() - (len(self.chunk) - self.sent)

    def _pull(self) -> None:
        state = self.state
        failure: BaseException | None = None
        try:
            while not self.stop.is_set() and state.error is None:
                try:
                    state.wait(lambda: self._room() > 0 or self.stop.is_set(), what="room to feed")
                except BaseException:  # the run failed: nothing more is read
                    return
                started = time.perf_counter()
                try:
                    self._read(min(FEED_CHUNK, self._room()))
                except StopIteration:
                    return
                except BaseException as exc:  # the caller's iterable raised: what it gave runs to the end first
                    failure = exc
                    return
                finally:
                    self.input_seconds += time.perf_counter() - started
                with self.cond:
                    self._send_unsent()
                    self.chunk, self.sent = [], 0
        finally:
            with self.cond:
                self._send_unsent()
                self.done = True
                self.cond.notify()
            if failure is not None:
                state.input_error = InputFailed(state.fed, failure)
                state.input_error.__cause__ = failure
            state.inputs_finished()

    def _read(self, count: int) -> None:
        """Append up to `count` items of the iterable to the chunk (StopIteration at its end)."""
        chunk = self.chunk
        for _ in range(count):
            chunk.append(next(self.inputs))
            if len(chunk) == self.sent + 1:  # the only unsent item: start the flusher's clock
                self._first_unsent()

    def _first_unsent(self) -> None:
        with self.cond:
            if len(self.chunk) > self.sent:
                self.first_at = time.monotonic()
                self.cond.notify()

    def _flush_when_due(self) -> None:
        try:
            self._flush_loop()
        except BaseException as exc:  # never silently: a dead flusher would hold a partial chunk back for good
            self.state.fail(ClusterError(f"internal error in the feeder: {exc!r}"))

    def _flush_loop(self) -> None:
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
            first_rid = self.state.fed_items(len(items))  # before `sent` moves: room is never overcounted
            self.sent = end
            self.send(items, first_rid)
        else:
            self.sent = end
