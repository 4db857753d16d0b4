"""How the root reaches its nodes: `LocalLink` (a NodeActor in this process) and `RemoteLink` (a node server).

A RemoteLink is one persistent, authenticated connection. The root sends the node `Submit`s and tells (`Boot`,
`Pause`), and asks as `Request(id, body)`; the node answers each Request with a `Reply`, forwards log records, and
sends its reports (`Completed`, `NodeReady`, `NodeFailed`, `SizeHint`) as they come. Both sides send `Ping` every
`heartbeat` seconds and give the other up after `dead_after` seconds of silence, so a stopped or partitioned node
(no FIN ever arrives) is noticed too.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from typing import Any, Protocol
from collections.abc import Callable

import cloudpickle
import pykka

from pipeline_cluster.actors.base import ask, tell
from pipeline_cluster.actors.ledger import TreeLedger
from pipeline_cluster.errors import ClusterError
from pipeline_cluster.logs.records import Record
from pipeline_cluster.messages import (NODE_TO_ROOT, Completed, DeadLetter, Hello, NodeLost, Ping, Reply, Request,
                                       Setup, Submit)
from pipeline_cluster.placement import Placement
from pipeline_cluster.transport import wire

logger = logging.getLogger("pipeline_cluster.links")


class NodeLink(Protocol):
    """How the root reaches one node, in-process or over the network."""

    name: str
    alive: bool

    def submit(self, submit: Submit) -> None:
        """Hand root items to the node."""

    def tell(self, message: Any) -> None:
        """Send a message to the node."""

    def ask(self, message: Any, timeout: float | None = None) -> Any:
        """Send a message and wait for the node's answer."""

    def close(self) -> None:
        """Stop using the node."""


class LocalLink:
    """A NodeActor in this process, reached by actor messages; root items go straight into its ledger."""

    alive = True
    lost_reason: str | None = None
    last_heard = float("inf")  # in this process: never silent

    def __init__(self, ref: pykka.ActorRef, ledger: TreeLedger) -> None:
        self.name = ledger.name
        self.ref = ref
        self.ledger = ledger

    def submit(self, submit: Submit) -> None:
        """Hand root items to the node."""
        self.ledger.submit(submit.rids, submit.items, submit.stage)

    def tell(self, message: Any) -> None:
        """Send a message to the node."""
        tell(self.ref, message)

    def ask(self, message: Any, timeout: float | None = None) -> Any:
        """Send a message and wait for the node's answer."""
        return ask(self.ref, message, timeout=timeout)

    def close(self) -> None:
        """Stop the node actor (and with it every worker)."""
        self.ref.stop(block=True, timeout=30)


