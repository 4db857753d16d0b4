"""StageSupervisor: one stage on one node; owns a pool of WorkerActors and accounts for every item.

Items arrive as chunks `(rids, items, attempts)` (parallel lists: per-item work stays in C-level list operations).
The supervisor cuts batches sized to the measured time per item (and shrunk by a generator's fan-out and by a byte
budget), keeps two batches in flight per worker, holds the previous stage back when its own queue is full, charges
failures to exactly the item that failed, restarts dead workers with backoff within a restart budget, and records
each batch's effect on its root items' trees in the node's TreeLedger, which knows when a whole tree is done.
"""
from __future__ import annotations

import itertools
import math
import random
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import pykka

from pipeline_cluster import wire
from pipeline_cluster.affinity import WorkerPlacement
from pipeline_cluster.actors.base import Actor, tell
from pipeline_cluster.actors.ledger import TreeLedger
from pipeline_cluster.actors.worker import Death, WorkerActor, WorkerConfig, WorkerProcess
from pipeline_cluster.deadletters import DeadLetter
from pipeline_cluster.errors import StageFailed
from pipeline_cluster.model import Stage
from pipeline_cluster.stats import StageStats

DEPTH = 2  # batches in flight per worker: the next one waits in the worker's inbox, no idle round trip
MAX_BATCH = 4096
HIGH_WATER = 8192  # queued items at which the stage before this one stops sending new batches
LOW_WATER = HIGH_WATER // 2  # ... and at which it may go on
TARGET_BATCH_SECONDS = 0.05  # a batch's work, by the measured time per item
MIN_BATCH_SECONDS = 0.005  # splitting a queue over workers never cuts batches below this much work
MAX_BATCH_BYTES = 4 * 1024 * 1024  # a batch of big items stays this small, so sending and running overlap
SHORT_BATCH_SECONDS = 0.001  # a batch with this little work and ...
SHORT_BATCH_BYTES = 64 * 1024  # ... this few bytes may run beside the node's threads (see WorkerPlacement)


@dataclass
class Slot:
    """The supervisor's view of one worker: its actor, its process, and the batches given to it, in order."""

    ref: pykka.ActorRef
    proc: WorkerProcess
    ready: bool = False
    inflight: deque[tuple] = field(default_factory=deque)  # the process answers batches in this order
    given: int = 0  # batches given to it so far (the actor sends them in this order)


