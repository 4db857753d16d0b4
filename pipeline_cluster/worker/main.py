"""The program inside a worker process: builds one stage's task and runs batches of items through it.

Run in a process forked by the node's zygote (`worker/zygote.py`), or, without one, in a fresh interpreter
(`python -c LAUNCH PACKAGE_ROOT SOCK_FD PROGRESS_FD`); `main` gets the two descriptors either way. It talks to
its WorkerActor over a socket pair (framed by `wire.Channel`: one copy from the kernel, none to send), and writes the
index and start time of the item it is running into a small shared memory file, so the supervisor can blame exactly
that item when the process dies or hangs.
"""
from __future__ import annotations

import ctypes
import logging
import math
import mmap
import os
import pickle
import signal
import socket
import struct
import sys
import time
import traceback
from collections import deque
from itertools import islice
from typing import TYPE_CHECKING, Any, NamedTuple
from collections.abc import Callable, Iterator

import cloudpickle

from pipeline_cluster.logs import route
from pipeline_cluster.messages import (BatchResult, InitFailed, ItemError, Part, PartAck, RunBatch, Started, Stop,
                                       Stopped, Timing, TreeChange, Unreadable, WorkerInit)
from pipeline_cluster.transport import wire

if TYPE_CHECKING:
    from pipeline_cluster.worker.concurrent import ConcurrentRunner

PROGRESS = struct.Struct("<qd")  # index of the running item in its batch (-1: idle), its start (time.monotonic)
PROGRESS_SIZE = PROGRESS.size
SAMPLES_PER_BATCH = 64  # item durations sent back per batch, for the p95 estimate
MAX_FRAME = 1 << 40  # the socket pair to the node carries batches of any size the node's memory allows
STREAM_PART = 1024  # a generator item that yields more than this sends its outputs on in parts of up to this many
PART_BYTES = 4 << 20  # parts of big outputs get fewer of them, to about this many pickled bytes
PART_WINDOW = 2  # parts sent and not yet passed on by the node: the generator waits beyond that
_END = object()


