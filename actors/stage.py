"""StageSupervisor: one stage on one node; owns a pool of WorkerActors and accounts for every item.

Items arrive as chunks `(rids, items, attempts)` (parallel lists: per-item work stays in C-level list operations).
The supervisor cuts batches sized to the measured time per item (and shrunk by a generator's fan-out and by a byte
budget), keeps two batches in flight per worker, holds the previous stage back when its own queue is full, charges
failures to exactly the item that failed, restarts dead workers with backoff within a restart budget, and records
each batch's effect on its root items' trees in the node's TreeLedger, which knows when a whole tree is done.
"""
from __future__ import annotations

import itertools
import random
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

import cloudpickle
import pykka

from pipeline_cluster.actors import policies
from pipeline_cluster.actors.base import Actor, handles, tell
from pipeline_cluster.actors.ledger import TreeLedger
from pipeline_cluster.actors.worker import WorkerActor, WorkerConfig
from pipeline_cluster.alerts import Alerts
from pipeline_cluster.errors import StageFailed
from pipeline_cluster.logs.records import Record
from pipeline_cluster.messages import (BatchDone, BatchResult, BatchUnreadable, Chunk, DeadLetter, Death,
                                       DownstreamFull, DroppedFailure, Flush, HoldStreams, Kill, Link, NodeLog,
                                       Outputs, PartAck, PartDone, Path, Pause, Push, Resize, Respawn, RunBatch,
                                       SendBatch, Shutdown, SizeHint, SpawnWorkers, StageFailure, StageReady, Stats,
                                       StopWorker, WorkerDied, WorkerReady)
from pipeline_cluster.model import Stage
from pipeline_cluster.placement import Placement
from pipeline_cluster.stats import StageStats
from pipeline_cluster.transport import wire
from pipeline_cluster.worker.process import WorkerProcess
from pipeline_cluster.worker.zygote import Launcher

SHORT_BATCH_SECONDS = 0.001  # a batch with this little work and ...
SHORT_BATCH_BYTES = 64 * 1024  # ... this few bytes may run beside the node's threads (placement opted in)


@dataclass
class Slot:
    """The supervisor's view of one worker: its actor, its process, and the batches given to it, in order."""

    ref: pykka.ActorRef
    proc: WorkerProcess
    ready: bool = False
    inflight: deque[Chunk] = field(default_factory=deque)  # the process answers batches in this order
    given: int = 0  # batches given to it so far (the actor sends them in this order)
    alone: bool = False  # it runs one suspect item and nothing else, so a crash now is that item's
    retiring: bool = False  # the stage was resized down: it gets no more batches and stops once idle
    # generator items of its running batch that stream their outputs: position -> outputs sent on so far
    streamed: dict[int, int] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)  # positions whose last part came: every output of theirs went on
    broken: dict[int, str] = field(default_factory=dict)  # position -> why a part of its outputs was unreadable here
    acks_owed: int = 0  # parts passed on while the next stage was full: acknowledged once it has room


