"""RootActor: spreads root items over nodes within each node's credit and hands finished items' outputs over.

It keeps the ledger of unfinished root items (which node holds each), so a lost node's items can be sent again,
and memory stays bounded: a node never holds more than its credit of unfinished root items. Credit is fixed when
the user sets it; otherwise it adapts to item size (a node reports the pickled bytes per item it sees), so tiny items
get deep queues for big batches and large items stay within a byte budget.
"""
from __future__ import annotations

import itertools
from collections import Counter, deque
from typing import Any, Callable, Protocol

from pipeline_cluster.actors.base import Actor
from pipeline_cluster.deadletters import DeadLetter
from pipeline_cluster.errors import ClusterError
from pipeline_cluster.runstate import RunState


class NodeLink(Protocol):
    """How the root reaches one node, in-process or over the network."""

    name: str
    alive: bool

    def submit(self, rids: list[int], items: list, stage: int) -> None: ...

    def tell(self, name: str, *args: Any) -> None: ...

    def ask(self, name: str, *args: Any, timeout: float | None = None) -> Any: ...

    def close(self) -> None: ...


DEFAULT_CREDIT = 1024       # per node, until its first size report (adaptive credit)
MAX_CREDIT = 8192
MIN_CREDIT = 16
MAX_NODE_LOSSES = 3  # a root item held by this many lost nodes is a dead letter (cause node_lost), not re-sent
BYTE_BUDGET = 32 * 1024 * 1024  # pickled input bytes a node may hold (adaptive credit)
REFILL = 8  # a node gets more root items once this fraction (1/REFILL) of its credit is free