class StageSupervisor(Actor):
    """Feeds one stage's worker pool and applies its Supervision config."""

    def __init__(self, index: int, stage: Stage, workers: int, last: bool, node: pykka.ActorRef,
                 ledger: TreeLedger, placement: WorkerPlacement, log_sink: Any, log_level: int) -> None:
        super().__init__()
        self.index, self.stage, self.n_workers, self.last = index, stage, workers, last
        self.node, self.ledger, self.node_name, self.placement = node, ledger, ledger.name, placement
        self.generation = ledger.generation  # the node's setup this stage belongs to; its reports carry it
        self.sup = stage.supervision
        self.next_stage: pykka.ActorRef | None = None
        self.previous_stage: pykka.ActorRef | None = None
        self.downstream_full = False  # the next stage's queue is above its high water mark
        self.throttling = False  # we told the previous stage to hold back
        self.config = WorkerConfig(stage.name, stage.payload(), cloudpickle.dumps(self.sup.retry_on),
                                   self.sup.timeout, self.node_name, log_level, log_sink)
        self.queue: deque[tuple] = deque()
        self.queued = 0
        self.slots: dict[int, Slot] = {}
        self.wids = itertools.count(1)
        self.stats = StageStats(stage.name)
        self.restart_times: deque[float] = deque()
        self.crash_streak = 0
        self.startup_failures = 0
        self.ever_ready = False
        self.announced = False
        self.paused = False
        self.state = "running"  # running | failed | stopping
        self.ewma: float | None = None
        self.fanout = 1.0  # outputs per input (up at once, down slowly): batches shrink so their outputs stay bounded
        self.item_bytes: float | None = None  # pickled bytes per item (moving average)
        self.hinted_bytes: float | None = None  # the size last told to the node (first stage only)
        self.last_item: Any = None  # the item the latest worker death was blamed on, for StageFailed
        self.escalate = lambda text: tell(node, "stage_failed", StageFailed(stage.name, "internal error", None, text))

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def on_link(self, previous_stage: pykka.ActorRef | None, next_stage: pykka.ActorRef | None) -> None:
        self.previous_stage, self.next_stage = previous_stage, next_stage

    def on_downstream_full(self, full: bool) -> None:
        """Backpressure from the next stage: a generator's fan-out never piles up without limit."""
        self.downstream_full = full
        self._dispatch()

    def on_spawn_workers(self) -> None:
        for _ in range(self.n_workers):
            self._spawn()

    def _spawn(self) -> None:
        wid = next(self.wids)
        proc = WorkerProcess()
        ref = WorkerActor.start(self.actor_ref, wid, proc, self.config)
        self.slots[wid] = Slot(ref, proc)

    def on_respawn(self) -> None:
        if self.state == "running":
            self._spawn()

    def on_worker_ready(self, wid: int, pid: int) -> None:
        slot = self.slots.get(wid)
        if slot is None:
            return
        slot.ready = True
        self.ever_ready = True
        self.startup_failures = 0
        self.stats.workers = sum(s.ready for s in self.slots.values())
        if not self.announced and self.stats.workers == self.n_workers:
            self.announced = True
            tell(self.node, "stage_ready", self.index)
        self._dispatch()

    def on_pause(self, paused: bool) -> None:
        self.paused = paused
        self._dispatch()

    def on_shutdown(self, grace: float) -> None:
        """Stop every worker: close() runs in each; those that don't exit within `grace` are killed."""
        self.state = "stopping"
        futures = [slot.ref.ask(("stop_worker", grace), block=False) for slot in self.slots.values()]
        for future in futures:
            try:
                future.get(timeout=grace + 10)
            except (pykka.ActorDeadError, pykka.Timeout):
                pass
        self._stop_all()

    def on_kill(self) -> None:
        """Stop at once: SIGKILL every worker process."""
        self.state = "stopping"
        self._stop_all()

    def _stop_all(self) -> None:
        """Kill what still runs and stop every worker actor (each reaps its process and frees its resources)."""
        for slot in self.slots.values():
            slot.proc.kill()
            self.placement.gone(slot.proc.pid)
        stopping = [slot.ref.stop(block=False) for slot in self.slots.values()]
        for future in stopping:
            try:
                future.get(timeout=10)
            except pykka.Timeout:
                pass
        self.slots.clear()
        self.stats.workers = 0

    def _signal_backpressure(self) -> None:
        """Tell the previous stage to hold back above the high water mark, and to go on below the low one."""
        full = self.queued >= HIGH_WATER if not self.throttling else self.queued > LOW_WATER
        if full != self.throttling and self.previous_stage is not None:
            self.throttling = full
            tell(self.previous_stage, "downstream_full", full)

    def on_stats(self) -> StageStats:
        self.stats.queued = self.queued
        return StageStats(**{**self.stats.__dict__, "samples": list(self.stats.samples)})

    # -- items ---------------------------------------------------------------------------------------------------

    def on_push(self, chunk: tuple) -> None:
        self.stats.items_in += len(chunk[0])
        self.queue.append(chunk)
        self.queued += len(chunk[0])
        if self.queued > self.stats.peak_queued:
            self.stats.peak_queued = self.queued
        self._signal_backpressure()
        self._dispatch()

    def _dispatch(self) -> None:
        if self.paused or self.downstream_full or self.state != "running":
            return
        while self.queued:
            slot, n_ready = self._least_busy()
            if slot is None:
                return
            rids, items, attempts = self._take(self._batch_size(n_ready))
            try:
                message = wire.pack(("batch", rids, wire.out_of_band(items)))
            except Exception:
                self._reject_unpicklable(rids, items, attempts)
                continue
            self._measure_size(message.nbytes / len(items))
            idle = not slot.inflight
            slot.inflight.append((rids, items, attempts))
            slot.given += 1
            short = (not self.queued and message.nbytes <= SHORT_BATCH_BYTES
                     and (self.ewma or 0.0) * len(items) <= SHORT_BATCH_SECONDS)
            self.placement.took(slot.proc.pid, short)
            if not idle:  # its actor sends it once the batches before it are answered
                tell(slot.ref, "batch", slot.given, message)
                continue
            try:  # the process waits for work: hand it over now; its actor wakes only for the result
                slot.proc.conn.send_packed(message)
            except OSError:
                pass  # the process died; its actor sees that and reports it

    def _least_busy(self) -> tuple[Slot | None, int]:
        """The ready worker with the fewest batches, if it has room for one more; and how many workers are ready."""
        best: Slot | None = None
        n_ready = 0
        for slot in self.slots.values():
            if slot.ready:
                n_ready += 1
                if best is None or len(slot.inflight) < len(best.inflight):
                    best = slot
        return (best if best is not None and len(best.inflight) < DEPTH else None), n_ready

    def _measure_size(self, bytes_per_item: float) -> None:
        """Track pickled bytes per item (batches are cut to a byte budget); the first stage also tells the node
        when that size is first known or has changed twofold (the root sizes the node's credit by it)."""
        known = self.item_bytes
        self.item_bytes = bytes_per_item if known is None else 0.7 * known + 0.3 * bytes_per_item
        hinted = self.hinted_bytes
        if self.index == 0 and (hinted is None or not hinted / 2 < bytes_per_item < hinted * 2):
            self.hinted_bytes = bytes_per_item
            tell(self.node, "size_hint", bytes_per_item)

    def _batch_size(self, n_ready: int) -> int:
        size = 1 if self.ewma is None else int(TARGET_BATCH_SECONDS / max(self.ewma, 1e-7))
        fair = math.ceil(self.queued / max(1, n_ready * DEPTH))
        if self.ewma is not None:  # splitting work that is quick anyway only adds messages
            fair = max(fair, int(MIN_BATCH_SECONDS / max(self.ewma, 1e-7)))
        by_bytes = MAX_BATCH_BYTES / self.item_bytes if self.item_bytes else MAX_BATCH
        return max(1, min(size, int(MAX_BATCH / max(self.fanout, 1.0)), int(by_bytes), fair))

    def _take(self, size: int) -> tuple:
        """Cut up to `size` items from the front of the queue."""
        if len(self.queue) == 1 and len(self.queue[0][0]) <= size:  # all of it (one item at a time, say): as is
            chunk = self.queue.popleft()
            self.queued = 0
            self._signal_backpressure()
            return chunk
        rids: list = []
        items: list = []
        attempts: list | None = None
        while self.queue and len(rids) < size:
            c_rids, c_items, c_att = self.queue[0]
            room = size - len(rids)
            if len(c_rids) > room:
                self.queue[0] = (c_rids[room:], c_items[room:], c_att[room:] if c_att else None)
                c_rids, c_items, c_att = c_rids[:room], c_items[:room], (c_att[:room] if c_att else None)
            else:
                self.queue.popleft()
            if c_att or attempts is not None:
                attempts = (attempts if attempts is not None else [0] * len(rids)) + (c_att or [0] * len(c_rids))
            rids.extend(c_rids)
            items.extend(c_items)
        self.queued -= len(rids)
        self._signal_backpressure()
        return rids, items, attempts

    def _reject_unpicklable(self, rids: list, items: list, attempts: list | None) -> None:
        """A batch that cannot be pickled: the items that cannot are dead letters, the others go back in line."""
        good: list[int] = []
        dead: list[DeadLetter] = []
        for i, item in enumerate(items):
            try:
                cloudpickle.dumps(item)
                good.append(i)
            except Exception as exc:
                self.stats.failed += 1
                dead.append(DeadLetter(repr(item), self.stage.name, self.index, (attempts[i] if attempts else 0) + 1,
                                       "exception", "PicklingError",
                                       f"stage {self.stage.name!r}: item {item!r:.200} cannot be pickled: {exc}",
                                       traceback.format_exc(), self.node_name, rid=rids[i], refeedable=False))
        self._report([], [d.rid for d in dead], None, dead)
        if good:
            self._requeue(([rids[i] for i in good], [items[i] for i in good],
                           [attempts[i] for i in good] if attempts else None))

    def _requeue(self, chunk: tuple) -> None:
        self.queue.appendleft(chunk)
        self.queued += len(chunk[0])

    def on_batch_done(self, wid: int, result: tuple) -> None:
        slot = self.slots.get(wid)
        if slot is None or not slot.inflight or self.state == "stopping":
            return
        rids, items, attempts = slot.inflight.popleft()
        self.placement.done(slot.proc.pid)
        outs, tree, errors, dropped, (seconds, timed, samples) = result
        self.crash_streak = 0
        self.stats.items_out += len(outs)
        self.stats.dropped += dropped
        self.stats.add_timing(seconds, timed, samples)
        if timed:
            mean = seconds / timed
            self.ewma = mean if self.ewma is None else 0.7 * self.ewma + 0.3 * mean
            fanout = len(outs) / timed  # a rise counts at once (it bounds memory), a fall slowly
            self.fanout = max(fanout, 0.7 * self.fanout + 0.3 * fanout)
        # the worker worked out the trees' net change: each output's root item, births beyond an input's first
        # output, deaths of inputs that gave nothing (None: one output per input, nothing changed)
        out_rids, born, died = (rids, [], []) if tree is None else tree
        failed = {index: (etype, message, tb, retryable) for index, etype, message, tb, retryable in errors}
        dead: list[DeadLetter] = []
        if self.last:  # every item leaves the pipeline here
            born = []
            died = [r for i, r in enumerate(rids) if i not in failed] if failed else rids
        for index, (etype, message, tb, retryable) in failed.items():
            self._charge(rids[index], items[index], attempts[index] if attempts else 0, died, dead,
                         "exception", retryable, error_type=etype, message=message, traceback=tb, pid=slot.proc.pid)
        self._report(born, died, (out_rids, outs) if self.last and outs else None, dead)
        if outs and not self.last:
            tell(self.next_stage, "push", (out_rids, outs, None))
        self._dispatch()

    def on_batch_unreadable(self, wid: int, error: str, tb: str) -> None:
        """The worker could not unpickle the batch, or we its reply: its items fail for good with that cause."""
        slot = self.slots.get(wid)
        if slot is None or not slot.inflight or self.state == "stopping":
            return
        rids, items, attempts = slot.inflight.popleft()
        self.placement.done(slot.proc.pid)
        died: list = []
        dead: list[DeadLetter] = []
        for i, (rid, item) in enumerate(zip(rids, items)):
            self._charge(rid, item, attempts[i] if attempts else 0, died, dead, "exception", False,
                         error_type="UnpicklingError", message=f"stage {self.stage.name!r}: {error}", traceback=tb,
                         pid=slot.proc.pid)
        self._report([], died, None, dead)
        self._dispatch()

    def _charge(self, rid: int, item: Any, attempts: int, died: list, dead: list[DeadLetter], cause: str,
                retryable: bool, **detail: Any) -> None:
        """Count one failed attempt: re-queue the item if it has tries left, else end it as a failure
        (appended to `died`, and to `dead` unless the stage drops failures)."""
        attempts += 1
        if retryable and attempts < self.sup.max_attempts:
            self.stats.retried += 1
            self._requeue(([rid], [item], [attempts]))
            return
        self.stats.failed += 1
        died.append(rid)
        letter = DeadLetter(item, self.stage.name, self.index, attempts, cause, node=self.node_name, rid=rid,
                            **detail)
        if self.sup.on_failure == "drop":
            tell(self.node, "log_failure", letter)
        else:
            dead.append(letter)

    def _report(self, born: list, died: list, outputs: tuple | None, dead: list[DeadLetter]) -> None:
        """Record in the node's ledger which root items gained live items (`born`, one rid per new item) and
        lost some (`died`). Recorded before the outputs move on to the next stage, so a count never meets early.
        """
        if born or died or outputs or dead:
            self.ledger.record(self.generation, born, died, outputs, dead)

    # -- failures of workers -----------------------------------------------------------------------------------------

    def on_worker_died(self, wid: int, death: Death) -> None:
        slot = self.slots.pop(wid, None)
        if slot is None:
            return
        slot.ref.stop(block=False)  # its actor reaps the process and frees the socket and progress record
        self.placement.gone(slot.proc.pid)
        if self.state != "running":
            return
        self.stats.workers = sum(s.ready for s in self.slots.values())
        batches = list(slot.inflight)
        finished: list = []
        dead: list[DeadLetter] = []
        for position, (rids, items, attempts) in enumerate(batches):
            blamed = death.index if position == 0 and death.cause != "init_failed" else -1
            if 0 <= blamed < len(rids):
                self.last_item = items[blamed]
                self._charge(rids[blamed], items[blamed], attempts[blamed] if attempts else 0, finished, dead,
                             death.cause, True, message=death.message, traceback=death.traceback,
                             pid=death.pid, exit_code=death.exit_code, signal=death.signal)
                keep = [i for i in range(len(rids)) if i != blamed]
                rids, items = [rids[i] for i in keep], [items[i] for i in keep]
                attempts = [attempts[i] for i in keep] if attempts else None
            if rids:
                self._requeue((rids, items, attempts))
        self._report([], finished, None, dead)
        self._restart_after(death)
        self._dispatch()

    def _restart_after(self, death: Death) -> None:
        """Restart a dead worker with backoff, unless the restart budget or the startup rule says stop."""
        killed_from_outside = death.signal in ("SIGKILL", "SIGTERM")  # says nothing about the stage's code
        if death.cause == "init_failed" and not self.ever_ready and not killed_from_outside:
            self.startup_failures += 1
            if self.startup_failures >= min(3, self.sup.max_restarts + 1):
                self._fail(f"its workers cannot start: {death.message}", death.traceback)
                return
        now = time.monotonic()
        self.restart_times.append(now)
        while self.restart_times and self.restart_times[0] < now - self.sup.restart_window:
            self.restart_times.popleft()
        if len(self.restart_times) > self.sup.max_restarts:
            if self.sup.on_exhausted == "degrade" and self.slots:
                tell(self.node, "log", f"stage {self.stage.name!r}: restart budget exhausted, "
                                       f"going on with {len(self.slots)} worker(s)")
                return
            self._fail(f"more than {self.sup.max_restarts} worker restarts in {self.sup.restart_window} s; "
                       f"last: {death.cause} ({death.message})", death.traceback)
            return
        self.stats.restarts += 1
        low, high = self.sup.backoff
        delay = min(high, low * (2 ** self.crash_streak)) * random.uniform(0.5, 1.0)
        self.crash_streak += 1
        timer = threading.Timer(delay, tell, (self.actor_ref, "respawn"))
        timer.daemon = True
        timer.start()

    def _fail(self, cause: str, detail: str) -> None:
        self.state = "failed"
        for slot in self.slots.values():
            slot.proc.kill()
        tell(self.node, "stage_failed", StageFailed(self.stage.name, cause, self.last_item, detail))
