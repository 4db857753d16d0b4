"""NodeActor: hosts one StageSupervisor per stage on this node and reports to the root.

Root items enter through the node's TreeLedger, which its stages report into and which tells the root when a root
item's whole tree is done; the actor itself sets the stages up, starts and stops them and gathers their stats.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pykka

from pipeline_cluster.actors.base import Actor, handles, tell
from pipeline_cluster.actors.policies import REBALANCE_SECONDS, Autoscaler
from pipeline_cluster.actors.ledger import TreeLedger
from pipeline_cluster.actors.stage import StageSupervisor
from pipeline_cluster.cpus import usable_cpus
from pipeline_cluster.logs.records import Record
from pipeline_cluster.logs.route import make_record
from pipeline_cluster.messages import (Boot, DroppedFailure, HoldStreams, Kill, Link, NodeFailed, NodeLog,
                                       NodeReady, Pause, Rebalance, Resize, Setup, Shutdown, SizeHint, SpawnWorkers,
                                       StageFailure, StageReady, Stats)
from pipeline_cluster.placement import Placement
from pipeline_cluster.stats import StageStats
from pipeline_cluster.worker.zygote import Launcher


class NodeActor(Actor):
    """One node: stage supervisors, the per-root-item tree ledger, and the report channel to the root."""

    def __init__(self, ledger: TreeLedger, log_sink: Callable[[Record], None], workers: int | None = None,
                 log_level: int = logging.INFO, placement: Placement | None = None) -> None:
        super().__init__()
        self.ledger = ledger
        self.name = ledger.name
        self.report = ledger.report
        self.log_sink = log_sink
        self.default_workers = workers or usable_cpus()
        self.log_level = log_level
        self.placement = placement or Placement()
        self.launcher = Launcher()  # this node's zygote, which forks its workers
        self.stages: list[pykka.ActorRef] = []
        self.autoscaler: Autoscaler | None = None
        self.generation = 0  # setups so far: a timer of an earlier pipeline finds nothing to do
        self.ready: set[int] = set()
        self.escalate = lambda text: self.report(NodeFailed(self.name, RuntimeError(text)))

    @handles(Setup)
    def on_setup(self, message: Setup) -> None:
        self._stop_stages(kill=True)
        stages = message.pipeline.stages
        n = len(stages)
        self.autoscaler = Autoscaler.for_stages(stages, self.default_workers)
        self.stages = [
            StageSupervisor.start(i, stage, self.autoscaler.initial(i) if self.autoscaler else
                                  stage.workers or self.default_workers, i == n - 1, self.actor_ref,
                                  self.ledger, self.placement, self.launcher, self.log_sink, self.log_level,
                                  message.keyed)
            for i, stage in enumerate(stages)
        ]
        if self.autoscaler is not None:
            self._schedule_rebalance()
        for i, ref in enumerate(self.stages):
            tell(ref, Link(self.stages[i - 1] if i else None, self.stages[i + 1] if i + 1 < n else None))
        self.ledger.route(self.stages, message.keyed)

    @handles(Boot)
    def on_boot(self, message: Boot) -> None:
        self.ready.clear()
        for ref in self.stages:
            tell(ref, SpawnWorkers())

    @handles(StageReady)
    def on_stage_ready(self, message: StageReady) -> None:
        self.ready.add(message.stage)
        if len(self.ready) == len(self.stages):
            self.report(NodeReady(self.name))

    @handles(SizeHint)
    def on_size_hint(self, message: SizeHint) -> None:
        self.report(message)

    @handles(StageFailure)
    def on_stage_failed(self, message: StageFailure) -> None:
        self.report(NodeFailed(self.name, message.error))

    @handles(NodeLog)
    def on_log(self, message: NodeLog) -> None:
        self.log_sink(make_record(message.text, logging.WARNING, "pipeline_cluster.node")._replace(node=self.name))

    @handles(DroppedFailure)
    def on_log_failure(self, message: DroppedFailure) -> None:
        letter = message.letter
        self.on_log(NodeLog(f"dropped item {letter.item!r:.200} in stage {letter.stage!r} after {letter.attempts} "
                            f"attempt(s): {letter.cause}: {letter.message}"))

    def _schedule_rebalance(self) -> None:
        timer = threading.Timer(REBALANCE_SECONDS, tell, (self.actor_ref, Rebalance(self.generation)))
        timer.daemon = True
        timer.start()

    @handles(Rebalance)
    def on_rebalance(self, message: Rebalance) -> None:
        """Every REBALANCE_SECONDS: move a worker from an idle autoscaled stage to a busy one (logged)."""
        if self.autoscaler is None or message.generation != self.generation or not self.stages:
            return
        futures = [ref.ask(Stats(), block=False) for ref in self.stages]
        try:
            stats = [future.get(timeout=10) for future in futures]
        except (pykka.ActorDeadError, pykka.Timeout):
            return
        for index, workers, why in self.autoscaler.moves(stats):
            tell(self.stages[index], Resize(index, workers))
            self.log_sink(make_record(f"stage {stats[index].stage}: {workers} worker(s) ({why})", logging.INFO,
                                      "pipeline_cluster.autoscale")._replace(node=self.name))
        self._schedule_rebalance()

    @handles(Resize)
    def on_resize(self, message: Resize) -> None:
        if not 0 <= message.stage < len(self.stages):
            raise ValueError(f"no stage number {message.stage} on node {self.name}")
        tell(self.stages[message.stage], message)

    @handles(Pause)
    def on_pause(self, message: Pause) -> None:
        for ref in self.stages:
            tell(ref, message)

    @handles(HoldStreams)
    def on_hold_streams(self, message: HoldStreams) -> None:
        if self.stages:
            tell(self.stages[-1], message)  # the last stage's streamed outputs are what reaches the caller

    @handles(Stats)
    def on_stats(self, message: Stats) -> list[StageStats]:
        futures = [ref.ask(message, block=False) for ref in self.stages]
        return [future.get(timeout=30) for future in futures]

    @handles(Shutdown)
    def on_shutdown(self, message: Shutdown) -> None:
        """Stop the stages' workers gracefully (close() runs in class stages)."""
        self._stop_stages(kill=False, grace=message.grace)

    @handles(Kill)
    def on_kill(self, message: Kill) -> None:
        """Stop at once: every worker is killed, every root item here forgotten (the root re-sends or drops them)."""
        self._stop_stages(kill=True)

    def _stop_stages(self, kill: bool, grace: float = 5.0) -> None:
        request = Kill() if kill else Shutdown(grace)
        futures = [ref.ask(request, block=False) for ref in self.stages]
        for future in futures:
            try:
                future.get(timeout=grace + 30)
            except (pykka.ActorDeadError, pykka.Timeout):
                pass
        for ref in self.stages:
            ref.stop(block=True, timeout=10)
        self.stages = []
        self.autoscaler = None
        self.generation += 1
        self.ledger.reset()

    def on_stop(self) -> None:
        self._stop_stages(kill=True)
        self.launcher.close()
