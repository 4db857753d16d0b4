"""Bringing nodes up over SSH, each in its own thread, and down again, with a result per host.

Per host: connect (jump hosts, host key, auth), ship (probe the host's python; use its pipeline_cluster, a venv
cached by the wheel's sha256, or SFTP the wheel and install it), start (`exec_command`, no pty, the run's authkey
and run dir as one JSON line on stdin), ready (the node's `PCREADY {json}` line) and handshake (an authenticated
channel, direct TCP or through the SSH connection, and the node's answer to "hello").

The node's stdin stays open for its whole life: when this process goes away (close, crash, kill -9), sshd closes
it and the node exits; a partition is caught by heartbeats on both sides. Nodes write `node-PORT.pid` and their
stderr (`node.log`) into their run dir `WORKDIR/runs/NAME-FILEHASH/RUN_ID/NODE`, where `deploy down` finds them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any, cast, TypeVar
from collections.abc import Callable, Iterator, Mapping

import paramiko

from pipeline_cluster.rundir import runs_root
from pipeline_cluster.transport import wire
from pipeline_cluster.transport.auth import client_handshake
from pipeline_cluster.deploy.channelsock import ChannelSocket
from pipeline_cluster.deploy.config import DeployConfig, NodeSpec
from pipeline_cluster.deploy.errors import DeployError, HostError, NodesMissing
from pipeline_cluster.deploy.remote import Connector, remote_argv, run_hostscript, tail
from pipeline_cluster.deploy.wheel import PACKAGES, build_wheel, wheelhouse
from pipeline_cluster.transport.links import RemoteLink

logger = logging.getLogger("pipeline_cluster.deploy")

COMMAND_TIMEOUT = 120.0  # probe, stop
INSTALL_MARGIN = 30.0  # beyond install_timeout: the host kills an install first, and says so
STOP_GRACE = 10.0
KILL_GRACE = 3.0
T = TypeVar("T")


@dataclasses.dataclass
class HostResult:
    """How one node's bring-up went: `ship` is "existing", "cached" or "shipped"; `error` is set when it failed."""

    node: str
    address: str
    ok: bool = False
    ship: str | None = None
    pid: int | None = None
    port: int | None = None
    seconds: float = 0.0
    error: HostError | None = None


def wheelhouse_cache() -> Path:
    """Where dependency wheels fetched for `wheelhouse = true` are kept, per Python version."""
    return runs_root().parent / "wheelhouse"


def _upload(sftp: paramiko.SFTPClient, target: str, data: bytes) -> None:
    """Write `data` to `target` on the host: to a .part file first, renamed when whole."""
    with sftp.open(target + ".part", "wb") as f:
        f.set_pipelined(True)
        f.write(data)
    sftp.posix_rename(target + ".part", target)


def state_file(config: DeployConfig) -> Path:
    """Where `deploy up --detach` keeps what attaching to its nodes needs (their key and ports), mode 0600."""
    return runs_root().parent / "clusters" / f"{config.identity}.json"


def read_state(config: DeployConfig) -> dict[str, Any]:
    """The detached cluster's state as last written (writes replace the file whole, so no lock is needed to read);
    FileNotFoundError, saying how to start one, without it."""
    try:
        return json.loads(state_file(config).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no detached cluster for {config.source}: start one with "
                                f"`pipeline-cluster deploy up --detach {config.source}`") from None


@contextlib.contextmanager
def changing_state(config: DeployConfig, new: bool = False) -> Iterator[dict[str, Any]]:
    """The detached cluster's state (or, `new`, an empty one), to change under a lock shared with every other
    process that does (`deploy add/remove`, attached roots); written back atomically, mode 0600."""
    path = state_file(config)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state: dict[str, Any] = {} if new else read_state(config)
        yield state
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.chmod(0o600)
        tmp.replace(path)


def runs_dir(workdir: str, config: DeployConfig) -> str:
    """Where a cluster's run dirs live on a host (by its identity: name and file)."""
    return f"{workdir.rstrip('/')}/runs/{config.identity}"


