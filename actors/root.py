"""RootActor: spreads root items over nodes within each node's credit and hands finished items' outputs over.

It keeps the ledger of unfinished root items (which node holds each), so a lost node's items can be sent again,
and memory stays bounded: a node never holds more than its credit of unfinished root items. Credit is fixed when
the user sets it; otherwise it adapts to item size (a node reports the pickled bytes per item it sees), so tiny items
get deep queues for big batches and large items stay within a byte budget.
"""
from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

from pipeline_cluster.actors import policies
from pipeline_cluster.actors.base import Actor, handles, tell
from pipeline_cluster.errors import ClusterError
from pipeline_cluster.messages import (AddNode, Begin, Completed, DeadLetter, DrainNode, Feed, HoldStreams, Kill,
                                       NodeFailed, NodeLoad, NodeLost, NodeReady, Pause, RemoveNode, SizeHint, Submit,
                                       Unfinished)
from pipeline_cluster.placement import Placement
from pipeline_cluster.run import RunState
from pipeline_cluster.transport.links import NodeLink

_GONE = object()
REMOVED = "removed by the caller"
MAX_NODE_LOSSES = 3  # a root item held by this many lost nodes is a dead letter (cause node_lost), not re-sent


class RootActor(Actor):
    """Ledger and router of root items; one per cluster."""

    def __init__(self, credit: int | None, dead_sink: Callable[[list[DeadLetter]], None],
                 placement: Placement, warn: Callable[[str], None] = lambda text: None) -> None:
        """`dead_sink` takes finished root items' dead letters; `warn` a line for the person running the pipeline."""
        super().__init__()
        self.placement = placement
        self.warn = warn
        self.fixed_credit = credit
        self.dead_sink = dead_sink
        self.links: dict[str, NodeLink] = {}
        self.credit: dict[str, int] = {}
        self.draining: set[str] = set()  # nodes being taken out: they get nothing new
        self.backlog: deque[Submit] = deque()  # root items not yet sent to a node
        self.held: dict[str, dict[int, object]] = {}  # node -> {rid: item} of its unfinished root items
        self.entry: dict[int, int] = {}  # rid -> first stage, for root items that do not enter at stage 0 (refeeds)
        self.next_rid = 0
        self.losses: Counter[int] = Counter()  # rid -> nodes lost while holding it
        self.streamed: set[int] = set()  # unfinished root items some of whose outputs were delivered already
        self.stage_names: list[str] = []
        self.paused = False
        self.state = RunState(placement)
        self.escalate = lambda text: self.state.fail(RuntimeError(text))

    @handles(AddNode)
    def on_add_node(self, message: AddNode) -> None:
        link = message.link
        self.links[link.name] = link
        self.held[link.name] = {}
        self.credit[link.name] = self.fixed_credit or policies.DEFAULT_CREDIT
        self._update_capacity()
        if self.state.streams_held:  # it joins while the caller is behind on streamed outputs
            link.tell(HoldStreams(True))
        self._dispatch()  # a node that joins a running pipeline takes backlog at once

    @handles(SizeHint)
    def on_size_hint(self, message: SizeHint) -> None:
        """A node's measure of pickled bytes per input item: resize its credit to the byte budget."""
        if self.fixed_credit is None and message.node in self.links:
            self.credit[message.node] = policies.credit_for(message.bytes_per_item)
            self._update_capacity()
            self._dispatch()

    def _update_capacity(self) -> None:
        self.state.set_capacity(policies.capacity([self.credit[name] for name in self.links
                                                   if name not in self.draining]))

    @handles(Begin)
    def on_begin(self, message: Begin) -> int:
        """Start a new run: forget the previous run's items; returns the root item id its first input gets."""
        if self.state.streams_held:  # the last run ended with its streams held back
            self.on_hold_streams(HoldStreams(False))
        self.state = message.state
        self.state.hold_streams = lambda held: tell(self.actor_ref, HoldStreams(held))
        self.stage_names = message.stage_names
        self._forget_items()
        return self.next_rid

    def _forget_items(self) -> None:
        self.backlog.clear()
        self.held = {name: {} for name in self.links}
        self.entry.clear()
        self.losses.clear()
        self.streamed.clear()
        self._update_capacity()

    @handles(Feed)
    def on_feed(self, message: Feed) -> None:
        """Accept root items that enter the pipeline at `stage` (0, or a dead letter's stage when re-fed)."""
        first, end = message.first_rid, message.first_rid + len(message.items)
        self.backlog.append(Submit(list(range(first, end)), message.items, message.stage))
        self.next_rid = max(self.next_rid, end)
        self._dispatch()

    @handles(Pause)
    def on_pause(self, message: Pause) -> None:
        self.paused = message.paused
        for link in self.links.values():
            link.tell(message)
        self._dispatch()

    @handles(HoldStreams)
    def on_hold_streams(self, message: HoldStreams) -> None:
        """The caller is behind on streamed outputs (or caught up): pass it on to every node."""
        for link in self.links.values():
            link.tell(message)

    def _dispatch(self) -> None:
        """Hand backlog to the node with the most free credit, spread evenly over the nodes that have room."""
        while self.backlog and not self.paused and self.links:
            free = {}
            for name, credit in self.credit.items():
                if name in self.draining:
                    continue
                room = policies.free_credit(credit, len(self.held[name]))
                if room is not None:
                    free[name] = room
            if not free:
                return
            name = max(free, key=free.__getitem__)
            waiting = sum(len(submit.rids) for submit in self.backlog)
            take = min(free[name], -(-waiting // len(free)))
            rids, items, stage = self.backlog[0]
            if len(rids) > take:
                self.backlog[0] = Submit(rids[take:], items[take:], stage)
                rids, items = rids[:take], items[:take]
            else:
                self.backlog.popleft()
            self.held[name].update(zip(rids, items))
            if stage:
                self.entry.update(dict.fromkeys(rids, stage))
            self.links[name].submit(Submit(rids, items, stage))
            self.state.sent_to_nodes(len(rids))

    @handles(Completed)
    def on_completed(self, message: Completed) -> None:
        """Root items `done` on a node finished with these outputs (and these dead letters)."""
        held = self.held.get(message.node)
        if held is None:
            return  # a node already declared lost: its items were sent elsewhere
        if message.streamed is not None:  # outputs of root items still running, delivered as they come
            if held.keys() >= set(message.streamed):  # else from a run already ended
                self.streamed.update(message.streamed)
                self.state.deliver_streamed(message.outputs, message.streamed)
            return
        dead = [letter for letter in message.dead if letter.rid in held]  # none from a run already ended
        for letter in dead:
            if letter.stage_index < len(self.stage_names):
                letter.stage = self.stage_names[letter.stage_index]
        if dead:
            self.dead_sink(dead)
        finished = [rid for rid in message.done if held.pop(rid, _GONE) is not _GONE]
        if not finished:
            return  # reported after a reset: that run's items are gone already
        if self.losses or self.entry or self.streamed:
            for rid in finished:
                self.losses.pop(rid, None)
                self.entry.pop(rid, None)
                self.streamed.discard(rid)
        self.state.deliver(message.outputs, finished, message.output_rids)
        self._dispatch()

    @handles(DrainNode)
    def on_drain_node(self, message: DrainNode) -> None:
        """Send the node nothing more; what it holds it finishes, and its credit leaves the run's capacity."""
        if message.node in self.links:
            self.draining.add(message.node)
            self._update_capacity()

    @handles(RemoveNode)
    def on_remove_node(self, message: RemoveNode) -> None:
        """Take a (drained) node out; root items it still holds go to the others."""
        self.on_node_lost(NodeLost(message.node, REMOVED))

    @handles(NodeLost)
    def on_node_lost(self, message: NodeLost) -> None:
        """Stop using a lost node and send its unfinished root items to the others."""
        name, reason = message
        self.draining.discard(name)
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
            stage_name = self.stage_names[stage] if stage < len(self.stage_names) else f"stage {stage}"
            if rid in self.streamed:  # run again, it would deliver those outputs twice
                self.streamed.discard(rid)
                del self.losses[rid]
                dead.append(DeadLetter(item, stage_name, stage, 1, "node_lost",
                                       message=f"node {name} was lost ({reason}) after some of this input's outputs "
                                               "were delivered (its generator streams them); not run again, so "
                                               "that none is delivered twice", node=name, rid=rid))
                continue
            if self.losses[rid] >= MAX_NODE_LOSSES:  # it may be what kills nodes: stop spreading it
                del self.losses[rid]
                dead.append(DeadLetter(item, stage_name, stage, MAX_NODE_LOSSES, "node_lost",
                                       message=f"{MAX_NODE_LOSSES} nodes were lost while running it; last: {name} "
                                               f"({reason})", node=name, rid=rid))
                continue
            rids, items = by_stage.setdefault(stage, ([], []))
            rids.append(rid)
            items.append(item)
        for stage, (rids, items) in by_stage.items():
            self.backlog.appendleft(Submit(rids, items, stage))
        if len(lost) > len(dead):
            self.state.sent_to_nodes(len(dead) - len(lost))
        if dead:
            self.dead_sink(dead)
            self.state.deliver([], [letter.rid for letter in dead if letter.rid is not None])  # finished: failed
        self.state.node_ready(name, False)
        moved = len(lost) - len(dead)
        if reason == REMOVED and not lost:  # taken out after draining: the caller logs it
            self._dispatch()
            return
        self.warn(f"node {name} lost: {reason}; {moved} unfinished item(s) moved to "
                  f"{', '.join(sorted(self.links)) or 'no other node'}"
                  + (f"; {len(dead)} dead-lettered (lost too often, or streamed in part)" if dead else ""))
        if not self.links:
            self.state.fail(ClusterError(f"no node left: the last one, {name}, was lost ({reason}); "
                                         f"{self.on_unfinished(Unfinished())} item(s) unfinished"))
            return
        self._dispatch()

    @handles(NodeReady)
    def on_node_ready(self, message: NodeReady) -> None:
        self.state.node_ready(message.node)

    @handles(NodeFailed)
    def on_failed(self, message: NodeFailed) -> None:
        self.state.fail(message.error)

    @handles(Kill)
    def on_kill(self, message: Kill) -> int:
        """Stop every node at once; returns how many root items were unfinished."""
        unfinished = self.on_unfinished(Unfinished())
        for link in list(self.links.values()):
            try:
                link.ask(message, timeout=60)
            except Exception as exc:  # a node lost meanwhile has no workers to kill here
                self.on_node_lost(NodeLost(link.name, str(exc)))
        self._forget_items()
        return unfinished

    @handles(NodeLoad)
    def on_node_load(self, message: NodeLoad) -> dict[str, tuple[int, int]]:
        return {name: (len(self.held[name]), self.credit[name]) for name in self.links}

    @handles(Unfinished)
    def on_unfinished(self, message: Unfinished) -> int:
        return sum(map(len, self.held.values())) + sum(len(submit.rids) for submit in self.backlog)