class Streamer:
    """The worker's channel to its node, with flow control for streamed parts: `send_part` waits while
    PART_WINDOW parts are not yet acknowledged, keeping any other message that comes meanwhile for `next_message`."""

    def __init__(self, conn: wire.Channel) -> None:
        self.conn = conn
        self.unacked = 0
        self.kept: deque[Any] = deque()  # messages (or UnpicklingFailed errors) read while waiting for an ack
        self.part_size = STREAM_PART  # outputs per part: sized to PART_BYTES by the parts before

    def send_part(self, position: int, outputs: list, last: bool) -> None:
        inner = wire.pack(wire.out_of_band(outputs))
        if outputs:
            self.part_size = max(1, min(STREAM_PART, len(outputs) * PART_BYTES // max(1, inner.nbytes)))
        self.conn.send_packed(wire.pack(Part(position, inner.payload, [pickle.PickleBuffer(buffer)
                                                                      for buffer in inner.buffers], last)))
        self.unacked += 1
        while self.unacked >= PART_WINDOW:
            try:
                message = self._read()
            except (EOFError, OSError):
                raise SystemExit(0) from None  # the node is gone: so is this process, task code or not
            if message is not None:
                self.kept.append(message)

    def next_message(self) -> Any:
        """The node's next message other than an ack (raises as `Channel.recv` does)."""
        while True:
            message = self.kept.popleft() if self.kept else self._read()
            if isinstance(message, BaseException):
                raise message
            if message is not None:
                return message

    def _read(self) -> Any:
        """One message; None for an ack (counted), an UnpicklingFailed error as a value."""
        try:
            message = self.conn.recv()
        except wire.UnpicklingFailed as exc:
            return exc
        if type(message) is PartAck:
            self.unacked -= 1
            return None
        return message


class Outcome(NamedTuple):
    """One item's result: its outputs (None: dropped), or the error it raised; and the seconds it took."""

    outputs: list | None
    error: ItemError | None
    seconds: float


class Ran(NamedTuple):
    """A batch as run here: outputs, outputs per item (None: one each), errors, dropped count, timing."""

    outputs: list
    counts: list[int] | None
    errors: list[ItemError]
    dropped: int
    timing: Timing


class TaskRunner:
    """Runs one stage's task over batches, catching each item's failure separately."""

    def __init__(self, spec: dict, retry_on: tuple[type[BaseException], ...], progress: mmap.mmap,
                 timeout: float | None, streamer: Streamer | None = None) -> None:
        """`streamer`: how a generator item that yields many outputs sends them on as it yields (None: it does
        not; a concurrent or batch stage collects each item's outputs whole)."""
        self.name: str = spec["name"]
        self.generator: bool = spec["generator"]
        self.retry_on = retry_on
        self.index_slot = memoryview(progress).cast("q")  # [0]: index of the running item
        # [1]: its start, for timeouts
        self.start_slot = memoryview(progress).cast("d") if timeout is not None else None
        task = spec["task"]
        if spec["is_class"]:
            self.instance = task(*spec["args"], **spec["kwargs"])
            self.call: Callable[[Any], Any] = self.instance
        else:
            self.instance = None
            args, kwargs = spec["args"], spec["kwargs"]
            self.call = (lambda item: task(item, *args, **kwargs)) if args or kwargs else task
        self.batch_size: int | None = spec.get("batch_size")
        self.concurrent: ConcurrentRunner | None = None
        if spec.get("concurrency", 1) > 1 or spec.get("is_async"):
            from pipeline_cluster.worker.concurrent import ConcurrentRunner  # asyncio only where it is used

            run_one = self._run_one_async if spec.get("is_async") else self._run_one
            self.concurrent = ConcurrentRunner(run_one, spec.get("concurrency", 1), spec.get("is_async", False),
                                               timeout, retry_on, self._publish)
        self.streamer = streamer if self.generator and self.concurrent is None and self.batch_size is None else None
        self.streamed = 0  # outputs of the running item sent on in parts so far

    def _publish(self, index: int, started: float) -> None:
        """Show the supervisor which item runs (the longest-running one, with concurrency) and since when."""
        if self.start_slot is not None:
            self.start_slot[1] = started  # written before the index: the parent never pairs it with a stale start
        self.index_slot[0] = index

    def _outputs(self, result: Any, item: Any) -> list | None:
        if result is None:
            return None
        return self._expand(result, item) if self.generator else [result]

    def _run_one(self, index: int, item: Any) -> list | None:
        return self._outputs(self.call(item), item)

    async def _run_one_async(self, index: int, item: Any) -> list | None:
        return self._outputs(await self.call(item), item)

    def run_batch(self, items: list) -> Ran:
        """Run every item, catching each one's failure separately.

        Only a strided sample of items is timed one by one (for percentiles); the mean comes from the batch's
        total time.
        """
        if self.concurrent is not None:
            return self._run_concurrently(items)
        if self.batch_size is not None:
            return self._run_in_lists(items)
        outs: list = []
        counts: list[int] | None = None  # outputs per item, made only once an item gives other than one
        errors: list[ItemError] = []
        samples: list[float] = []
        dropped = 0
        clock = time.monotonic
        stride = max(1, len(items) // SAMPLES_PER_BATCH)
        batch_start = clock()
        for index, item in enumerate(items):
            if self.start_slot is not None:
                self.start_slot[1] = clock()  # written before the index: the parent never pairs it with a stale start
            self.index_slot[0] = index
            sampled = index % stride == 0
            if sampled:
                started = clock()
            try:
                result = self.call(item)
                if result is None:
                    dropped += 1
                    n = 0
                elif self.generator:
                    produced = self._expand(result, item, index)
                    outs.extend(produced)
                    n = len(produced)
                else:
                    outs.append(result)
                    n = 1
            except Exception as exc:
                message, retryable = _message(exc), isinstance(exc, self.retry_on)
                if self.streamed:  # its outputs so far went on: running it again would send them twice
                    message += f" (after {self.streamed} of its outputs were sent on; not retried)"
                    retryable, self.streamed = False, 0
                errors.append(ItemError(index, type(exc).__name__, message, traceback.format_exc(), retryable))
                n = 0
            if sampled:
                samples.append(clock() - started)
            if counts is not None:
                counts.append(n)
            elif n != 1:
                counts = [1] * index
                counts.append(n)
        self.index_slot[0] = -1
        busy = sum(samples) if stride == 1 else clock() - batch_start  # every item timed: use exactly those times
        return Ran(outs, counts, errors, dropped, Timing(busy, len(items), samples))

    def _run_concurrently(self, items: list) -> Ran:
        assert self.concurrent is not None
        return _assemble(*self.concurrent.run_batch(items))

    def _run_in_lists(self, items: list) -> Ran:
        """A batch stage: the task takes lists of up to `batch_size` items. A list whose call raises is split in
        halves and run again, down to single items, so only the items that fail are charged."""
        assert self.batch_size is not None
        started = time.monotonic()
        outcomes: list[Outcome | None] = [None] * len(items)
        for first in range(0, len(items), self.batch_size):
            self._solve(first, items[first:first + self.batch_size], outcomes)
        self.index_slot[0] = -1
        done = [outcome for outcome in outcomes if outcome is not None]
        return _assemble(done, Timing(time.monotonic() - started, len(items), []))

    def _solve(self, first: int, items: list, outcomes: list[Outcome | None]) -> None:
        """Run `items` (the batch's items from position `first`) as one list, or, when that raises, in halves."""
        self._publish(first, time.monotonic())
        try:
            results = self.call(items)
            if not isinstance(results, (list, tuple)) or len(results) != len(items):
                raise TypeError(f"batch stage {self.name!r} returned {_short(results)} for {len(items)} item(s); "
                                "it must return a list of as many results")
        except Exception as exc:
            if len(items) > 1:
                half = len(items) // 2
                self._solve(first, items[:half], outcomes)
                self._solve(first + half, items[half:], outcomes)
                return
            outcomes[first] = Outcome(None, ItemError(first, type(exc).__name__, _message(exc),
                                                      traceback.format_exc(), isinstance(exc, self.retry_on)), 0.0)
            return
        for offset, (item, result) in enumerate(zip(items, results)):
            try:
                outcomes[first + offset] = Outcome(self._outputs(result, item), None, 0.0)
            except Exception as exc:  # a generator batch stage gave something that is not an iterable
                outcomes[first + offset] = Outcome(None, ItemError(first + offset, type(exc).__name__,
                                                                   _message(exc), traceback.format_exc(), False), 0.0)


    def _expand(self, result: Any, item: Any, position: int = -1) -> list:
        """A generator item's outputs; past STREAM_PART of them, the item at `position` of a sequential batch
        streams them on in parts instead (and the list returned is empty)."""
        if isinstance(result, (str, bytes, bytearray)) or not hasattr(result, "__iter__"):
            raise TypeError(f"generator stage {self.name!r} returned a {type(result).__name__} for item "
                            f"{_short(item)}; a generator stage must return an iterable of items (or None)")
        if (type(result) is tuple or type(result) is list) and len(result) <= STREAM_PART:  # the usual case
            return [out for out in result if out is not None]
        iterator = iter(result)
        outs = [out for out in islice(iterator, STREAM_PART) if out is not None]
        if len(outs) < STREAM_PART:  # it ended, or it yielded None among them
            following = next(iterator, _END)
            if following is _END:
                return outs
            if following is not None:
                outs.append(following)
        if self.streamer is None or position < 0:
            outs.extend(out for out in iterator if out is not None)
            return outs
        return self._stream(position, outs, iterator)

    def _stream(self, position: int, outs: list, iterator: Iterator) -> list:
        """Send the item's outputs on a part at a time as its generator yields them; the node's acknowledgements
        hold it back when the stages after it, or the caller, are behind."""
        assert self.streamer is not None
        self._send_part(position, outs)
        while True:
            part: list = []
            size = self.streamer.part_size
            consumed = 0
            try:
                for out in islice(iterator, size):
                    consumed += 1
                    if out is not None:
                        part.append(out)
            except Exception:  # what it yielded before it raised goes on too; then the item fails
                if part:
                    self._send_part(position, part)
                raise
            if consumed < size:
                break
            self._send_part(position, part)
        self._send_part(position, part, last=True)
        self.streamed = 0
        return []

    def _send_part(self, position: int, outs: list, last: bool = False) -> None:
        """Send a part on; the time its generator is held back waiting for room is not counted by the timeout."""
        assert self.streamer is not None
        if self.start_slot is not None:
            self.start_slot[1] = math.inf
        self.streamer.send_part(position, outs, last)
        self.streamed += len(outs)
        if self.start_slot is not None:
            self.start_slot[1] = time.monotonic()

    def close(self) -> None:
        """Call the class stage's optional close() once, when the worker stops."""
        if self.concurrent is not None:
            self.concurrent.close()
        close = getattr(self.instance, "close", None)
        if callable(close):
            close()


def _assemble(outcomes: list[Outcome], timing: Timing) -> Ran:
    """A batch's Ran from its items' outcomes, in batch order."""
    outs: list = []
    counts: list[int] = []
    errors: list[ItemError] = []
    for outcome in outcomes:
        if outcome.error is not None:
            errors.append(outcome.error)
        if outcome.outputs is not None:
            outs.extend(outcome.outputs)
        counts.append(len(outcome.outputs) if outcome.outputs is not None else 0)
    dropped = sum(1 for outcome in outcomes if outcome.outputs is None and outcome.error is None)
    return Ran(outs, None if all(n == 1 for n in counts) else counts, errors, dropped, timing)


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return repr(exc)


def _short(item: Any, limit: int = 120) -> str:
    text = repr(item)
    return text if len(text) <= limit else text[:limit] + "..."


def tree_changes(rids: list[int], counts: list[int] | None, errors: list[ItemError]) -> TreeChange | None:
    """What a batch did to its root items' trees (None: every item gave exactly one output, nothing changed).
    Worked out here so the node does no per-item work."""
    if counts is None:
        return None
    out_rids: list[int] = []
    born: list[int] = []
    died: list[int] = []
    failed = {error.position for error in errors}
    for index, (rid, n) in enumerate(zip(rids, counts)):
        if n:
            out_rids.extend([rid] * n)
            born.extend([rid] * (n - 1))
        elif index not in failed:
            died.append(rid)
    return TreeChange(out_rids, born, died, counts)


def encode_result(ran: Ran, rids: list[int], items: list, stage: str) -> wire.Packed:
    """Pickle a batch's BatchResult, big `bytes` outputs out-of-band. Outputs that cannot be pickled fail their own
    item, not the batch."""
    try:
        return wire.pack(BatchResult(wire.out_of_band(ran.outputs), tree_changes(rids, ran.counts, ran.errors),
                                     ran.errors, ran.dropped, ran.timing))
    except Exception:
        pass
    counts = ran.counts if ran.counts is not None else [1] * len(items)
    errors = list(ran.errors)
    kept: list = []
    kept_counts: list[int] = []
    position = 0
    for index, n in enumerate(counts):
        mine = ran.outputs[position:position + n]
        position += n
        try:
            wire.pack(mine)
        except Exception as exc:
            errors.append(ItemError(index, "PicklingError", f"stage {stage!r}: an output of item "
                                    f"{_short(items[index])} cannot be pickled: {exc}", traceback.format_exc(),
                                    False))
            n, mine = 0, []
        kept.extend(mine)
        kept_counts.append(n)
    errors.sort()
    return wire.pack(BatchResult(wire.out_of_band(kept), tree_changes(rids, kept_counts, errors), errors,
                                 ran.dropped, ran.timing))


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the node's zygote, or the node) dies, so no worker is
    orphaned."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    """Serve one stage until told to stop or the parent goes away."""
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent or parent == 1:
        return 1
    conn = wire.Channel(socket.socket(fileno=int(argv[0])), max_frame=MAX_FRAME)
    progress = mmap.mmap(int(argv[1]), PROGRESS_SIZE)
    send = conn.send  # thread-safe: log records may come from the task's own threads
    streamer = Streamer(conn)

    init = conn.recv()
    assert isinstance(init, WorkerInit), init
    sys.path[:] = init.sys_path + [p for p in sys.path if p not in init.sys_path]
    route.attach_worker(send, node=init.node, stage=init.stage, level=init.log_level)
    try:
        spec = cloudpickle.loads(init.spec)
        runner = TaskRunner(spec, cloudpickle.loads(init.retry_on), progress, init.timeout, streamer)
    except BaseException as exc:  # the stage cannot start: report why, with the traceback
        send(InitFailed(f"{type(exc).__name__}: {_message(exc)}", traceback.format_exc()))
        return 3
    send(Started(os.getpid()))
    while True:
        try:
            message = streamer.next_message()
        except wire.UnpicklingFailed as exc:  # e.g. an item's class is missing here: its batch fails, we go on
            send(Unreadable(str(exc), traceback.format_exc()))
            continue
        except (EOFError, OSError):
            return 0
        if isinstance(message, RunBatch):
            conn.send_packed(encode_result(runner.run_batch(message.items), message.rids, message.items,
                                           runner.name))
        elif isinstance(message, Stop):
            try:
                runner.close()
            except Exception:
                logging.getLogger("pipeline_cluster.worker").exception("close() of stage %r failed", runner.name)
            send(Stopped())
            return 0