def connect_retrying(address: tuple[str, int], authkey: bytes, timeout: float) -> wire.Channel:
    """An authenticated channel to `address`; a node that refuses connections (it is still starting) is tried
    again with backoff until `timeout` seconds have passed. A failed handshake is not retried."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            return wire.connect(address, authkey, timeout=max(0.5, deadline - time.monotonic()))
        except (ConnectionRefusedError, ConnectionResetError) as exc:
            if time.monotonic() + delay >= deadline:
                raise ConnectionRefusedError(f"{exc} (tried for {timeout} s)") from None
            time.sleep(delay)
            delay = min(1.0, delay * 2)


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
                 dead_after: float = 10.0, *, channel: wire.Channel | None = None, name: str | None = None,
                 placement: Placement | None = None) -> None:
        self.address = (address[0], int(address[1]))
        self.name = name or f"{self.address[0]}:{self.address[1]}"
        self.root = root
        self.log_sink = log_sink
        if channel is None:
            try:
                channel = connect_retrying(self.address, authkey, connect_timeout)
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
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()  # None: stop writing
        placement = placement or Placement()
        self._reader = placement.start_thread(self._read, name=f"pipeline-cluster-link-{self.name}")
        placement.start_thread(self._write, name=f"pipeline-cluster-writer-{self.name}")
        try:
            self.info = self.ask(Hello(self.name, heartbeat, dead_after), timeout=connect_timeout)
        except BaseException:
            self.close()
            raise
        placement.start_thread(self._beat, name=f"pipeline-cluster-heartbeat-{self.name}")

    def submit(self, submit: Submit) -> None:
        """Hand root items to the node (they are pickled by the writer thread, big bytes items out-of-band)."""
        self._outbox.put(submit._replace(items=wire.out_of_band(submit.items)))

    def tell(self, message: Any) -> None:
        """Send a message to the node without waiting; a lost node is handled by the reader, not here."""
        self._outbox.put(message)

    def ask(self, message: Any, timeout: float | None = None) -> Any:
        """Send a message and wait for the node's answer (its exception is re-raised here).

        A pipeline travels cloudpickled inside the message, so the node unpickles it where a failure can be answered.
        """
        if isinstance(message, Setup):
            message = Setup(cloudpickle.dumps(message.pipeline), message.keyed)
        reply = _Reply()
        with self._lock:
            if not self.alive:
                raise ClusterError(f"node {self.name} is lost")
            rid = next(self._ids)
            self._replies[rid] = reply
        self._outbox.put(Request(rid, message))
        if not reply.event.wait(timeout):
            raise TimeoutError(f"node {self.name} did not answer {type(message).__name__} within {timeout} s")
        if not reply.ok:
            raise reply.value
        return reply.value

    def _read(self) -> None:
        try:
            while True:
                message = self.channel.recv()
                self.last_heard = time.monotonic()
                kind = type(message)
                if kind is Reply:
                    with self._lock:
                        reply = self._replies.pop(message.id, None)
                    if reply is not None:
                        reply.ok, reply.value = message.ok, message.value
                        reply.event.set()
                elif kind is Record:
                    self.log_sink(message)
                elif kind in NODE_TO_ROOT:
                    if kind is not Ping:
                        self.root.tell(message)
                else:
                    logger.warning("node %s sent a message of unknown kind %s: ignored", self.name, kind.__name__)
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

    def _unsendable(self, message: Any, error: Exception) -> None:
        """Submitted items that cannot be pickled become dead letters (the rest go out); a failed ask is answered."""
        if isinstance(message, Submit):
            good: list[tuple[int, Any]] = []
            bad: list[DeadLetter] = []
            for rid, item in zip(message.rids, message.items):
                try:
                    cloudpickle.dumps(item)
                    good.append((rid, item))
                except Exception as exc:
                    bad.append(DeadLetter(repr(item), f"stage {message.stage}", message.stage, 1, "exception",
                                          "PicklingError",
                                          f"item {item!r:.200} cannot be pickled to send to node {self.name}: {exc}",
                                          node=self.name, rid=rid, refeedable=False))
            if good:
                self._outbox.put(Submit([rid for rid, _ in good], [item for _, item in good], message.stage))
            self.root.tell(Completed(self.name, [letter.rid for letter in bad if letter.rid is not None], [], bad))
        elif isinstance(message, Request):
            with self._lock:
                reply = self._replies.pop(message.id, None)
            if reply is not None:
                reply.ok = False
                reply.value = TypeError(f"cannot send {type(message.body).__name__} to node {self.name}: {error}")
                reply.event.set()

    def _beat(self) -> None:
        """Ping the node; declare it lost after `dead_after` seconds without hearing from it."""
        while not self._closing.wait(self.heartbeat):
            silent = time.monotonic() - self.last_heard
            if silent > self.dead_after:
                self._lost(f"no heartbeat for {silent:.1f} s (dead after {self.dead_after} s)")
                return
            self._outbox.put(Ping())

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
            tell(self.root, NodeLost(self.name, reason))

    def close(self) -> None:
        """Close the connection; the node server stops this session's workers."""
        with self._lock:
            self.alive = False
        self._closing.set()
        self._outbox.put(None)
        self.channel.close()
        self._reader.join(timeout=10)