class RemoteNode:
    """One node on one host: its SSH connection, the node's exec channel (its stdin is the lifeline), pid, port."""

    def __init__(self, spec: NodeSpec, config: DeployConfig, run_id: str) -> None:
        self.spec = spec
        self.config = config
        self.run_id = run_id
        self.phase = "connect"
        self.client: paramiko.SSHClient | None = None
        self.process: paramiko.Channel | None = None
        self.run_dir: str | None = None
        self.link: RemoteLink | None = None
        self.result = HostResult(spec.name, spec.address)

    @property
    def ssh(self) -> paramiko.SSHClient:
        """The open SSH connection (from the connect phase on)."""
        assert self.client is not None, "not connected yet"
        return self.client

    @property
    def channel(self) -> paramiko.Channel:
        """The node's exec channel (from the start phase on)."""
        assert self.process is not None, "the node is not started yet"
        return self.process

    @property
    def node_dir(self) -> str:
        """The node's run directory on the host (from the ship phase on)."""
        assert self.run_dir is not None, "not shipped yet"
        return self.run_dir

    def fail(self, detail: str, exit_status: int | None = None, stderr: str = "") -> HostError:
        """A HostError for this node in its current phase."""
        return HostError(self.spec.name, self.spec.address, self.phase, detail, exit_status, tail(stderr))

    def detach(self, connector: Connector, authkey: bytes) -> None:
        """Start the node detached (connect, ship, start): it outlives this SSH connection, which is closed, and
        stops by itself after the cluster's idle_timeout with no root. HostError names the phase that failed."""
        started = time.monotonic()
        try:
            self.client = connector.open(self.spec)
            self.phase = "ship"
            python = self._ship()
            self.phase = "start"
            self._start(python, authkey, self.config.idle_timeout)
            self.result.ok, self.result.seconds = True, round(time.monotonic() - started, 3)
        finally:
            if self.client is not None:
                self.client.close()

    def attach(self, connector: Connector, authkey: bytes, port: int, root: Any, log_sink: Callable) -> RemoteLink:
        """Connect to this node, started detached and listening on `port`; HostError names the phase that failed."""
        started = time.monotonic()
        self.client = connector.open(self.spec)
        self.phase = "handshake"
        self.link = self._handshake(port, authkey, root, log_sink)
        self.result.ok, self.result.port = True, port
        self.result.seconds = round(time.monotonic() - started, 3)
        return self.link

    def up(self, connector: Connector, authkey: bytes, root: Any, log_sink: Callable) -> RemoteLink:
        """Every phase in order; raises HostError naming the phase that failed."""
        started = time.monotonic()
        self.client = connector.open(self.spec)
        self.phase = "ship"
        python = self._ship()
        self.phase = "start"
        port = self._start(python, authkey)
        self.phase = "handshake"
        self.link = self._handshake(port, authkey, root, log_sink)
        self.result.ok, self.result.seconds = True, round(time.monotonic() - started, 3)
        return self.link

    # -- ship ----------------------------------------------------------------------------------------------------

    def _hostscript(self, *args: str, timeout: float = COMMAND_TIMEOUT,
                    private: Mapping[str, str] | None = None) -> Any:
        """Run a hostscript command with the node's python; HostError with exit status and stderr when it fails."""
        python = self.spec.python
        try:
            status, answer, err = run_hostscript(self.ssh, python, *args, timeout=timeout, private=private)
        except (TimeoutError, paramiko.SSHException, OSError) as exc:
            raise self.fail(f"{args[0]} on the host: {exc}") from None
        if status != 0 or answer is None:
            problems = {127: f"python {python!r} not found on the host", 126: f"python {python!r} cannot run"}
            raise self.fail(problems.get(status, f"{args[0]} with python {python!r} failed"), status, err)
        return answer

    def _ship(self) -> str:
        """Decide and do what the host needs; returns the python to start the node with."""
        spec = self.spec
        built = build_wheel() if spec.ship != "never" else None
        venv_id = built.sha256[:16] if built else "none"
        probe = self._hostscript("probe", spec.workdir, venv_id, ",".join(PACKAGES))
        if tuple(probe["python"]) < (3, 10):
            raise self.fail(f"python {spec.python!r} is {'.'.join(map(str, probe['python']))}; "
                            "pipeline_cluster needs 3.10 or newer")
        self.run_dir = f"{runs_dir(probe['workdir'], self.config)}/{self.run_id}/{spec.name}"
        if spec.ship == "never" or (spec.ship == "auto" and built is not None and probe["code"] == built.code):
            if probe["installed"] is None:
                raise self.fail(f"python {spec.python!r} has no pipeline_cluster and ship = \"never\"")
            self.result.ship = "existing"
            return spec.python
        python = f"{probe['venv']}/bin/python"
        assert built is not None  # shipping: the wheel was built above
        if probe["cached"]:
            self.result.ship = "cached"
            return python
        target = f"{probe['workdir']}/wheels/{built.filename}"
        house = f"{probe['workdir']}/wheelhouse" if spec.wheelhouse else ""
        try:
            dependencies = wheelhouse(spec.wheelhouse, tuple(probe["python"][:2]), wheelhouse_cache()) \
                if spec.wheelhouse else []
        except RuntimeError as exc:
            raise self.fail(str(exc)) from None
        try:
            with self.ssh.open_sftp() as sftp:
                sftp.get_channel().settimeout(max(60.0, self.config.start_timeout))  # a stalled host cannot hang us
                _upload(sftp, target, built.data)
                if house:
                    with contextlib.suppress(OSError):
                        sftp.mkdir(house, 0o700)
                    present = {entry.filename: entry.st_size for entry in sftp.listdir_attr(house)}
                    for path in dependencies:  # what the host has from an earlier deploy is not sent again
                        if present.get(path.name) != path.stat().st_size:
                            _upload(sftp, f"{house}/{path.name}", path.read_bytes())
        except (OSError, paramiko.SSHException) as exc:
            raise self.fail(f"cannot upload the wheel(s) to {probe['workdir']} over SFTP: {exc}") from None
        self._hostscript("install", target, probe["venv"], str(spec.install_timeout), house,
                         private=spec.install_env, timeout=spec.install_timeout + INSTALL_MARGIN)
        self.result.ship = "shipped"
        return python

    # -- start and ready -----------------------------------------------------------------------------------------

    def _start(self, python: str, authkey: bytes, idle_timeout: float | None = None) -> int:
        """Start the node with no pty, hand it its secrets on stdin, wait for PCREADY; returns its port. With
        `idle_timeout` the node is detached: a session of its own, no lifeline, and a lease of that many seconds."""
        spec, tunnel = self.spec, self.config.connect == "tunnel"
        listen = "127.0.0.1" if tunnel else spec.listen or spec.host
        node = remote_argv(python, "-m", "pipeline_cluster.cli", "node",
                           "--host", listen, "--port", str(spec.node_port), "--stdin-config",
                           *(["--workers", str(spec.workers)] if spec.workers else []))
        run_dir = remote_argv(self.node_dir)
        detached = "setsid " if idle_timeout is not None else ""  # out of the SSH session's process group
        command = f"umask 077 && mkdir -p {run_dir} && cd {run_dir} && exec {detached}{node} 2>>node.log"
        try:
            self.process = self.ssh.get_transport().open_session(timeout=spec.ssh.connect_timeout)
            self.channel.exec_command(command)
            secrets: dict[str, Any] = {"authkey": authkey.hex(), "run_dir": self.run_dir,
                                       "env": dict(spec.env)}  # never on argv
            if idle_timeout is not None:
                secrets["idle_timeout"] = idle_timeout
            self.channel.sendall(json.dumps(secrets).encode() + b"\n")
        except (paramiko.SSHException, OSError) as exc:
            raise self.fail(f"cannot run the node command: {exc}") from None
        ready = self._ready_line()
        self.result.pid, self.result.port = ready["pid"], ready["port"]
        if idle_timeout is not None:  # detached: no lifeline to keep
            self.channel.close()
            self.process = None
            return ready["port"]
        threading.Thread(target=self._drain, daemon=True, name=f"pipeline-cluster-deploy-{spec.name}").start()
        return ready["port"]

    def _ready_line(self) -> dict[str, Any]:
        """Read stdout until the `PCREADY {json}` line, within the start timeout."""
        deadline = time.monotonic() + self.config.start_timeout
        buffer = b""
        while True:
            line, newline, rest = buffer.partition(b"\n")
            if newline:
                buffer = rest
                if line.startswith(b"PCREADY "):
                    return json.loads(line[len(b"PCREADY "):])
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.phase = "ready"
                self._stop_process(kill=True)
                raise self.fail(f"no PCREADY line within {self.config.start_timeout} s", None, self._log_tail())
            self.channel.settimeout(remaining)
            try:
                chunk = self.channel.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                status = self.channel.recv_exit_status() if self.channel.status_event.wait(5) else None
                early = self.channel.recv_stderr(65536) if self.channel.recv_stderr_ready() else b""
                raise self.fail("the node exited before it was ready", status,
                                early.decode(errors="replace") + self._log_tail())
            buffer += chunk

    def _log_tail(self) -> str:
        """The tail of the node's node.log (its stderr), fetched with a fresh command; empty if that fails."""
        try:
            status, answer, _ = run_hostscript(self.ssh, self.spec.python, "logs",
                                               self.node_dir.rsplit("/", 2)[0], self.spec.name, "40",
                                               self.run_id, timeout=self.spec.ssh.connect_timeout)
        except (TimeoutError, paramiko.SSHException, OSError):
            return ""
        return answer["text"] if status == 0 and answer else ""

    def _drain(self) -> None:
        """Keep reading the node's stdout so its channel window never fills; ends when the node does."""
        try:
            self.channel.settimeout(None)
            while self.channel.recv(65536):
                pass
        except (OSError, EOFError, paramiko.SSHException):
            pass

    # -- handshake -----------------------------------------------------------------------------------------------

    def _handshake(self, port: int, authkey: bytes, root: Any, log_sink: Callable) -> RemoteLink:
        """An authenticated channel to the node, then the RemoteLink's "hello"."""
        spec, timeout = self.spec, self.spec.ssh.connect_timeout
        if self.config.connect == "tunnel":
            address = ("127.0.0.1", port)
        else:
            address = (spec.listen if spec.listen not in (None, "", "0.0.0.0", "::") else spec.host, port)
        try:
            channel = self._open_channel(address, authkey, timeout)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self.fail(f"cannot reach the node at {address[0]}:{port} ({self.config.connect}): "
                            f"{exc or type(exc).__name__}") from None
        try:
            return RemoteLink(address, authkey, root, log_sink, timeout, self.config.heartbeat,
                              self.config.dead_after, channel=channel, name=spec.name)
        except Exception as exc:
            channel.close()
            raise self.fail(f"the node did not answer hello: {exc}") from None

    def _open_channel(self, address: tuple[str, int], authkey: bytes, timeout: float) -> wire.Channel:
        if self.config.connect == "direct":
            return wire.connect(address, authkey, timeout=timeout)
        tunnel = self.ssh.get_transport().open_channel("direct-tcpip", address, ("127.0.0.1", 0), timeout=timeout)
        sock = cast(socket.socket, ChannelSocket(tunnel, address))  # it offers what the handshake and Channel use
        try:
            keys = client_handshake(sock, authkey, timeout=timeout)
        except BaseException:
            sock.close()
            raise
        return wire.Channel(sock, keys=keys)

    # -- stop ----------------------------------------------------------------------------------------------------

    def down(self) -> None:
        """Stop the node within bounded time: stdin EOF, then SIGTERM/SIGKILL by its pidfile; close the connection."""
        try:
            lost = self.link is not None and not self.link.alive and self.link.lost_reason is not None
            self._stop_process(kill=False, grace=1.0 if lost else STOP_GRACE)
        finally:
            if self.client is not None:
                self.client.close()

    def _stop_process(self, kill: bool, grace: float = 0.0) -> None:
        """Close the node's stdin and wait `grace` s for it to exit; then kill it by pidfile if it still runs."""
        process, transport = self.process, self.client.get_transport() if self.client else None
        if process is None or transport is None or not transport.is_active():
            return
        try:
            process.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass
        if not kill and process.status_event.wait(grace):
            return
        try:
            run_hostscript(self.ssh, self.spec.python, "stop", self.node_dir, str(KILL_GRACE),
                           timeout=KILL_GRACE + self.spec.ssh.connect_timeout)
        except (TimeoutError, paramiko.SSHException, OSError) as exc:
            logger.warning("node %s (%s): could not stop it by pidfile: %s", self.spec.name, self.spec.address, exc)