class RootActor(Actor):
    """Ledger and router of root items; one per cluster."""

    def __init__(self, credit: int | None, dead_sink: Callable[[list[DeadLetter]], None]) -> None:
        super().__init__()
        self.fixed_credit = credit
        self.dead_sink = dead_sink
        self.links: dict[str, NodeLink] = {}
        self.credit: dict[str, int] = {}
        self.backlog: deque[tuple[list[int], list, int]] = deque()  # (rids, items, first stage)
        self.held: dict[str, dict[int, Any]] = {}  # node -> {rid: item} of its unfinished root items
        self.entry: dict[int, int] = {}  # rid -> first stage, for root items that do not enter at stage 0 (refeeds)
        self.next_rid = 0
        self.losses: Counter[int] = Counter()  # rid -> nodes lost while holding it
        self.stage_names: list[str] = []
        self.paused = False
        self.state = RunState()
        self.escalate = lambda text: self.state.fail(RuntimeError(text))

    def on_add_node(self, link: NodeLink) -> None:
        self.links[link.name] = link
        self.held[link.name] = {}
        self.credit[link.name] = self.fixed_credit or DEFAULT_CREDIT
        self._update_capacity()

    def on_size_hint(self, name: str, bytes_per_item: float) -> None:
        """A node's measure of pickled bytes per input item: resize its credit to the byte budget."""
        if self.fixed_credit is None and name in self.links:
            self.credit[name] = max(MIN_CREDIT, min(MAX_CREDIT, int(BYTE_BUDGET / max(bytes_per_item, 1.0))))
            self._update_capacity()
            self._dispatch()

    def _update_capacity(self) -> None:
        """Root items the feeder may hold unfinished: every node's credit, plus the largest as backlog."""
        credits = [self.credit[name] for name in self.links]
        with self.state.cond:
            self.state.capacity = sum(credits) + max(credits, default=0)
            self.state.cond.notify_all()

    def on_begin(self, state: RunState, stage_names: list[str] | None = None) -> None:
        """Start a new run: forget the previous run's items."""
        self.state = state
        self.stage_names = stage_names or self.stage_names
        self.backlog.clear()
        self.held = {name: {} for name in self.links}
        self.entry.clear()
        self.losses.clear()
        self._update_capacity()

    def on_feed(self, items: list, stage: int = 0) -> None:
        """Accept root items that enter the pipeline at `stage` (0, or a dead letter's stage when re-fed)."""
        rids = list(range(self.next_rid, self.next_rid + len(items)))
        self.next_rid += len(items)
        self.backlog.append((rids, items, stage))
        self._dispatch()

    def on_pause(self, paused: bool) -> None:
        self.paused = paused
        for link in self.links.values():
            link.tell("pause", paused)
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand backlog to the node with the most free credit, spread evenly over the nodes that have room.

        A node has room when at least 1/REFILL of its credit is free, so a busy node gets work in few large
        messages rather than one small one per completion.
        """
        while self.backlog and not self.paused and self.links:
            free = {name: credit - len(self.held[name]) for name, credit in self.credit.items()
                    if credit - len(self.held[name]) >= -(-credit // REFILL)}
            if not free:
                return
            name = max(free, key=free.__getitem__)
            waiting = sum(len(chunk[0]) for chunk in self.backlog)
            take = min(free[name], -(-waiting // len(free)))
            rids, items, stage = self.backlog[0]
            if len(rids) > take:
                self.backlog[0] = (rids[take:], items[take:], stage)
                rids, items = rids[:take], items[:take]
            else:
                self.backlog.popleft()
            self.held[name].update(zip(rids, items))
            if stage:
                self.entry.update(zip(rids, itertools.repeat(stage)))
            self.links[name].submit(rids, items, stage)
            self.state.change(at_root=-len(rids))

    def on_completed(self, name: str, done: list[int], outputs: list, dead: list[DeadLetter]) -> None:
        """Root items `done` on node `name` finished with these outputs (and these dead letters)."""
        if name not in self.links:
            return  # a node already declared lost: its items were sent elsewhere
        held = self.held[name]
        dead = [letter for letter in dead if letter.rid in held]  # none from a run already ended
        for letter in dead:
            if letter.stage_index < len(self.stage_names):
                letter.stage = self.stage_names[letter.stage_index]
        if dead:
            self.dead_sink(dead)
        if not done:
            return
        before = len(held)
        deque(map(held.pop, done, itertools.repeat(None)), 0)
        finished = before - len(held)
        if not finished:
            return  # reported after a reset: that run's items are gone already
        for ledger in (self.losses, self.entry):
            if ledger:
                deque(map(ledger.pop, done, itertools.repeat(None)), 0)
        self.state.outputs.put(("out", outputs, finished))
        self._dispatch()

    def on_node_lost(self, name: str, reason: str) -> None:
        """Stop using a lost node and send its unfinished root items to the others."""
        if self.links.pop(name, None) is None:
            return
        lost = self.held.pop(name, {})
        self.credit.pop(name, None)
        self._update_capacity()
        by_stage: dict[int, tuple[list, list]] = {}
        dead: list[DeadLetter] = []
        for rid, item in lost.items():
            stage = self.entry.pop(rid, 0)
            self.losses[rid] += 1
            if self.losses[rid] >= MAX_NODE_LOSSES:  # it may be what kills nodes: stop spreading it
                del self.losses[rid]
                stage_name = self.stage_names[stage] if stage < len(self.stage_names) else f"stage {stage}"
                dead.append(DeadLetter(item, stage_name, stage, MAX_NODE_LOSSES, "node_lost",
                                       message=f"{MAX_NODE_LOSSES} nodes were lost while running it; last: {name} "
                                               f"({reason})", node=name, rid=rid))
                continue
            rids, items = by_stage.setdefault(stage, ([], []))
            rids.append(rid)
            items.append(item)
        for stage, (rids, items) in by_stage.items():
            self.backlog.appendleft((rids, items, stage))
        if len(lost) > len(dead):
            self.state.change(at_root=len(lost) - len(dead))
        if dead:
            self.dead_sink(dead)
            self.state.outputs.put(("out", [], len(dead)))  # those root items are finished, as failures
        with self.state.cond:
            self.state.ready_nodes.discard(name)
            self.state.cond.notify_all()
        if not self.links:
            self.state.fail(ClusterError(f"no node left: the last one, {name}, was lost ({reason}); "
                                         f"{self.on_unfinished()} item(s) unfinished"))
            return
        self._dispatch()

    def on_node_ready(self, name: str) -> None:
        with self.state.cond:
            self.state.ready_nodes.add(name)
            self.state.cond.notify_all()

    def on_failed(self, name: str, error: BaseException) -> None:
        self.state.fail(error)

    def on_kill(self) -> int:
        """Stop every node at once; returns how many root items were unfinished."""
        unfinished = self.on_unfinished()
        for link in list(self.links.values()):
            try:
                link.ask("kill", timeout=60)
            except Exception as exc:  # a node lost meanwhile has no workers to kill here
                self.on_node_lost(link.name, str(exc))
        self.on_begin(self.state)
        return unfinished

    def on_unfinished(self) -> int:
        return sum(map(len, self.held.values())) + sum(len(chunk[0]) for chunk in self.backlog)
