"""A thin layer over pykka: messages are tuples `(name, *args)` dispatched to `on_<name>` methods.

Tell-style messages keep per-batch overhead low and, unlike unobserved proxy futures, an exception in a handler
is never silent: it reaches `on_failure`, which escalates it to whoever supervises the actor.
"""
from __future__ import annotations

import logging
import queue
import traceback
from typing import Any, Callable

import pykka

from pipeline_cluster.affinity import pin_this_thread

logger = logging.getLogger("pipeline_cluster.actors")


class Actor(pykka.ThreadingActor):
    """Base actor: tuple messages, daemon threads, and escalation of unexpected errors."""

    use_daemon_thread = True  # a forgotten close() must not keep the user's program alive
    escalate: Callable[[str], None] | None = None

    @staticmethod
    def _create_actor_inbox() -> queue.SimpleQueue:
        """pykka's inbox protocol is put/get/empty: the C-level SimpleQueue hands a message over in about 2/3 of
        the time queue.Queue takes (no Python-level lock and condition per message)."""
        return queue.SimpleQueue()

    def on_start(self) -> None:
        pin_this_thread()

    def on_receive(self, message: Any) -> Any:
        name, *args = message
        return getattr(self, "on_" + name)(*args)

    def on_failure(self, exc_type: Any, exc: Any, tb: Any) -> None:
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        logger.error("%s crashed:\n%s", type(self).__name__, text)
        if self.escalate is not None:
            self.escalate(f"internal error in {type(self).__name__}: {exc!r}\n{text}")


def tell(ref: pykka.ActorRef, name: str, *args: Any) -> None:
    """Send `(name, *args)` to an actor without waiting; a stopped actor is ignored (it is shutting down)."""
    try:
        ref.tell((name, *args))
    except pykka.ActorDeadError:
        pass


def ask(ref: pykka.ActorRef, name: str, *args: Any, timeout: float | None = None) -> Any:
    """Send `(name, *args)` and wait for the handler's return value (its exception is re-raised here)."""
    return ref.ask((name, *args), timeout=timeout)
