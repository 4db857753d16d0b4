"""How the root reaches its nodes: `LocalLink` (a NodeActor in this process) and `RemoteLink` (a node server).

A RemoteLink is one persistent, authenticated connection. Root-to-node messages are `("tell", name, args)` and
`("ask", id, name, args)`; the node answers asks with `("reply", id, ok, value)`, forwards log records as
`("log", record)`, and sends its ledger's and NodeActor's reports (`completed`, `node_ready`, `failed`) as they are.
Both sides send `("ping",)` every `heartbeat` seconds and give the other up after `dead_after` seconds of silence,
so a stopped or partitioned node (no FIN ever arrives) is noticed too.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from typing import Any, Callable

import cloudpickle
import pykka

from pipeline_cluster import affinity, wire
from pipeline_cluster.actors.base import ask, tell
from pipeline_cluster.actors.ledger import TreeLedger
from pipeline_cluster.deadletters import DeadLetter
from pipeline_cluster.errors import ClusterError
from pipeline_cluster.multiprocess_logging import Record


class LocalLink:
    """A NodeActor in this process, reached by actor messages; root items go straight into its ledger."""

    alive = True

    def __init__(self, ref: pykka.ActorRef, ledger: TreeLedger) -> None:
        self.name = ledger.name
        self.ref = ref
        self.ledger = ledger

    def submit(self, rids: list[int], items: list, stage: int) -> None:
        """Hand root items to the node."""
        self.ledger.submit(rids, items, stage)

    def tell(self, name: str, *args: Any) -> None:
        """Send a message to the node."""
        tell(self.ref, name, *args)

    def ask(self, name: str, *args: Any, timeout: float | None = None) -> Any:
        """Send a message and wait for the node's answer."""
        return ask(self.ref, name, *args, timeout=timeout)

    def close(self) -> None:
        """Stop the node actor (and with it every worker)."""
        self.ref.stop(block=True, timeout=30)


