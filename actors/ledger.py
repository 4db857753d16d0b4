"""TreeLedger: a node's count of every root item's live tree, shared by the node's stage supervisors.

A root item's tree starts as one live item. It counts, per root item, the extra items born (an output of a stage but
the last, beyond the first output of its input) and, for trees that grew so, the items that died (left the pipeline:
processed by the last stage, dropped or failed for good). A root item is reported, with all of its outputs and dead
letters, only when its deaths reach its extra births plus one, which is what makes delivery exactly-once per input.
While no tree has grown (a pipeline without fan-out) every death finishes its root item and nothing is counted.

A root item whose generator streams (yields more outputs than a worker sends at once) cannot be held whole: its
outputs go out as they come (`Completed.streamed`), except in ordered and keyed runs, which must sort them.

It is a plain object under a lock rather than an actor: root items enter it and stages report into it from their own
threads, so a batch costs no extra thread hand-off. It works once per root item of a batch, not once per death.
"""
from __future__ import annotations

import threading
from collections import Counter
from itertools import repeat
from operator import itemgetter
from collections.abc import Callable
from typing import Any

import pykka

from pipeline_cluster.actors.base import tell
from pipeline_cluster.messages import Chunk, Completed, DeadLetter, Outputs, Push


class TreeLedger:
    """Root items in, completed root items (with outputs and dead letters) out through `report`."""

    def __init__(self, name: str, report: Callable[[Any], None]) -> None:
        """`report` takes what the node tells the root: Completed from here, and the NodeActor's reports."""
        self.name = name
        self.report = report
        self.lock = threading.Lock()
        self.report_lock = threading.Lock()  # taken before `lock` is let go: reports leave in the ledger's order
        self.extra: Counter[int] = Counter()  # births beyond the root item itself
        self.died: Counter[int] = Counter()  # deaths in trees that have extra births (its keys are among extra's)
        self.results: dict[int, list] = {}  # outputs of root items that are not finished yet
        self.held_dead: dict[int, list[DeadLetter]] = {}  # dead letters of root items not finished yet
        self.streaming: set[int] = set()  # root items whose outputs go out as they come (see the module docstring)
        self.stages: list[pykka.ActorRef] = []
        self.keyed = False
        self.generation = 0

    def reset(self) -> None:
        """Forget every root item and stop routing new ones: a new generation (setup) begins, and reports
        of the previous one are ignored from now on."""
        with self.lock:
            self.extra.clear()
            self.died.clear()
            self.results.clear()
            self.held_dead.clear()
            self.streaming.clear()
            self.stages = []
            self.generation += 1

    def route(self, stages: list[pykka.ActorRef], keyed: bool = False) -> None:
        """Send root items to these stages (of the current generation) from now on; `keyed`: report each output's
        root item too."""
        with self.lock:
            self.stages = stages
            self.keyed = keyed

    def submit(self, rids: list[int], items: list, stage: int = 0) -> None:
        """Root items from the root enter the pipeline at `stage`."""
        with self.lock:
            if stage >= len(self.stages):
                return  # sent before the pipeline was stopped: that run is over
            tell(self.stages[stage], Push(Chunk(rids, items)))

    def record(self, generation: int, born: list[int], died: list[int], outputs: Outputs | None,
               dead: list[DeadLetter]) -> None:
        """A stage's report on one batch: items `born` and `died` (one rid each), outputs of the last stage, dead
        letters. Reports the root items whose trees are now complete.

        Each output's root item is among `died` (its input left the pipeline with it), so when every root item
        in `died` is complete, so are all the outputs' ones.
        """
        done: list[int] = []
        every = False  # every root item in `died` is complete
        streamed: list = []  # outputs of streaming root items that are not finished (unordered runs)
        streamed_rids: list[int] = []
        with self.lock:
            if generation != self.generation:
                return  # a report of a pipeline this node has already stopped
            if born:
                self.extra.update(born)
            if died and not self.extra:  # no tree has grown: each death ends its root item (at most once each)
                done, every = died, True
            elif died:
                done, every = self._complete(died)
            done_set = set(done) if self.results or self.held_dead or dead or not every else set()
            finished_rids: list[int] | None = None
            if self.keyed:
                finished_outputs, finished_rids = self._finish_in_order(done, outputs)
            else:
                finished_outputs = []
                if self.results:
                    for rid in self.results.keys() & done_set:  # outputs held from earlier batches come first
                        finished_outputs.extend(self.results.pop(rid))
                if outputs is not None:
                    if every:
                        finished_outputs.extend(outputs.items)
                    else:
                        self._sort_outputs(outputs, done_set, finished_outputs, streamed, streamed_rids)
            for letter in dead:  # reported with their root item, so a node lost before that reports nothing twice
                assert letter.rid is not None
                self.held_dead.setdefault(letter.rid, []).append(letter)
            finished_dead: list[DeadLetter] = []
            if self.held_dead:
                for rid in self.held_dead.keys() & done_set:
                    finished_dead.extend(self.held_dead.pop(rid))
            if self.streaming and done:
                self.streaming.difference_update(done)
            self.report_lock.acquire()
        reports = [Completed(self.name, [], streamed, [], None, streamed_rids)] if streamed else []
        if done:
            reports.append(Completed(self.name, done, finished_outputs, finished_dead, finished_rids))
        self._send(reports)

    def record_part(self, generation: int, rid: int, born: int, outputs: Outputs | None) -> None:
        """A part of a generator item's outputs, sent on while it still yields: `born` new live items of root item
        `rid` (passed to the next stage), or a last stage's `outputs`. From now on the root item streams."""
        streamed: list = []
        with self.lock:
            if generation != self.generation:
                return
            if born:
                self.extra[rid] += born
            if rid not in self.streaming:
                self.streaming.add(rid)
                if not self.keyed:
                    streamed = self.results.pop(rid, [])  # outputs held from before it streamed go first
            if outputs is not None:
                if self.keyed:
                    self.results.setdefault(rid, []).extend(zip(outputs.paths or repeat(()), outputs.items))
                else:
                    streamed.extend(outputs.items)
            self.report_lock.acquire()
        self._send([Completed(self.name, [], streamed, [], None, [rid] * len(streamed))] if streamed else [])

    def _send(self, reports: list[Completed]) -> None:
        """Report outside `lock` (a report may wait on the network), then let `report_lock` go: the caller took it
        before letting `lock` go, so reports leave in the order the ledger made them."""
        try:
            for report in reports:
                self.report(report)
        finally:
            self.report_lock.release()

    def _complete(self, died: list[int]) -> tuple[list[int], bool]:
        """Count deaths in grown trees: the root items among `died` whose trees are now complete, and whether
        that is all of them."""
        deaths = Counter(died)  # a batch of a generator's outputs names each root item many times
        done = []
        for rid, count in deaths.items():
            total = self.died.get(rid, 0) + count
            if total == self.extra.get(rid, 0) + 1:
                done.append(rid)
                self.died.pop(rid, None)
                self.extra.pop(rid, None)
            else:
                self.died[rid] = total
        return done, len(done) == len(deaths)

    def _sort_outputs(self, outputs: Outputs, done: set[int], finished: list, streamed: list,
                      streamed_rids: list[int]) -> None:
        """Append the outputs of finished root items to `finished`, and those of streaming ones to `streamed`; hold
        the others until their root item is done."""
        streaming = self.streaming
        for rid, output in zip(outputs.rids, outputs.items):
            if rid in done:
                finished.append(output)
            elif rid in streaming:
                streamed.append(output)
                streamed_rids.append(rid)
            else:
                self.results.setdefault(rid, []).append(output)

    def _finish_in_order(self, done: list[int], outputs: Outputs | None) -> tuple[list, list[int]]:
        """For ordered runs: the outputs of the finished root items `done`, each item's in the order of their paths
        (the order a generator yielded them, whichever batch or worker ran them), with each output's root item."""
        if outputs is not None:
            for rid, output, path in zip(outputs.rids, outputs.items, outputs.paths or repeat(())):
                self.results.setdefault(rid, []).append((path, output))
        finished: list = []
        finished_rids: list[int] = []
        for rid in done:
            held = self.results.pop(rid, None)
            if held:
                held.sort(key=itemgetter(0))
                finished.extend(output for _, output in held)
                finished_rids.extend([rid] * len(held))
        return finished, finished_rids
