"""NodeActor: hosts one StageSupervisor per stage on this node and reports finished root items upstream.

It counts, per root item, the items of its tree that were born (the root item itself, every output of a stage but
the last) and that died (left a stage: processed, dropped or failed for good). A root item is reported, with all of
its outputs, only when the two counts meet, which is what makes delivery exactly-once per input. The counting and
the completion check run as C-level operations over whole batches (Counter updates, set and map), not Python loops.
"""
from __future__ import annotations

import logging
import os
from collections import Counter, deque
from itertools import compress, repeat
from operator import eq
from typing import Callable

import pykka

from pipeline_cluster.actors.base import Actor, tell
from pipeline_cluster.actors.stage import StageSupervisor
from pipeline_cluster.deadletters import DeadLetter
from pipeline_cluster.errors import StageFailed
from pipeline_cluster.model import Pipeline
from pipeline_cluster.multiprocess_logging import Record, make_record


class NodeActor(Actor):
    """One node: stage supervisors, the per-root-item tree ledger, and the report channel to the root."""

    def __init__(self, name: str, report: Callable[[tuple], None], log_sink: Callable[[Record], None],
                 workers: int | None = None, log_level: int = logging.INFO) -> None:
        super().__init__()
        self.name = name
        self.report = report
        self.log_sink = log_sink
        self.default_workers = workers or os.cpu_count() or 1
        self.log_level = log_level
        self.stages: list[pykka.ActorRef] = []
        self.born: Counter[int] = Counter()
        self.died: Counter[int] = Counter()
        self.results: dict[int, list] = {}  # outputs of root items that are not finished yet
        self.held_dead: dict[int, list[DeadLetter]] = {}  # dead letters of root items not finished yet
        self.generation = 0
        self.ready: set[int] = set()
        self.escalate = lambda text: self.report(("failed", self.name, RuntimeError(text)))

    def on_setup(self, pipeline: Pipeline) -> None:
        self._stop_stages(kill=True)
        self.generation += 1
        n = len(pipeline.stages)
        self.stages = [
            StageSupervisor.start(i, stage, stage.workers or self.default_workers, i == n - 1, self.actor_ref,
                                  self.name, self.log_sink, self.log_level, self.generation)
            for i, stage in enumerate(pipeline.stages)
        ]
        for i, ref in enumerate(self.stages):
            tell(ref, "link", self.stages[i - 1] if i else None, self.stages[i + 1] if i + 1 < n else None)

    def on_boot(self) -> None:
        self.ready.clear()
        for ref in self.stages:
            tell(ref, "spawn_workers")

    def on_stage_ready(self, index: int) -> None:
        self.ready.add(index)
        if len(self.ready) == len(self.stages):
            self.report(("node_ready", self.name))

    def on_size_hint(self, bytes_per_item: float) -> None:
        self.report(("size_hint", self.name, bytes_per_item))

    def on_stage_failed(self, error: StageFailed) -> None:
        self.report(("failed", self.name, error))

    def on_submit(self, rids: list[int], items: list, stage: int = 0) -> None:
        if stage >= len(self.stages):
            return  # sent before the pipeline was stopped: that run is over
        self.born.update(rids)
        tell(self.stages[stage], "push", (rids, items, None))

    def on_tree(self, generation: int, born: list[int], died: list[int], outputs: tuple | None,
                dead: list[DeadLetter]) -> None:
        if generation != self.generation:
            return  # a report of a pipeline this node has already stopped
        if born:
            self.born.update(born)
        done: list[int] = []
        if died:
            self.died.update(died)
            candidates = list(set(died))
            done = list(compress(candidates, map(eq, map(self.died.__getitem__, candidates),
                                                 map(self.born.__getitem__, candidates))))
            deque(map(dict.__delitem__, repeat(self.born), done), 0)  # dict's own: Counter's is Python code
            deque(map(dict.__delitem__, repeat(self.died), done), 0)
        results = self.results
        finished_outputs: list = []
        if outputs is not None:
            out_rids, outs = outputs
            if set(done).issuperset(out_rids) and results.keys().isdisjoint(done):
                finished_outputs = outs  # the common case: every output here finishes its root item now
                outputs = None
            else:
                for rid, out in zip(out_rids, outs):
                    bucket = results.get(rid)
                    if bucket is None:
                        results[rid] = [out]
                    else:
                        bucket.append(out)
        if done and results:
            for rid in done:
                finished_outputs.extend(results.pop(rid, ()))
        for letter in dead:  # reported with their root item, so a node lost before that reports nothing twice
            self.held_dead.setdefault(letter.rid, []).append(letter)
        finished_dead: list[DeadLetter] = []
        if done and self.held_dead:
            for rid in done:
                finished_dead.extend(self.held_dead.pop(rid, ()))
        if done:
            self.report(("completed", self.name, done, finished_outputs, finished_dead))

    def on_log(self, text: str) -> None:
        self.log_sink(make_record(text, logging.WARNING, "pipeline_cluster.node")._replace(node=self.name))

    def on_log_failure(self, letter: DeadLetter) -> None:
        self.on_log(f"dropped item {letter.item!r:.200} in stage {letter.stage!r} after {letter.attempts} "
                    f"attempt(s): {letter.cause}: {letter.message}")

    def on_pause(self, paused: bool) -> None:
        for ref in self.stages:
            tell(ref, "pause", paused)

    def on_stats(self) -> list:
        futures = [ref.ask(("stats",), block=False) for ref in self.stages]
        return [future.get(timeout=30) for future in futures]

    def on_shutdown(self, grace: float) -> None:
        """Stop the stages' workers gracefully (close() runs in class stages)."""
        self._stop_stages(kill=False, grace=grace)

    def on_kill(self) -> list[int]:
        """Stop at once; returns the root items that were unfinished here."""
        unfinished = list(self.born)  # finished root items are removed from both counters
        self._stop_stages(kill=True)
        return unfinished

    def _stop_stages(self, kill: bool, grace: float = 5.0) -> None:
        futures = [ref.ask(("kill",) if kill else ("shutdown", grace), block=False) for ref in self.stages]
        for future in futures:
            try:
                future.get(timeout=grace + 30)
            except (pykka.ActorDeadError, pykka.Timeout):
                pass
        for ref in self.stages:
            ref.stop(block=True, timeout=10)
        self.stages = []
        self.born.clear()
        self.died.clear()
        self.results.clear()
        self.held_dead.clear()

    def on_stop(self) -> None:
        self._stop_stages(kill=True)