class _Reply:
    """A pending answer to an ask."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = False
        self.value: Any = None


class RemoteLink:
    """A node server reached over one authenticated connection; a reader thread routes what it sends.

    The link connects to `address` itself, or takes an already authenticated `channel` (a deployment's SSH tunnel);
    `name` (default `host:port`) must be unique among the cluster's nodes. Everything sent goes through an outbox
    and a writer thread, so neither the RootActor nor the heartbeat ever blocks on a node that stopped reading.
    """

    def __init__(self, address: tuple[str, int], authkey: bytes, root: pykka.ActorRef,
                 log_sink: Callable[[Record], None], connect_timeout: float = 10.0, heartbeat: float = 1.0,
                 dead_after: float = 10.0, *, channel: wire.Channel | None = None, name: str | None = None) -> None:
        self.address = (address[0], int(address[1]))
        self.name = name or f"{self.address[0]}:{self.address[1]}"
        self.root = root
        self.log_sink = log_sink
        if channel is None:
            try:
                channel = wire.connect(self.address, authkey, timeout=connect_timeout)
            except (OSError, EOFError) as exc:
                raise ClusterError(f"cannot connect to node {self.name}: {exc}") from exc
        self.channel = channel
        self.alive = True
        self.lost_reason: str | None = None
        self.heartbeat, self.dead_after = heartbeat, dead_after
        self.last_heard = time.monotonic()
        self._closing = threading.Event()
        self._ids = itertools.count(1)
        self._replies: dict[int, _Reply] = {}
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._reader = affinity.start_thread(self._read, name=f"pipeline-cluster-link-{self.name}")
        affinity.start_thread(self._write, name=f"pipeline-cluster-writer-{self.name}")
        try:
            self.info = self.ask("hello", self.name, heartbeat, dead_after, timeout=connect_timeout)
        except BaseException:
            self.close()
            raise
        affinity.start_thread(self._beat, name=f"pipeline-cluster-heartbeat-{self.name}")

    def submit(self, rids: list[int], items: list, stage: int) -> None:
        """Hand root items to the node (they are pickled by the writer thread, big bytes items out-of-band)."""
        self.tell("submit", rids, wire.out_of_band(items), stage)

    def tell(self, name: str, *args: Any) -> None:
        """Send a message to the node without waiting; a lost node is handled by the reader, not here."""
        self._outbox.put(("tell", name, args))

    def ask(self, name: str, *args: Any, timeout: float | None = None) -> Any:
        """Send a message and wait for the node's answer (its exception is re-raised here).

        A pipeline travels cloudpickled inside the message, so the node unpickles it where a failure can be answered.
        """
        if name == "setup":
            args = (cloudpickle.dumps(args[0]),)
        reply = _Reply()
        with self._lock:
            if not self.alive:
                raise ClusterError(f"node {self.name} is lost")
            rid = next(self._ids)
            self._replies[rid] = reply
        self._outbox.put(("ask", rid, name, args))
        if not reply.event.wait(timeout):
            raise TimeoutError(f"node {self.name} did not answer {name!r} within {timeout} s")
        if not reply.ok:
            raise reply.value
        return reply.value

    def _read(self) -> None:
        try:
            while True:
                message = self.channel.recv()
                self.last_heard = time.monotonic()
                kind = message[0]
                if kind == "ping":
                    continue
                if kind == "reply":
                    with self._lock:
                        reply = self._replies.pop(message[1], None)
                    if reply is not None:
                        reply.ok, reply.value = message[2], message[3]
                        reply.event.set()
                elif kind == "log":
                    self.log_sink(message[1])
                else:
                    self.root.tell(message)
        except (EOFError, OSError) as exc:
            reason = str(exc)
        except Exception as exc:  # a message we cannot read: the link is unusable
            reason = f"unreadable message: {exc!r}"
        self._lost(reason)

    def _write(self) -> None:
        """Send the outbox in order; a failed send means the connection is gone."""
        while True:
            message = self._outbox.get()
            if message is None:
                return
            try:
                self.channel.send(message)
            except OSError as exc:
                self._lost(f"send failed: {exc}")
                return
            except Exception as exc:  # the message cannot be pickled: fail it alone, the link stays up
                self._unsendable(message, exc)

    def _unsendable(self, message: tuple, error: Exception) -> None:
        """Submitted items that cannot be pickled become dead letters (the rest go out); a failed ask is answered."""
        if message[:2] == ("tell", "submit"):
            rids, items, stage = message[2]
            good, bad = [], []
            for rid, item in zip(rids, items):
                try:
                    cloudpickle.dumps(item)
                    good.append((rid, item))
                except Exception as exc:
                    bad.append(DeadLetter(repr(item), f"stage {stage}", stage, 1, "exception", "PicklingError",
                                          f"item {item!r:.200} cannot be pickled to send to node {self.name}: {exc}",
                                          node=self.name, rid=rid, refeedable=False))
            if good:
                self._outbox.put(("tell", "submit", ([r for r, _ in good], [i for _, i in good], stage)))
            self.root.tell(("completed", self.name, [letter.rid for letter in bad], [], bad))
        elif message[0] == "ask":
            with self._lock:
                reply = self._replies.pop(message[1], None)
            if reply is not None:
                reply.ok, reply.value = False, TypeError(f"cannot send {message[2]!r} to node {self.name}: {error}")
                reply.event.set()

    def _beat(self) -> None:
        """Ping the node; declare it lost after `dead_after` seconds without hearing from it."""
        while not self._closing.wait(self.heartbeat):
            silent = time.monotonic() - self.last_heard
            if silent > self.dead_after:
                self._lost(f"no heartbeat for {silent:.1f} s (dead after {self.dead_after} s)")
                return
            self._outbox.put(("ping",))

    def _lost(self, reason: str) -> None:
        with self._lock:
            was_alive, self.alive = self.alive, False
            replies, self._replies = self._replies, {}
            if was_alive:
                self.lost_reason = reason
        for reply in replies.values():
            reply.ok, reply.value = False, ClusterError(f"node {self.name} is lost: {reason}")
            reply.event.set()
        self._closing.set()
        self._outbox.put(None)
        self.channel.close()
        if was_alive:
            tell(self.root, "node_lost", self.name, reason)

    def close(self) -> None:
        """Close the connection; the node server stops this session's workers."""
        with self._lock:
            self.alive = False
        self._closing.set()
        self._outbox.put(None)
        self.channel.close()
        self._reader.join(timeout=10)
