"""The program inside a worker process: builds one stage's task and runs batches of items through it.

Started by a WorkerActor as a fresh interpreter (`python -c LAUNCH SOCK_FD PROGRESS_FD`),
like multiprocessing's spawn but without re-importing the user's `__main__`. It talks to its WorkerActor over a
socket pair (framed by `wire.Channel`: one copy from the kernel, none to send), and writes the index and start time
of the item it is running into a small shared memory file, so the supervisor can blame exactly that item when the
process dies or hangs.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import signal
import socket
import struct
import sys
import time
import traceback
from itertools import chain, repeat
from operator import sub
from typing import Any, Callable

import cloudpickle

from pipeline_cluster import affinity, multiprocess_logging, wire

PROGRESS = struct.Struct("<qd")  # index of the running item in its batch (-1: idle), its start (time.monotonic)
PROGRESS_SIZE = PROGRESS.size
SAMPLES_PER_BATCH = 64  # item durations sent back per batch, for the p95 estimate
MAX_FRAME = 1 << 40  # the socket pair to the node carries batches of any size the node's memory allows


class TaskRunner:
    """Runs one stage's task over batches, catching each item's failure separately."""

    def __init__(self, spec: dict, retry_on: tuple[type[BaseException], ...], progress: mmap.mmap,
                 timed: bool) -> None:
        self.name: str = spec["name"]
        self.generator: bool = spec["generator"]
        self.retry_on = retry_on
        self.index_slot = memoryview(progress).cast("q")  # [0]: index of the running item
        self.start_slot = memoryview(progress).cast("d") if timed else None  # [1]: its start, for timeouts
        task = spec["task"]
        if spec["is_class"]:
            self.instance = task(*spec["args"], **spec["kwargs"])
            self.call: Callable[[Any], Any] = self.instance
        else:
            self.instance = None
            args, kwargs = spec["args"], spec["kwargs"]
            self.call = (lambda item: task(item, *args, **kwargs)) if args or kwargs else task

    def run_batch(self, items: list) -> tuple:
        """Run every item; returns (outputs, counts or None, errors, dropped, (seconds, n, samples)).

        counts (outputs per item) is None when every item gave exactly one output, the common case. Only a
        strided sample of items is timed one by one (for the p95); the mean comes from the batch's total time.
        """
        outs: list = []
        counts: list[int] | None = None
        errors: list = []
        samples: list[float] = []
        dropped = 0
        call, generator, index_slot, start_slot = self.call, self.generator, self.index_slot, self.start_slot
        clock = time.monotonic
        stride = max(1, len(items) // SAMPLES_PER_BATCH)
        batch_start = clock()
        for index, item in enumerate(items):
            if start_slot is not None:
                start_slot[1] = clock()  # written before the index: the parent never pairs it with a stale start
            index_slot[0] = index
            sampled = index % stride == 0
            if sampled:
                started = clock()
            try:
                result = call(item)
                if result is None:
                    dropped += 1
                    n = 0
                elif generator:
                    produced = self._expand(result, item)
                    outs.extend(produced)
                    n = len(produced)
                else:
                    outs.append(result)
                    n = 1
            except Exception as exc:
                errors.append((index, type(exc).__name__, _message(exc), traceback.format_exc(),
                               isinstance(exc, self.retry_on)))
                n = 0
            if sampled:
                samples.append(clock() - started)
            if counts is not None:
                counts.append(n)
            elif n != 1:
                counts = [1] * index
                counts.append(n)
        index_slot[0] = -1
        busy = sum(samples) if stride == 1 else clock() - batch_start  # every item timed: use exactly those times
        return outs, counts, errors, dropped, (busy, len(items), samples)

    def _expand(self, result: Any, item: Any) -> list:
        if isinstance(result, (str, bytes, bytearray)) or not hasattr(result, "__iter__"):
            raise TypeError(f"generator stage {self.name!r} returned a {type(result).__name__} for item "
                            f"{_short(item)}; a generator stage must return an iterable of items (or None)")
        return [out for out in result if out is not None]

    def close(self) -> None:
        """Call the class stage's optional close() once, when the worker stops."""
        close = getattr(self.instance, "close", None)
        if callable(close):
            close()


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return repr(exc)