class StageSupervisor(Actor):
    """Feeds one stage's worker pool and applies its Supervision config."""

    def __init__(self, index: int, stage: Stage, workers: int, last: bool, node: pykka.ActorRef,
                 ledger: TreeLedger, placement: Placement, launcher: Launcher, log_sink: Callable[[Record], None],
                 log_level: int, keyed: bool = False) -> None:
        """`launcher`: the node's, which starts worker processes. `keyed`: the run wants ordered or keyed output, so
        each item's path in its tree travels with it."""
        super().__init__()
        self.keyed = keyed
        self.index, self.stage, self.n_workers, self.last = index, stage, workers, last
        self.node, self.ledger, self.node_name, self.placement = node, ledger, ledger.name, placement
        self.launcher = launcher
        self.generation = ledger.generation  # the node's setup this stage belongs to; its reports carry it
        self.sup = stage.supervision
        self.next_stage: pykka.ActorRef | None = None
        self.previous_stage: pykka.ActorRef | None = None
        self.downstream_full = False  # the next stage's queue is above its high water mark
        self.streams_held = False  # a last stage: the caller is behind on streamed outputs
        self.throttling = False  # we told the previous stage to hold back
        timeout = self.sup.timeout
        # an async item past the timeout is cancelled in the worker; the watchdog only catches a loop that hangs
        watchdog = timeout * 2 + 1 if timeout is not None and stage.is_async else timeout
        self.config = WorkerConfig(stage.name, stage.payload(), cloudpickle.dumps(self.sup.retry_on), watchdog,
                                   self.node_name, log_level, log_sink, placement, item_timeout=timeout)
        self.queue: deque[Chunk] = deque()
        self.queued = 0
        # items in flight on a concurrent worker that crashed: any of them may have caused it, so each runs alone
        # before any is charged
        self.suspects: deque[Chunk] = deque()
        # a crash (or, for a batch stage, a timeout) of such a worker cannot be pinned on one item
        self.concurrent = stage.concurrency > 1 or stage.is_async or stage.batch_size is not None
        self.partial_since = 0.0  # a batch stage: when the oldest queued item arrived
        self.flush_pending = False
        self.slots: dict[int, Slot] = {}
        self.wids = itertools.count(1)
        self.stats = StageStats(stage.name)
        self.since: float | None = None  # when its first worker was up: the stage's clocks run from then
        self.marked = 0.0  # when they last counted
        self.restart_times: deque[float] = deque()
        self.crash_streak = 0
        self.startup_failures = 0
        self.ever_ready = False
        self.announced = False
        self.paused = False
        self.state = "running"  # running | failed | stopping
        self.seconds_per_item: float | None = None  # moving average
        self.fanout = 1.0  # what a reply carries per input, outputs and errors (up at once, down slowly): batches
        # shrink so that what comes back from one stays bounded
        self.item_bytes: float | None = None  # pickled bytes per item (moving average)
        self.hinted_bytes: float | None = None  # the size last told to the node (first stage only)
        self.last_item: Any = None  # the item the latest worker death was blamed on, for StageFailed
        self.crash_alerts = Alerts(lambda text: tell(node, NodeLog(text)), "worker(s) crashed and were restarted")
        self.escalate = lambda text: tell(node, StageFailure(StageFailed(stage.name, "internal error", None, text)))

    # -- lifecycle ---------------------------------------------------------------------------------------------

    @handles(Link)
    def on_link(self, message: Link) -> None:
        self.previous_stage, self.next_stage = message.previous, message.next

    @handles(DownstreamFull)
    def on_downstream_full(self, message: DownstreamFull) -> None:
        """Backpressure from the next stage: a generator's fan-out never piles up without limit."""
        self._account()
        self.downstream_full = message.full
        self._pay_acks()
        self._dispatch()

    @handles(HoldStreams)
    def on_hold_streams(self, message: HoldStreams) -> None:
        """A last stage: while the caller is behind on streamed outputs, start no batch and hold streaming
        generators back; the stages before it then fill up and hold back in turn."""
        self._account()
        self.streams_held = message.held
        self._pay_acks()
        self._dispatch()

    def _pay_acks(self) -> None:
        """Acknowledge the parts held back, once nothing holds them any more."""
        if self.downstream_full or self.streams_held:
            return
        for slot in self.slots.values():
            while slot.acks_owed:
                slot.acks_owed -= 1
                self._ack(slot)

    @handles(SpawnWorkers)
    def on_spawn_workers(self, message: SpawnWorkers) -> None:
        for _ in range(self.n_workers):
            self._spawn()

    def _spawn(self) -> None:
        wid = next(self.wids)
        proc = WorkerProcess(self.placement, self.launcher)
        ref = WorkerActor.start(self.actor_ref, wid, proc, self.config)
        self.slots[wid] = Slot(ref, proc)

    @handles(Respawn)
    def on_respawn(self, message: Respawn) -> None:
        if self.state == "running" and self._active() < self.n_workers:
            self._spawn()

    def _active(self) -> int:
        return sum(not slot.retiring for slot in self.slots.values())

    @handles(Resize)
    def on_resize(self, message: Resize) -> None:
        """Run on `workers` workers from now on: new ones start at once; surplus ones take no more batches and stop
        (their close() runs) once their batches are answered, so no item is lost or run twice."""
        self.n_workers = message.workers
        if self.state != "running":
            return
        for _ in range(self.n_workers - self._active()):
            self._spawn()
        surplus = self._active() - self.n_workers
        # idle ones first, then the least busy
        for slot in sorted(self.slots.values(), key=lambda slot: (slot.ready, len(slot.inflight))):
            if surplus <= 0:
                break
            if not slot.retiring:
                slot.retiring = True
                surplus -= 1
        self._retire_idle()
        self._dispatch()

    def _retire_idle(self) -> None:
        """Stop the retiring workers that have no batch left."""
        for wid, slot in list(self.slots.items()):
            if slot.retiring and not slot.inflight and (slot.ready or slot.proc.poll() is not None):
                del self.slots[wid]
                self._account()
                self.stats.workers = sum(s.ready for s in self.slots.values())
                self.placement.gone(slot.proc.pid)
                slot.ref.tell(StopWorker(5.0))
                slot.ref.stop(block=False)

    @handles(WorkerReady)
    def on_worker_ready(self, message: WorkerReady) -> None:
        slot = self.slots.get(message.wid)
        if slot is None:
            return
        self._account()
        if self.since is None:
            self.since = self.marked = time.monotonic()
        slot.ready = True
        self.ever_ready = True
        self.startup_failures = 0
        self.stats.workers = sum(s.ready for s in self.slots.values())
        if not self.announced and self.stats.workers >= self.n_workers:
            self.announced = True
            tell(self.node, StageReady(self.index))
        if slot.retiring:
            self._retire_idle()
        self._dispatch()

    @handles(Pause)
    def on_pause(self, message: Pause) -> None:
        self.paused = message.paused
        self._dispatch()

    @handles(Shutdown)
    def on_shutdown(self, message: Shutdown) -> None:
        """Stop every worker: close() runs in each; those that don't exit within `grace` are killed."""
        self.state = "stopping"
        futures = [slot.ref.ask(StopWorker(message.grace), block=False) for slot in self.slots.values()]
        for future in futures:
            try:
                future.get(timeout=message.grace + 10)
            except (pykka.ActorDeadError, pykka.Timeout):
                pass
        self._stop_all()

    @handles(Kill)
    def on_kill(self, message: Kill) -> None:
        """Stop at once: SIGKILL every worker process."""
        self.state = "stopping"
        self._stop_all()

    def _stop_all(self) -> None:
        """Kill what still runs and stop every worker actor (each reaps its process and frees its resources)."""
        self.crash_alerts.flush()
        self._account()
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
        """Tell the previous stage to hold back, or to go on, when that changes."""
        full = policies.hold_back(self.queued, self.throttling)
        if full != self.throttling and self.previous_stage is not None:
            self.throttling = full
            tell(self.previous_stage, DownstreamFull(full))

    @handles(Stats)
    def on_stats(self, message: Stats) -> StageStats:
        self._account()
        self.stats.queued = self.queued + len(self.suspects)
        return self.stats.copy()

    def _account(self) -> None:
        """Add the time since the last mark to the stage's clocks: workers up, held back, starved (queue empty).
        Called before anything they depend on changes, so each stretch is counted under what held during it."""
        if self.since is None:
            return
        now = time.monotonic()
        spent = now - self.marked
        self.marked = now
        stats = self.stats
        stats.elapsed_seconds = now - self.since
        stats.node_seconds = stats.elapsed_seconds
        stats.worker_seconds += stats.workers * spent
        if self.downstream_full or self.streams_held:
            stats.held_seconds += spent
        if not self.queued:
            stats.starved_seconds += spent

    # -- items ---------------------------------------------------------------------------------------------------

    @handles(Push)
    def on_push(self, message: Push) -> None:
        chunk = message.chunk
        self.stats.items_in += len(chunk.rids)
        if not self.queued:
            self._account()  # a starved stretch ends
            self.partial_since = time.monotonic()
        self.queue.append(chunk)
        self.queued += len(chunk.rids)
        if self.queued > self.stats.peak_queued:
            self.stats.peak_queued = self.queued
        self._signal_backpressure()
        self._dispatch()

    def _dispatch(self) -> None:
        if self.paused or self.downstream_full or self.streams_held or self.state != "running":
            return
        while self.suspects:  # each alone on an idle worker, so that a crash blames the item that caused it
            idle = next((slot for slot in self.slots.values()
                     if slot.ready and not slot.inflight and not slot.retiring), None)
            if idle is None:
                break
            idle.alone = True
            self._send(idle, self.suspects.popleft())
        while self.queued:
            if self._hold_partial_list():
                return
            slot, n_ready = self._least_busy()
            if slot is None:
                return
            size = self.stage.batch_size or policies.batch_size(self.seconds_per_item, self.queued, n_ready,
                                                                self.fanout, self.item_bytes, self.stage.concurrency)
            self._send(slot, self._take(size))

    def _hold_partial_list(self) -> bool:
        """A batch stage waits up to `max_wait` for a full list before it sends a partial one."""
        batch_size = self.stage.batch_size
        if batch_size is None or self.queued >= batch_size:
            return False
        wait = self.partial_since + self.stage.max_wait - time.monotonic()
        if wait <= 0:
            return False
        if not self.flush_pending:
            self.flush_pending = True
            timer = threading.Timer(wait, tell, (self.actor_ref, Flush()))
            timer.daemon = True
            timer.start()
        return True

    @handles(Flush)
    def on_flush(self, message: Flush) -> None:
        self.flush_pending = False
        self._dispatch()

    def _send(self, slot: Slot, chunk: Chunk) -> None:
        """Give a worker a batch: to its process at once when it is idle, else to its actor to send in turn."""
        try:
            packed = wire.pack(RunBatch(chunk.rids, wire.out_of_band(chunk.items)))
        except Exception:
            slot.alone = False
            self._reject_unpicklable(chunk)
            return
        self._measure_size(packed.nbytes / len(chunk.items))
        idle = not slot.inflight
        slot.inflight.append(chunk)
        slot.given += 1
        if self.placement.enabled:
            short = (not self.queued and packed.nbytes <= SHORT_BATCH_BYTES
                     and (self.seconds_per_item or 0.0) * len(chunk.items) <= SHORT_BATCH_SECONDS)
            self.placement.took(slot.proc.pid, short)
        if not idle:  # its actor sends it once the batches before it are answered
            tell(slot.ref, SendBatch(slot.given, packed))
            return
        try:  # the process waits for work: hand it over now; its actor wakes only for the result
            slot.proc.conn.send_packed(packed)
        except OSError:
            pass  # the process died; its actor sees that and reports it

    def _least_busy(self) -> tuple[Slot | None, int]:
        """The ready worker with the fewest batches, if it has room for one more; and how many workers are ready."""
        best: Slot | None = None
        n_ready = 0
        for slot in self.slots.values():
            if slot.ready and not slot.alone and not slot.retiring:
                n_ready += 1
                if best is None or len(slot.inflight) < len(best.inflight):
                    best = slot
        return (best if best is not None and len(best.inflight) < policies.DEPTH else None), n_ready

    def _measure_size(self, bytes_per_item: float) -> None:
        """Track pickled bytes per item (batches are cut to a byte budget); the first stage also tells the node
        when that size is first known or has changed twofold (the root sizes the node's credit by it)."""
        self.item_bytes = policies.moving_average(self.item_bytes, bytes_per_item)
        hinted = self.hinted_bytes
        if self.index == 0 and (hinted is None or not hinted / 2 < bytes_per_item < hinted * 2):
            self.hinted_bytes = bytes_per_item
            tell(self.node, SizeHint(self.node_name, bytes_per_item))

    def _take(self, size: int) -> Chunk:
        """Cut up to `size` items from the front of the queue."""
        if len(self.queue) == 1 and len(self.queue[0].rids) <= size:  # all of it (one item at a time, say): as is
            chunk = self.queue.popleft()
        else:
            parts: list[Chunk] = []
            taken = 0
            while self.queue and taken < size:
                part = self.queue.popleft()
                if len(part.rids) > size - taken:
                    part, rest = part.split(size - taken)
                    self.queue.appendleft(rest)
                parts.append(part)
                taken += len(part.rids)
            chunk = parts[0] if len(parts) == 1 else Chunk.join(parts)
        if len(chunk.rids) == self.queued:
            self._account()  # a starved stretch begins
        self.queued -= len(chunk.rids)
        self._signal_backpressure()
        return chunk

    def _reject_unpicklable(self, chunk: Chunk) -> None:
        """A batch that cannot be pickled: the items that cannot are dead letters, the others go back in line."""
        good: list[int] = []
        dead: list[DeadLetter] = []
        for i, item in enumerate(chunk.items):
            try:
                cloudpickle.dumps(item)
                good.append(i)
            except Exception as exc:
                self.stats.failed += 1
                dead.append(DeadLetter(repr(item), self.stage.name, self.index, _attempts(chunk, i) + 1,
                                       "exception", "PicklingError",
                                       f"stage {self.stage.name!r}: item {item!r:.200} cannot be pickled: {exc}",
                                       traceback.format_exc(), self.node_name, rid=chunk.rids[i], refeedable=False))
        self._report([], [chunk.rids[i] for i in range(len(chunk.rids)) if i not in good], None, dead)
        if good:
            self._requeue(chunk.select(good))

    def _requeue(self, chunk: Chunk) -> None:
        if not self.queued:
            self.partial_since = time.monotonic() - self.stage.max_wait  # a retry need not wait for company
        self.queue.appendleft(chunk)
        self.queued += len(chunk.rids)

    @handles(BatchDone)
    def on_batch_done(self, message: BatchDone) -> None:
        slot = self.slots.get(message.wid)
        if slot is None or not slot.inflight or self.state == "stopping":
            return
        chunk = slot.inflight.popleft()
        slot.alone = False
        _, broken = self._end_streams(slot)
        self.placement.done(slot.proc.pid)
        if slot.retiring:
            self._retire_idle()
        result = message.result
        outs, timing = result.outputs, result.timing
        self.crash_streak = 0
        self.stats.items_out += len(outs)
        self.stats.dropped += result.dropped
        self.stats.add_timing(timing.seconds, timing.items, timing.samples)
        if timing.items:
            self.seconds_per_item = policies.moving_average(self.seconds_per_item, timing.seconds / timing.items)
            fanout = policies.reply_weight(len(outs), len(result.errors), timing.items)
            self.fanout = max(fanout, policies.moving_average(self.fanout, fanout))  # up at once, down slowly
        born: list[int]
        died: list[int]
        if result.tree is None:  # one output per input: nothing changed in the trees
            out_rids, born, died = chunk.rids, [], []
        else:
            out_rids, born, died, _ = result.tree
        out_paths = self._output_paths(chunk, result) if self.keyed else None
        failed = {error.position for error in result.errors}
        dead: list[DeadLetter] = []
        if self.last:  # every item leaves the pipeline here
            born = []
            died = [rid for i, rid in enumerate(chunk.rids) if i not in failed] if failed else chunk.rids
        for error in result.errors:
            why = broken.pop(error.position, None)
            self._charge(chunk, error.position, died, dead, "exception", error.retryable, error_type=error.error_type,
                         message=error.message + (f"; {self._unreadable_part(why)}" if why else ""),
                         traceback=error.traceback, pid=slot.proc.pid)
        for position, why in broken.items():  # it ended (and died in the tree) but some of its outputs were lost
            self._lost_outputs(chunk, position, dead, why, slot.proc.pid)
        self._report(born, died, Outputs(out_rids, outs, out_paths) if self.last and outs else None, dead)
        if outs and not self.last and self.next_stage is not None:
            tell(self.next_stage, Push(Chunk(out_rids, outs, None, out_paths)))
        self._dispatch()

    @handles(PartDone)
    def on_part_done(self, message: PartDone) -> None:
        """Outputs a generator item of a worker's running batch sent on while it still yields: each is a new live
        item of its root item's tree, passed on at once; the worker may send more once the next stage has room."""
        slot = self.slots.get(message.wid)
        if slot is None or not slot.inflight or self.state == "stopping":
            return
        chunk = slot.inflight[0]
        part = message.part
        position = part.position
        if part.last:
            slot.ended.add(position)
        try:
            outs = [] if position in slot.broken else part.load()
        except Exception as exc:  # the item fails for good once its batch is answered; the rest goes on
            slot.broken[position] = f"{type(exc).__name__}: {exc}"
            outs = []
        rid = chunk.rids[position]
        offset = slot.streamed.get(position, 0)
        slot.streamed[position] = offset + len(outs)
        self.stats.items_out += len(outs)
        paths = None
        if self.keyed:
            path = chunk.paths[position] if chunk.paths else ()
            paths = [path + (offset + j,) for j in range(len(outs))]
        out_rids = [rid] * len(outs)
        if outs:
            self.ledger.record_part(self.generation, rid, 0 if self.last else len(outs),
                                    Outputs(out_rids, outs, paths) if self.last else None)
        if outs and not self.last and self.next_stage is not None:
            tell(self.next_stage, Push(Chunk(out_rids, outs, None, paths)))
        if self.downstream_full or self.streams_held:
            slot.acks_owed += 1
        else:
            self._ack(slot)

    @staticmethod
    def _ack(slot: Slot) -> None:
        try:
            slot.proc.conn.send(PartAck())
        except OSError:
            pass  # the process died: its actor reports it

    def _output_paths(self, chunk: Chunk, result: BatchResult) -> list[Path]:
        """Each output's path in its root item's tree: a generator's j-th output of an item adds j to the item's
        path; a one-to-one stage passes paths on (ordered runs only)."""
        paths = chunk.paths or [()] * len(chunk.rids)
        counts = result.tree.counts if result.tree is not None else None
        if not self.stage.generator:
            return paths if counts is None else [path for path, n in zip(paths, counts) if n]
        if counts is None:
            return [path + (0,) for path in paths]
        return [path + (j,) for path, n in zip(paths, counts) for j in range(n)]

    @handles(BatchUnreadable)
    def on_batch_unreadable(self, message: BatchUnreadable) -> None:
        """The worker could not unpickle the batch, or we its reply: its items fail for good with that cause."""
        slot = self.slots.get(message.wid)
        if slot is None or not slot.inflight or self.state == "stopping":
            return
        chunk = slot.inflight.popleft()
        ended, broken = self._end_streams(slot)
        self.placement.done(slot.proc.pid)
        died: list[int] = []
        dead: list[DeadLetter] = []
        for i in range(len(chunk.rids)):
            if i in ended:  # its outputs went on in parts: it is done
                died.append(chunk.rids[i])
                if i in broken:
                    self._lost_outputs(chunk, i, dead, broken[i], slot.proc.pid)
                continue
            self._charge(chunk, i, died, dead, "exception", False, error_type="UnpicklingError",
                         message=f"stage {self.stage.name!r}: {message.error}", traceback=message.traceback,
                         pid=slot.proc.pid)
        self._report([], died, None, dead)
        self._dispatch()

    def _charge(self, chunk: Chunk, i: int, died: list[int], dead: list[DeadLetter], cause: str, retryable: bool,
                **detail: Any) -> None:
        """Count one failed attempt of item `i` of `chunk`: re-queue it if it has tries left, else end it as a
        failure (appended to `died`, and to `dead` unless the stage drops failures)."""
        rid, item = chunk.rids[i], chunk.items[i]
        attempts = _attempts(chunk, i) + 1
        if retryable and attempts < self.sup.max_attempts:
            self.stats.retried += 1
            self._requeue(Chunk([rid], [item], [attempts], chunk.paths and [chunk.paths[i]]))
            return
        died.append(rid)
        self._give_up(chunk, i, dead, cause, **detail)

    def _give_up(self, chunk: Chunk, i: int, dead: list[DeadLetter], cause: str, **detail: Any) -> None:
        """Item `i` of `chunk` failed for good: its dead letter goes to `dead` (or is dropped, if the stage drops
        failures). Its death in the tree is the caller's to record."""
        self.stats.failed += 1
        letter = DeadLetter(chunk.items[i], self.stage.name, self.index, _attempts(chunk, i) + 1, cause,
                            node=self.node_name, rid=chunk.rids[i], **detail)
        if self.sup.on_failure == "drop":
            tell(self.node, DroppedFailure(letter))
        else:
            dead.append(letter)

    @staticmethod
    def _end_streams(slot: Slot) -> tuple[set[int], dict[int, str]]:
        """Forget what the slot's oldest batch streamed; returns its items that ended and those with unreadable
        parts."""
        ended, broken = slot.ended, slot.broken
        slot.streamed, slot.ended, slot.broken = {}, set(), {}
        return ended, broken

    def _lost_outputs(self, chunk: Chunk, i: int, dead: list[DeadLetter], why: str, pid: int | None) -> None:
        """Item `i` ended, but some of the outputs it streamed could not be read here: a dead letter, no death (its
        end already counted)."""
        self._give_up(chunk, i, dead, "exception", error_type="UnpicklingError", message=self._unreadable_part(why),
                      pid=pid)

    def _unreadable_part(self, why: str) -> str:
        return (f"stage {self.stage.name!r}: outputs this item streamed cannot be unpickled here ({why}); those "
                "before them went on, and it is not retried")

    def _report(self, born: list[int], died: list[int], outputs: Outputs | None, dead: list[DeadLetter]) -> None:
        """Record in the node's ledger which root items gained live items (`born`, one rid per new item) and
        lost some (`died`). Recorded before the outputs move on to the next stage, so a count never meets early.
        """
        if born or died or outputs or dead:
            self.ledger.record(self.generation, born, died, outputs, dead)

    # -- failures of workers -----------------------------------------------------------------------------------------

    @handles(WorkerDied)
    def on_worker_died(self, message: WorkerDied) -> None:
        slot = self.slots.pop(message.wid, None)
        if slot is None:
            return
        death = message.death
        slot.ref.stop(block=False)  # its actor reaps the process and frees the socket and progress record
        self.placement.gone(slot.proc.pid)
        if self.state != "running":
            return
        self._account()
        self.stats.workers = sum(s.ready for s in self.slots.values())
        finished: list[int] = []
        dead: list[DeadLetter] = []
        # with concurrency, the running item shown is the one that has run longest: right for a timeout, not for a
        # crash, unless the worker ran a single suspect item
        unknown = (self.concurrent and not slot.alone
                   and (death.cause == "crash" or (death.cause == "timeout" and self.stage.batch_size is not None)))
        for position, chunk in enumerate(slot.inflight):
            if unknown:
                self.suspects.extend(chunk.select([i]) for i in range(len(chunk.rids)))
                continue
            blamed = death.index if position == 0 and death.cause != "init_failed" else -1
            streamed = slot.streamed if position == 0 else {}
            ended, broken = self._end_streams(slot) if position == 0 else (set(), {})
            finished.extend(chunk.rids[i] for i in ended)  # streamed items that had ended: all their outputs went
            for i in ended & broken.keys():
                self._lost_outputs(chunk, i, dead, broken[i], death.pid)
            # only the item it was running is charged (not one that ended, waiting to send its last part); the rest
            # go back uncharged
            if 0 <= blamed < len(chunk.rids) and blamed not in ended:
                self.last_item = chunk.items[blamed]
                sent = streamed.get(blamed, 0)
                note = f" (after {sent} of its outputs were sent on; not retried)" if sent else ""
                if blamed in broken:
                    note += f"; {self._unreadable_part(broken[blamed])}"
                self._charge(chunk, blamed, finished, dead, death.cause, not sent and blamed not in broken,
                             message=death.message + note, traceback=death.traceback, pid=death.pid,
                             exit_code=death.exit_code, signal=death.signal)
            settled = ended | {blamed} if 0 <= blamed < len(chunk.rids) else ended  # charged or done: not re-queued
            if settled:
                chunk = chunk.select([i for i in range(len(chunk.rids)) if i not in settled])
            if chunk.rids:
                self._requeue(chunk)
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
                tell(self.node, NodeLog(f"stage {self.stage.name!r}: restart budget exhausted, "
                                        f"going on with {len(self.slots)} worker(s)"))
                return
            self._fail(f"more than {self.sup.max_restarts} worker restarts in {self.sup.restart_window} s; "
                       f"last: {death.cause} ({death.message})", death.traceback)
            return
        self.stats.restarts += 1
        self.crash_alerts.count(f"stage {self.stage.name!r}", 1,
                                f"{death.cause}: {death.message}" + (f" (pid {death.pid})" if death.pid else ""))
        low, high = self.sup.backoff
        delay = min(high, low * (2 ** self.crash_streak)) * random.uniform(0.5, 1.0)
        self.crash_streak += 1
        timer = threading.Timer(delay, tell, (self.actor_ref, Respawn()))
        timer.daemon = True
        timer.start()

    def _fail(self, cause: str, detail: str) -> None:
        self.state = "failed"
        for slot in self.slots.values():
            slot.proc.kill()
        tell(self.node, StageFailure(StageFailed(self.stage.name, cause, self.last_item, detail)))


def _attempts(chunk: Chunk, i: int) -> int:
    """Attempts item `i` of `chunk` has had so far."""
    return chunk.attempts[i] if chunk.attempts else 0
