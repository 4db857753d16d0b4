"""RootActor: spreads root items over nodes within each node's credit and hands finished items' outputs over.

It keeps the ledger of unfinished root items (which node holds each), so a lost node's items can be sent again,
and memory stays bounded: a node never holds more than its credit of unfinished root items.
"""
from __future__ import annotations

import itertools
from collections import deque
from typing import Any, Callable, Protocol

from pipeline_cluster.actors.base import Actor
from pipeline_cluster.deadletters import DeadLetter
from pipeline_cluster.errors import ClusterError
from pipeline_cluster.runstate import RunState


class NodeLink(Protocol):
    """How the root reaches one node, in-process or over the network."""

    name: str
    alive: bool

    def tell(self, name: str, *args: Any) -> None: ...

    def ask(self, name: str, *args: Any, timeout: float | None = None) -> Any: ...

    def close(self) -> None: ...


class RootActor(Actor):
    """Ledger and router of root items; one per cluster."""

    def __init__(self, credit: int, dead_sink: Callable[[list[DeadLetter]], None]) -> None:
        super().__init__()
        self.credit = credit
        self.dead_sink = dead_sink
        self.links: dict[str, NodeLink] = {}
        self.used: dict[str, int] = {}
        self.backlog: deque[tuple[list[int], list, int]] = deque()  # (rids, items, first stage)
        self.inflight: dict[int, tuple[str, Any, int]] = {}  # rid -> (node, item, first stage)
        self.next_rid = 0
        self.paused = False
        self.state = RunState()
        self.escalate = lambda text: self.state.fail(RuntimeError(text))

    def on_add_node(self, link: NodeLink) -> None:
        self.links[link.name] = link
        self.used[link.name] = 0

    def on_begin(self, state: RunState) -> None:
        """Start a new run: forget the previous run's items."""
        self.state = state
        self.backlog.clear()
        self.inflight.clear()
        self.used = dict.fromkeys(self.links, 0)

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
        while self.backlog and not self.paused and self.links:
            name = max(self.used, key=lambda n: self.credit - self.used[n])
            free = self.credit - self.used[name]
            if free <= 0:
                return
            rids, items, stage = self.backlog[0]
            if len(rids) > free:
                self.backlog[0] = (rids[free:], items[free:], stage)
                rids, items = rids[:free], items[:free]
            else:
                self.backlog.popleft()
            self.inflight.update(zip(rids, zip(itertools.repeat(name), items, itertools.repeat(stage))))
            self.used[name] += len(rids)
            self.links[name].tell("submit", rids, items, stage)
            self.state.change(at_root=-len(rids))

    def on_completed(self, name: str, results: list[tuple[int, list]], dead: list[DeadLetter]) -> None:
        if name not in self.links:
            return  # a node already declared lost: its items were sent elsewhere
        if dead:
            for letter in dead:
                entry = self.inflight.get(letter.rid)
                letter.node = letter.node or (entry[0] if entry else None)
            self.dead_sink(dead)
        if not results:
            return
        outputs: list = []
        pop = self.inflight.pop
        for rid, outs in results:
            pop(rid, None)
            outputs.extend(outs)
        self.used[name] -= len(results)
        self.state.outputs.put(("out", outputs, len(results)))
        self._dispatch()

    def on_node_lost(self, name: str, reason: str) -> None:
        """Stop using a lost node and send its unfinished root items to the others."""
        if self.links.pop(name, None) is None:
            return
        self.used.pop(name, None)
        lost = [(rid, item, stage) for rid, (node, item, stage) in self.inflight.items() if node == name]
        by_stage: dict[int, tuple[list, list]] = {}
        for rid, item, stage in lost:
            del self.inflight[rid]
            rids, items = by_stage.setdefault(stage, ([], []))
            rids.append(rid)
            items.append(item)
        for stage, (rids, items) in by_stage.items():
            self.backlog.appendleft((rids, items, stage))
        if lost:
            self.state.change(at_root=len(lost))
        with self.state.cond:
            self.state.ready_nodes.discard(name)
            self.state.lost_nodes.add(name)
            self.state.cond.notify_all()
        if not self.links:
            self.state.fail(ClusterError(f"no node left: the last one, {name}, was lost ({reason}); "
                                         f"{len(self.inflight) + sum(len(chunk[0]) for chunk in self.backlog)} item(s) "
                                         "unfinished"))
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
        unfinished = len(self.inflight) + sum(len(chunk[0]) for chunk in self.backlog)
        for link in list(self.links.values()):
            try:
                link.ask("kill", timeout=60)
            except Exception as exc:  # a node lost meanwhile has no workers to kill here
                self.on_node_lost(link.name, str(exc))
        self.on_begin(self.state)
        return unfinished

    def on_unfinished(self) -> int:
        return len(self.inflight) + sum(len(chunk[0]) for chunk in self.backlog)