def _short(item: Any, limit: int = 120) -> str:
    text = repr(item)
    return text if len(text) <= limit else text[:limit] + "..."


def tree_changes(rids: list[int], counts: list[int] | None, errors: list) -> tuple | None:
    """What a batch did to its root items' trees: None when every item gave exactly one output (nothing changed),
    else (root item of each output, a root item per item born beyond the first output of an input, a root item
    per input that ended here with no output and no error). Computed here so the node does no per-item work."""
    if counts is None:
        return None
    out_rids = list(chain.from_iterable(map(repeat, rids, counts)))
    born = list(chain.from_iterable(map(repeat, rids, map(sub, counts, repeat(1)))))
    failed = {error[0] for error in errors}
    died = [rid for index, (rid, n) in enumerate(zip(rids, counts)) if not n and index not in failed]
    return out_rids, born, died


def encode_result(result: tuple, rids: list[int], items: list, stage: str) -> wire.Packed:
    """Pickle a batch result as (outputs, tree changes, errors, dropped, timing), big `bytes` outputs out-of-band.

    Messages travel with cloudpickle (`wire.pack`): `__main__` classes travel by value and keep their identity on
    the way back. Outputs that cannot be pickled fail their own item, not the batch.
    """
    outs, counts, errors, dropped, timing = result
    try:
        return wire.pack(("result", (wire.out_of_band(outs), tree_changes(rids, counts, errors), errors, dropped,
                                     timing)))
    except Exception:
        pass
    counts = counts if counts is not None else [1] * len(items)
    kept: list = []
    kept_counts: list[int] = []
    position = 0
    for index, n in enumerate(counts):
        mine = outs[position:position + n]
        position += n
        try:
            wire.pack(mine)
        except Exception as exc:
            errors.append((index, "PicklingError", f"stage {stage!r}: an output of item {_short(items[index])} "
                           f"cannot be pickled: {exc}", traceback.format_exc(), False))
            n, mine = 0, []
        kept.extend(mine)
        kept_counts.append(n)
    errors.sort()
    return wire.pack(("result", (wire.out_of_band(kept), tree_changes(rids, kept_counts, errors), errors, dropped,
                                 timing)))


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the node that started it dies, so no worker is orphaned."""
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
    affinity.batch_policy()  # handed a batch, it runs once the node's thread that sent it blocks, not before
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the node's to handle; it stops us cleanly
    conn = wire.Channel(socket.socket(fileno=int(argv[0])), max_frame=MAX_FRAME)
    progress = mmap.mmap(int(argv[1]), PROGRESS_SIZE)
    send = conn.send  # thread-safe: log records may come from the task's own threads

    kind, init = conn.recv()
    assert kind == "init", kind
    sys.path[:] = init["sys_path"] + [p for p in sys.path if p not in init["sys_path"]]
    multiprocess_logging.attach_worker(lambda record: send(("log", record)),
                                       node=init["node"], stage=init["stage"], level=init["log_level"])
    try:
        spec = cloudpickle.loads(init["spec"])
        runner = TaskRunner(spec, cloudpickle.loads(init["retry_on"]), progress, init["timed"])
    except BaseException as exc:  # the stage cannot start: report why, with the traceback
        send(("init_failed", f"{type(exc).__name__}: {_message(exc)}", traceback.format_exc()))
        return 3
    send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except wire.UnpicklingFailed as exc:  # e.g. an item's class is missing here: its batch fails, we go on
            send(("unreadable", str(exc), traceback.format_exc()))
            continue
        except (EOFError, OSError):
            return 0
        if message[0] == "batch":
            _, rids, items = message
            conn.send_packed(encode_result(runner.run_batch(items), rids, items, runner.name))
        elif message[0] == "stop":
            try:
                runner.close()
            except Exception:
                logging.getLogger("pipeline_cluster.worker").exception("close() of stage %r failed", runner.name)
            send(("stopped",))
            return 0
