"""TreeLedger: a node's count of every root item's live tree, shared by the node's stage supervisors.

It counts, per root item, the items of its tree that were born (the root item itself, and an output of a stage but
the last for every output beyond the first of its input) and that died (left the pipeline: processed by the last
stage, dropped or failed for good). A root item is reported, with all of its outputs and dead letters, only when the
two counts meet, which is what makes delivery exactly-once per input.

It is a plain object under a lock rather than an actor: root items enter it and stages report into it from their own
threads, so a batch costs no extra thread hand-off. The counting and the completion check run as C-level
operations over whole batches (Counter updates, set and map), not Python loops.
"""
from __future__ import annotations

import threading
from collections import Counter, deque
from itertools import compress, repeat
from operator import eq, not_
from typing import Callable

import pykka

from pipeline_cluster.actors.base import tell
from pipeline_cluster.deadletters import DeadLetter


class TreeLedger:
    """Root items in, completed root items (with outputs and dead letters) out through `report`."""

    def __init__(self, name: str, report: Callable[[tuple], None]) -> None:
        self.name = name
        self.report = report
        self.lock = threading.Lock()
        self.born: Counter[int] = Counter()
        self.died: Counter[int] = Counter()
        self.results: dict[int, list] = {}  # outputs of root items that are not finished yet
        self.held_dead: dict[int, list[DeadLetter]] = {}  # dead letters of root items not finished yet
        self.stages: list[pykka.ActorRef] = []
        self.generation = 0

    def reset(self) -> None:
        """Forget every root item and stop routing new ones: a new generation (setup) begins, and reports
        of the previous one are ignored from now on."""
        with self.lock:
            self.born.clear()
            self.died.clear()
            self.results.clear()
            self.held_dead.clear()
            self.stages = []
            self.generation += 1

    def route(self, stages: list[pykka.ActorRef]) -> None:
        """Send root items to these stages (of the current generation) from now on."""
        with self.lock:
            self.stages = stages

    def unfinished(self) -> list[int]:
        """The root items not finished yet (finished ones are removed from both counters)."""
        with self.lock:
            return list(self.born)

    def submit(self, rids: list[int], items: list, stage: int = 0) -> None:
        """Root items from the root enter the pipeline at `stage`."""
        with self.lock:
            if stage >= len(self.stages):
                return  # sent before the pipeline was stopped: that run is over
            self.born.update(rids)
            tell(self.stages[stage], "push", (rids, items, None))

    def record(self, generation: int, born: list[int], died: list[int], outputs: tuple | None,
               dead: list[DeadLetter]) -> None:
        """A stage's report on one batch: items `born` and `died` (one rid each), outputs of the last stage as
        (rids, outputs), dead letters. Reports the root items whose trees are now complete."""
        done: list[int] = []
        with self.lock:
            if generation != self.generation:
                return  # a report of a pipeline this node has already stopped
            if born:
                self.born.update(born)
            if died:
                self.died.update(died)
                candidates = list(set(died))
                done = list(compress(candidates, map(eq, map(self.died.__getitem__, candidates),
                                                     map(self.born.__getitem__, candidates))))
                deque(map(dict.__delitem__, repeat(self.born), done), 0)  # dict's own: Counter's is Python code
                deque(map(dict.__delitem__, repeat(self.died), done), 0)
            done_set = set(done)
            finished_outputs: list = []
            for rid in self.results.keys() & done_set:  # outputs held from earlier batches come first
                finished_outputs.extend(self.results.pop(rid))
            if outputs is not None:
                self._sort_outputs(outputs, done_set, finished_outputs)
            for letter in dead:  # reported with their root item, so a node lost before that reports nothing twice
                self.held_dead.setdefault(letter.rid, []).append(letter)
            finished_dead: list[DeadLetter] = []
            for rid in self.held_dead.keys() & done_set:
                finished_dead.extend(self.held_dead.pop(rid))
        if done:  # outside the lock: a report may wait on the network
            self.report(("completed", self.name, done, finished_outputs, finished_dead))

    def _sort_outputs(self, outputs: tuple, done: set[int], finished: list) -> None:
        """Append the outputs of finished root items to `finished`; hold the others until their root item is done.

        Only the outputs whose root item is still running (a generator's outputs split over batches) take the
        per-item Python path.
        """
        out_rids, outs = outputs
        finishing = list(map(done.__contains__, out_rids))
        if all(finishing):
            finished.extend(outs)
            return
        finished.extend(compress(outs, finishing))
        waiting = list(map(not_, finishing))
        for rid, out in zip(compress(out_rids, waiting), compress(outs, waiting)):
            bucket = self.results.get(rid)
            if bucket is None:
                self.results[rid] = [out]
            else:
                bucket.append(out)
