"""A thin layer over pykka: typed messages (see `pipeline_cluster.messages`) dispatched to the method that
`@handles` their type.

Tell-style messages keep per-batch overhead low and, unlike unobserved proxy futures, an exception in a handler
is never silent: it reaches `on_failure`, which escalates it to whoever supervises the actor.
"""
from __future__ import annotations

import logging
import os
import queue
import select
import traceback
import weakref
from typing import Any, ClassVar, TypeVar
from collections.abc import Callable

import pykka

from pipeline_cluster.messages import Readable, Tick
from pipeline_cluster.placement import Placement

logger = logging.getLogger("pipeline_cluster.actors")

Handler = TypeVar("Handler", bound=Callable[..., Any])


def handles(*types: type) -> Callable[[Handler], Handler]:
    """Mark an actor method as the handler of messages of these types."""

    def mark(method: Handler) -> Handler:
        method.handles = types  # type: ignore[attr-defined]
        return method

    return mark


class Actor(pykka.ThreadingActor):
    """Base actor: messages dispatched by type, daemon threads, and escalation of unexpected errors."""

    use_daemon_thread = True  # a forgotten close() must not keep the user's program alive
    handlers: ClassVar[dict[type, Callable[[Any, Any], Any]]] = {}
    escalate: Callable[[str], None] | None = None
    placement: Placement = Placement()
    batch_task = True  # with placement on, its thread is a SCHED_BATCH task (see placement.HomeCpu)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        handlers: dict[type, Callable[[Any, Any], Any]] = {}
        for klass in reversed(cls.__mro__):
            for value in vars(klass).values():
                for message_type in getattr(value, "handles", ()):
                    handlers[message_type] = value
        cls.handlers = handlers

    @staticmethod
    def _create_actor_inbox() -> queue.SimpleQueue:
        """A C-level SimpleQueue: pykka's inbox protocol is put/get/empty, and it needs no Python-level lock."""
        return queue.SimpleQueue()

    def on_start(self) -> None:
        self.placement.pin_this_thread(self.batch_task)

    def on_receive(self, message: Any) -> Any:
        handler = self.handlers.get(type(message))
        if handler is None:
            raise TypeError(f"{type(self).__name__} has no handler for {type(message).__name__}")
        return handler(self, message)

    def on_failure(self, exc_type: Any, exc: Any, tb: Any) -> None:
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        logger.error("%s crashed:\n%s", type(self).__name__, text)
        if self.escalate is not None:
            self.escalate(f"internal error in {type(self).__name__}: {exc!r}\n{text}")


class Envelope:
    """What an inbox's get() gives pykka's actor loop: a message, and where its reply goes (None for a tell)."""

    __slots__ = ("message", "reply_to")

    def __init__(self, message: Any, reply_to: Any = None) -> None:
        self.message = message
        self.reply_to = reply_to


READABLE = Envelope(Readable())
TICK = Envelope(Tick())
POLL_SLICE = 3600.0  # seconds: a longer wait is polled in slices (poll takes at most INT_MAX ms)


class PollingInbox:
    """An actor inbox that also watches one file descriptor: its get() returns READABLE when the descriptor has
    data and TICK when the actor's deadline passes, so one thread waits for messages, a socket and a timeout at once
    and a peer's reply wakes the actor directly, with no hand-off through another thread.

    A put() also bumps an eventfd, which is what wakes a get() blocked in poll.
    """

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        closer = weakref.finalize(self, os.close, self.wakeup)  # closed only when nobody can put() any more
        closer.atexit = False  # not at exit either: the actor's thread may still wait on it until its cluster closes
        self.poller = select.poll()
        self.poller.register(self.wakeup, select.POLLIN)
        self.watched: int | None = None
        self.deadline: Callable[[], float | None] = lambda: None  # seconds until TICK, None: no deadline

    def watch(self, fd: int | None, deadline: Callable[[], float | None] = lambda: None) -> None:
        """Report `fd` readable (None: stop watching) and call `deadline()` before each wait for the time left."""
        if self.watched is not None:
            self.poller.unregister(self.watched)
        if fd is not None:
            self.poller.register(fd, select.POLLIN)
        self.watched, self.deadline = fd, deadline

    def put(self, envelope: Any) -> None:
        self.queue.put(envelope)
        os.eventfd_write(self.wakeup, 1)

    def empty(self) -> bool:
        return self.queue.empty()

    def get(self) -> Any:
        while True:
            try:
                return self.queue.get_nowait()
            except queue.Empty:
                pass
            wait = self.deadline()
            events = self.poller.poll(None if wait is None else max(0.0, min(wait, POLL_SLICE)) * 1000)
            if not events:
                if wait is not None and wait <= POLL_SLICE:
                    return TICK
                continue
            readable = False
            for fd, _ in events:
                if fd == self.wakeup:
                    os.eventfd_read(self.wakeup)
                else:
                    readable = True
            if readable:
                return READABLE


def tell(ref: pykka.ActorRef, message: Any) -> None:
    """Send a message without waiting; a stopped actor is ignored (it is shutting down)."""
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        pass


def ask(ref: pykka.ActorRef, message: Any, timeout: float | None = None) -> Any:
    """Send a message and wait for the handler's return value (its exception is re-raised here)."""
    return ref.ask(message, timeout=timeout)
