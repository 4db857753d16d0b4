"""NodeActor: hosts one StageSupervisor per stage on this node and reports to the root.

Root items enter through the node's TreeLedger, which its stages report into and which tells the root when a root
item's whole tree is done; the actor itself sets the stages up, starts and stops them and gathers their stats.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import pykka

from pipeline_cluster.affinity import WorkerPlacement
from pipeline_cluster.actors.base import Actor, tell
from pipeline_cluster.actors.ledger import TreeLedger
from pipeline_cluster.actors.stage import StageSupervisor
from pipeline_cluster.deadletters import DeadLetter
from pipeline_cluster.errors import StageFailed
from pipeline_cluster.model import Pipeline
from pipeline_cluster.multiprocess_logging import Record, make_record


class NodeActor(Actor):
    """One node: stage supervisors, the per-root-item tree ledger, and the report channel to the root."""

    def __init__(self, ledger: TreeLedger, log_sink: Callable[[Record], None], workers: int | None = None,
                 log_level: int = logging.INFO) -> None:
        super().__init__()
        self.ledger = ledger
        self.name = ledger.name
        self.report = ledger.report
        self.log_sink = log_sink
        self.default_workers = workers or os.cpu_count() or 1
        self.log_level = log_level
        self.stages: list[pykka.ActorRef] = []
        self.ready: set[int] = set()
        self.placement = WorkerPlacement()  # shared by the stages: where each worker process runs
        self.escalate = lambda text: self.report(("failed", self.name, RuntimeError(text)))

    def on_setup(self, pipeline: Pipeline) -> None:
        self._stop_stages(kill=True)
        n = len(pipeline.stages)
        self.stages = [
            StageSupervisor.start(i, stage, stage.workers or self.default_workers, i == n - 1, self.actor_ref,
                                  self.ledger, self.placement, self.log_sink, self.log_level)
            for i, stage in enumerate(pipeline.stages)
        ]
        for i, ref in enumerate(self.stages):
            tell(ref, "link", self.stages[i - 1] if i else None, self.stages[i + 1] if i + 1 < n else None)
        self.ledger.route(self.stages)

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

    def on_kill(self) -> None:
        """Stop at once: every worker is killed, every root item here forgotten (the root re-sends or drops them)."""
        self._stop_stages(kill=True)

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
        self.ledger.reset()

    def on_stop(self) -> None:
        self._stop_stages(kill=True)