def in_parallel(items: list[T], work: Callable[[T], Any]) -> list[Any]:
    """Run `work` on every item in its own thread; returns results (or the exception raised) in order.

    Plain threads rather than an executor, which refuses work once the interpreter is exiting, when atexit
    closes a forgotten cluster.
    """
    results: list[Any] = [None] * len(items)

    def run(index: int, item: T) -> None:
        try:
            results[index] = work(item)
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=pair, daemon=True, name="pipeline-cluster-deploy")
               for pair in enumerate(items)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


class Deployment:
    """The nodes of one cluster run: `up` starts them all in parallel, `down` stops them all; both are bounded."""

    def __init__(self, config: DeployConfig, run_id: str) -> None:
        self.config = config
        self.run_id = run_id
        self.authkey = secrets.token_bytes(32)  # per run, never on a command line (detached: in its 0600 state file)
        self.connector = Connector()
        self.nodes = [RemoteNode(spec, config, run_id) for spec in config.nodes]
        self._down = False
        self.attached = False  # to nodes started detached: closing leaves them running

    @property
    def results(self) -> list[HostResult]:
        """One result per node, in config order."""
        return [node.result for node in self.nodes]

    def up(self, root: Any, log_sink: Callable) -> list[RemoteLink]:
        """Bring every node up, in parallel; the links of those that came up.

        With fewer than min_nodes (default: all) up, stop them all and raise DeployError; else stop what the failed
        ones started and warn (NodesMissing), one HostError per failure either way.
        """
        try:
            outcomes = in_parallel(self.nodes, lambda node: node.up(self.connector, self.authkey, root, log_sink))
        except BaseException:  # Ctrl-C while hosts come up
            self._abort()
            raise
        failed = self._failures(outcomes)
        needed = self.config.min_nodes or len(self.nodes)
        if len(self.nodes) - len(failed) < needed:
            self._abort()
            raise DeployError(list(failed.values()), len(self.nodes), needed)
        if failed:
            in_parallel(list(failed), RemoteNode.down)
            warnings.warn(NodesMissing(list(failed.values()), len(self.nodes)), stacklevel=3)
        return [node.link for node in self.nodes if node.link is not None]

    def detach(self) -> None:
        """Start every node detached, in parallel, and keep what attaching needs (the key, each node's port) in a
        file only this user may read (`state_file`). Fewer than min_nodes up: stop them all, DeployError."""
        failed = list(self._failures(in_parallel(self.nodes, lambda node: node.detach(self.connector, self.authkey)))
                      .values())
        needed = self.config.min_nodes or len(self.nodes)
        if len(self.nodes) - len(failed) < needed:
            self.connector.close()
            from pipeline_cluster.deploy import hostops  # a stop by pidfile: the nodes have no lifeline
            hostops.stop(self.config)
            raise DeployError(failed, len(self.nodes), needed)
        with changing_state(self.config, new=True) as state:
            state.update(run_id=self.run_id, authkey=self.authkey.hex(), roots={},
                         nodes={node.spec.name: {"port": node.result.port, "pid": node.result.pid, "released": []}
                                for node in self.nodes if node.result.ok})
        self.connector.close()
        if failed:
            warnings.warn(NodesMissing(failed, len(self.nodes)), stacklevel=3)

    def attach(self, root: Any, log_sink: Callable) -> list[RemoteLink]:
        """Connect to the nodes `deploy up --detach` started (from `state_file`), in parallel; the links of those
        that answer. None answering (or no state file): DeployError / FileNotFoundError naming the cause."""
        self.attached = True  # whatever happens here, closing must not stop detached nodes
        with changing_state(self.config) as state:
            state["roots"][str(os.getpid())] = time.time()  # `deploy remove` waits for it to drain a node
        self.run_id, self.authkey = state["run_id"], bytes.fromhex(state["authkey"])
        self.nodes = [RemoteNode(spec, self.config, self.run_id) for spec in self.config.nodes
                      if spec.name in state["nodes"] and not state["nodes"][spec.name].get("leaving")]
        failed = list(self._failures(in_parallel(self.nodes, lambda node: node.attach(
            self.connector, self.authkey, state["nodes"][node.spec.name]["port"], root, log_sink))).values())
        if len(failed) == len(self.nodes):
            self.connector.close()
            raise DeployError(failed, len(self.nodes), 1)
        if failed:
            warnings.warn(NodesMissing(failed, len(self.nodes)), stacklevel=3)
        return [node.link for node in self.nodes if node.link is not None]

    def _failures(self, outcomes: list[Any]) -> dict[RemoteNode, HostError]:
        """The nodes whose phase raised, each with its HostError (also kept in its result)."""
        failed: dict[RemoteNode, HostError] = {}
        for node, outcome in zip(self.nodes, outcomes):
            if isinstance(outcome, BaseException):
                error = outcome if isinstance(outcome, HostError) else node.fail(f"{type(outcome).__name__}: "
                                                                                 f"{outcome}")
                node.result.error = failed[node] = error
        return failed

    def _abort(self) -> None:
        """Close the links made so far and stop every node."""
        for node in self.nodes:
            if node.link is not None:
                node.link.close()
        self.down()

    def down(self) -> None:
        """Stop every node and close every SSH connection; idempotent. Attached to detached nodes, only the
        connections close: the nodes serve on until their lease ends (or `deploy down`)."""
        if self._down:
            return
        self._down = True
        try:
            if not self.attached:
                in_parallel(self.nodes, RemoteNode.down)
            else:
                with contextlib.suppress(FileNotFoundError), changing_state(self.config) as state:
                    state["roots"].pop(str(os.getpid()), None)
        finally:
            self.connector.close()
