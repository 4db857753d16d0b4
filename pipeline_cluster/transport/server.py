"""The node server: hosts a NodeActor for each root that connects (the older project's `node.Server`).

    pipeline_cluster.node.Server(("127.0.0.2", 5600), log_addr).serve()
    pipeline-cluster node --host 127.0.0.2 --port 5600

Every connection is authenticated before a byte is unpickled, and only the message kinds a root may send
(`messages.ROOT_TO_NODE`) are acted on. `pipeline-cluster node` prints one line when it listens,
`PCREADY {"host": ..., "port": ..., "pid": ...}`, on stdout, so scripts and tests can use port 0.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any
from collections.abc import Callable

import cloudpickle

from pipeline_cluster import __version__
from pipeline_cluster.actors.base import ask, tell
from pipeline_cluster.actors.ledger import TreeLedger
from pipeline_cluster.actors.node import NodeActor
from pipeline_cluster.cpus import usable_cpus
from pipeline_cluster.errors import ClusterError
from pipeline_cluster.logs import route
from pipeline_cluster.logs.records import Record
from pipeline_cluster.messages import (ROOT_TO_NODE, ROOT_TO_NODE_REQUESTS, Completed, Hello, NodeFailed, Ping,
                                       Reply, Request, Setup, Submit)
from pipeline_cluster.placement import Placement, make_placement, start_thread
from pipeline_cluster.transport import wire
from pipeline_cluster.transport.auth import read_authkey_file, resolve_authkey

logger = logging.getLogger("pipeline_cluster.node")


class WarningEcho:
    """Copies warnings and errors (the workers' among them) to this node's stderr, which is a deployed node's
    node.log, at most `burst` lines every `window` s: a flood is counted rather than written, and the count said
    with the next line written or at `flush`. The root's log has every one of them."""

    def __init__(self, burst: int = 20, window: float = 10.0) -> None:
        self.burst, self.window = burst, window
        self.lock = threading.Lock()
        self.window_start = time.monotonic()
        self.written = 0
        self.held = 0

    def __call__(self, record: Record) -> None:
        if record.level < logging.WARNING:
            return
        now = time.monotonic()
        with self.lock:
            if now - self.window_start >= self.window:
                self.window_start, self.written = now, 0
            if self.written >= self.burst:
                self.held += 1
                return
            self.written += 1
        self.flush()
        sys.stderr.write(record.format() + "\n")

    def flush(self) -> None:
        """Say how many lines were held back, if any."""
        with self.lock:
            held, self.held = self.held, 0
        if held:
            sys.stderr.write(f"({held} more warning(s) or error(s): in the root's log only)\n")


class Session:
    """One root's connection: a NodeActor whose reports go back over the channel."""

    def __init__(self, channel: wire.Channel, log_sink: Callable[[Record], None] | None, workers: int | None,
                 placement: Placement, echo_warnings: bool = True) -> None:
        self.channel = channel
        self.workers = workers
        self.placement = placement
        self.echo = WarningEcho() if echo_warnings else None
        self.log_sink = log_sink or self._to_root
        self.node: Any = None
        self.ledger: TreeLedger | None = None
        self.last_heard = time.monotonic()
        self.ended = threading.Event()

    def _send(self, message: Any) -> None:
        try:
            self.channel.send(message)
        except OSError:
            pass  # the root is gone: the reader sees EOF and ends the session

    def _to_root(self, record: Record) -> None:
        """A log record for the root's log; a warning or error also into this node's own (see WarningEcho)."""
        if self.echo is not None:
            self.echo(record)
        self._send(record)

    def _report(self, message: Any) -> None:
        """Send a report of the node's ledger or actor; finished outputs that are big bytes go out-of-band."""
        if isinstance(message, Completed):
            message = message._replace(outputs=wire.out_of_band(message.outputs))
        self._send(message)

    def serve(self) -> None:
        """Read the root's messages until it disconnects, then stop every worker of this session."""
        try:
            while True:
                try:
                    message = self.channel.recv()
                except (EOFError, OSError):
                    raise
                except Exception as exc:  # a message we cannot unpickle (a class or module missing here)
                    self._send(NodeFailed(socket.gethostname(), ClusterError(
                        f"node {socket.gethostname()} cannot read a message from the root: {type(exc).__name__}: "
                        f"{exc} (classes of your items must be importable on every node)")))
                    continue
                self.last_heard = time.monotonic()
                kind = type(message)
                if kind is Submit:  # root items go straight into the ledger: no thread hand-off
                    if self.ledger is not None:
                        self.ledger.submit(message.rids, message.items, message.stage)
                elif kind is Ping:
                    self._send(Ping())
                elif kind is Request and type(message.body) in ROOT_TO_NODE_REQUESTS:
                    self.placement.start_thread(self._answer, message, name="pipeline-cluster-answer")
                elif kind in ROOT_TO_NODE and kind is not Request and self.node is not None:
                    tell(self.node, message)
                else:
                    logger.warning("refused a message of kind %s from the root at %s",
                                   type(getattr(message, "body", message)).__name__, self.channel.peer)
        except (EOFError, OSError):
            pass
        finally:
            self.close()

    def _answer(self, request: Request) -> None:
        body = request.body
        try:
            if isinstance(body, Hello):
                self.ledger = TreeLedger(body.node, self._report)
                self.node = NodeActor.start(self.ledger, self.log_sink, self.workers, placement=self.placement)
                self.placement.start_thread(self._watch_root, body.heartbeat, body.dead_after,
                                            name="pipeline-cluster-watch-root")
                value: Any = {"pid": os.getpid(), "cpus": usable_cpus(), "version": __version__,
                              "python": sys.version.split()[0]}
            else:
                if isinstance(body, Setup):
                    body = Setup(self._load_pipeline(body.pipeline), body.keyed)
                value = ask(self.node, body, timeout=600)
            self._send(Reply(request.id, True, value))
        except BaseException as exc:
            try:
                cloudpickle.dumps(exc)
            except Exception:
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            self._send(Reply(request.id, False, exc))

    def _watch_root(self, heartbeat: float, dead_after: float) -> None:
        """End the session when the root has been silent for `dead_after` s (a partition sends no FIN)."""
        while not self.ended.wait(heartbeat):
            if time.monotonic() - self.last_heard > dead_after:
                logger.warning("root silent for more than %s s: ending its session", dead_after)
                self.channel.close()
                return

    @staticmethod
    def _load_pipeline(payload: bytes) -> Any:
        try:
            return cloudpickle.loads(payload)
        except Exception as exc:
            raise ClusterError(f"node {socket.gethostname()} cannot load the pipeline: {type(exc).__name__}: {exc} "
                               "(functions from your own modules must be importable on every node)") from None

    def close(self) -> None:
        """Stop the node actor (killing its workers) and close the connection."""
        self.ended.set()
        if self.echo is not None:
            self.echo.flush()
        if self.node is not None:
            self.node.stop(block=True, timeout=60)
            self.node = None
        self.channel.close()


class Server:
    """A node server on `addr`; worker logs go to the log server at `log_addr`, or back to each root."""

    def __init__(self, addr: tuple[str, int], log_addr: tuple[str, int] | None = None, *,
                 authkey: bytes | str | None = None, workers: int | None = None, single_root: bool = False,
                 placement: bool = False, conn_buffer_size: int | None = None,
                 benchmark_folder: str | None = None, echo_warnings: bool = True) -> None:
        """`conn_buffer_size` and `benchmark_folder` are the older project's options: accepted, and meaningless
        here (connections need no buffer size; stats go to each root's run directory). `echo_warnings=False`
        keeps the sessions' warnings off this process's stderr (a Ray actor's stderr reaches the driver's console,
        which shows them already)."""
        self.authkey = resolve_authkey(authkey)
        self.log_addr = log_addr
        self.workers = workers
        self.echo_warnings = echo_warnings
        self.single_root = single_root  # a deployed node serves one root and exits when that root is gone
        self.placement = make_placement(placement)
        self.listener = wire.Listener((addr[0], int(addr[1])), self.authkey)
        self.address = self.listener.address
        self.sessions: list[Session] = []
        self._stopping = threading.Event()
        self._last_root = time.monotonic()  # when a root was last connected (for a detached node's lease)

    def serve(self) -> None:
        """Accept roots until `stop()` (or Ctrl-C, when serving in the main thread)."""
        log_sink = None
        if self.log_addr is not None:
            route.configure(self.log_addr, self.authkey)
            log_sink = route.emit
        logger.info("node server listening on %s:%s", *self.address)
        try:
            while not self._stopping.is_set():
                try:
                    channel = self.listener.accept()
                except OSError:  # stop() closed the listener
                    break
                session = Session(channel, log_sink, self.workers, self.placement, self.echo_warnings)
                try:
                    self.placement.start_thread(self._serve_session, session, name="pipeline-cluster-session")
                except RuntimeError as exc:  # no thread to be had (a memory limit): refuse this root, serve on
                    logger.error("cannot serve the root at %s: %s", channel.peer, exc)
                    channel.close()
                    continue
                self.sessions = [s for s in self.sessions if not s.ended.is_set()] + [session]
        except KeyboardInterrupt:
            logger.info("interrupted: stopping")
        finally:
            self.listener.close()
            for session in self.sessions:
                session.close()

    def idle_seconds(self) -> float:
        """Seconds since the last root left (0 while one is connected)."""
        if any(not session.ended.is_set() for session in self.sessions):
            return 0.0
        return time.monotonic() - self._last_root

    def _serve_session(self, session: Session) -> None:
        try:
            session.serve()
        finally:
            self._last_root = time.monotonic()
        if self.single_root:
            logger.info("root gone: stopping (this node serves a single root)")
            self.stop()

    def stop(self) -> None:
        """Stop accepting, end every session and its workers."""
        self._stopping.set()
        self.listener.close()


def _expire_when_idle(server: Server, idle_timeout: float) -> None:
    """A detached node's lease: with no root connected for `idle_timeout` seconds, it stops by itself."""
    while not server._stopping.wait(min(1.0, idle_timeout / 4)):
        if server.idle_seconds() >= idle_timeout:
            logger.warning("no root for %.0f s: stopping (the detached node's lease expired)", idle_timeout)
            server.stop()


def _exit_on_stdin_eof(server: Server, grace: float) -> None:
    """A deployed node's lifeline: when the root's SSH channel closes, stdin ends, and so does this node."""
    sys.stdin.read()
    logger.warning("stdin closed: the root is gone, stopping")
    server.stop()
    time.sleep(grace)  # the main thread normally exits well within the grace period
    os._exit(1)


def main(host: str, port: int, log_addr: tuple[str, int] | None, authkey_file: str | None,
         workers: int | None, stdin_config: bool = False, placement: bool = False) -> int:
    """`pipeline-cluster node`: serve until SIGINT/SIGTERM (or, with `stdin_config`, until the root is gone).

    With `stdin_config` the first stdin line is JSON with the run's secrets and settings, `{"authkey": HEX,
    "run_dir": PATH, "env": {NAME: VALUE}}`, so they never appear on a command line; `env` goes into the node's
    environment (its workers inherit it; a PYTHONPATH there also extends sys.path). The node writes `node.pid` into
    run_dir, serves a single root, and exits when that root disconnects, falls silent, or closes the node's stdin.
    With `"idle_timeout": SECONDS` it is detached instead: it serves roots one after another, outlives the SSH
    session that started it, and stops once no root has been connected for that long.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    authkey = None
    run_dir = None
    idle_timeout = None
    if stdin_config:
        config = json.loads(sys.stdin.readline() or "{}")
        authkey = bytes.fromhex(config["authkey"])
        run_dir = config.get("run_dir")
        idle_timeout = config.get("idle_timeout")
        env = {str(k): str(v) for k, v in config.get("env", {}).items()}
        os.environ.update(env)
        if env.get("PYTHONPATH"):
            sys.path[:0] = env["PYTHONPATH"].split(os.pathsep)
    elif authkey_file:
        authkey = read_authkey_file(authkey_file)
    detached = idle_timeout is not None
    server = Server((host, port), log_addr, authkey=authkey, workers=workers,
                    single_root=stdin_config and not detached, placement=placement)
    for sig in (signal.SIGINT, signal.SIGTERM):  # this process is ours: stop cleanly on either
        signal.signal(sig, lambda *_: server.stop())
    print("PCREADY " + json.dumps({"host": server.address[0], "port": server.address[1], "pid": os.getpid()}),
          flush=True)
    pidfile = None
    if run_dir:
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        pidfile = os.path.join(run_dir, f"node-{server.address[1]}.pid")
        with open(pidfile, "w") as f:
            f.write(str(os.getpid()))
    if idle_timeout is not None:  # detached: the SSH session that started it may close; nothing more on stdout
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, sys.stdout.fileno())
        os.dup2(devnull, sys.stdin.fileno())
        os.close(devnull)
        start_thread(_expire_when_idle, server, float(idle_timeout), name="pipeline-cluster-lease")
    elif stdin_config:
        start_thread(_exit_on_stdin_eof, server, 10.0, name="pipeline-cluster-stdin-watch")
    started = time.monotonic()
    try:
        server.serve()
    finally:
        if pidfile:
            with contextlib.suppress(OSError):
                os.unlink(pidfile)
    logger.info("node server stopped after %.1f s", time.monotonic() - started)
    return 0
