"""SSH plumbing for deployments: connecting (through jump hosts) with errors named by phase, running commands.

A jump host is reached first and the target through a `direct-tcpip` channel of the jump's transport, given to
paramiko as `sock=` (what `ssh -J` does); every hop is host-key checked like the target. Commands run with no pty,
their stdout and stderr drained concurrently, and every wait is bounded.
"""
from __future__ import annotations

import codecs
import json
import math
import shlex
import threading
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable, Mapping

import paramiko
from paramiko.auth_strategy import AuthFailure

from pipeline_cluster.deploy.config import Jump, NodeSpec, SSHSettings
from pipeline_cluster.deploy.errors import HostError
from pipeline_cluster.deploy.hostkeys import UnknownHostKey, host_key_name, new_client
from pipeline_cluster.deploy.sshkeys import KeyStrategy

HOSTSCRIPT = (Path(__file__).parent / "hostscript.py").read_bytes()
# reads exactly the hostscript from stdin and runs it; the rest of stdin is the command's private input
LOADER = f"import sys; exec(compile(sys.stdin.buffer.read({len(HOSTSCRIPT)}), 'hostscript.py', 'exec'))"
STDERR_TAIL_LINES = 40


def tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    """The last `lines` lines of `text`."""
    return "\n".join(text.rstrip().splitlines()[-lines:])


class Connector:
    """Opens SSH connections to nodes, sharing one connection per jump host; `close` ends them all.

    Nodes connect concurrently, each within its connect timeout; the nodes behind one jump host wait for its single
    attempt, and share its failure rather than each trying again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jump_locks: dict[tuple, threading.Lock] = {}
        self._jumps: dict[tuple, paramiko.SSHClient | HostError] = {}
        self._clients: list[paramiko.SSHClient] = []

    def open(self, node: NodeSpec) -> paramiko.SSHClient:
        """A connected, authenticated client for `node`; HostError (connect, host key or auth) otherwise."""
        settings = node.ssh
        sock = self._via(node, settings.jump, node.host, settings.port)
        client = _connect(node, node.host, settings.port, settings.user, settings, sock)
        with self._lock:
            self._clients.append(client)
        return client

    def _via(self, node: NodeSpec, chain: tuple[Jump, ...], host: str, port: int) -> paramiko.Channel | None:
        """A channel to host:port through the last hop of `chain`; None without jump hosts."""
        if not chain:
            return None
        return self._tunnel(node, self._jump(node, chain), host, port)

    def _jump(self, node: NodeSpec, chain: tuple[Jump, ...]) -> paramiko.SSHClient:
        """The connection to the last hop of `chain`, opened once and shared by every node behind it."""
        settings, hop = node.ssh, chain[-1]
        key = (chain, settings.identity_files, settings.known_hosts, settings.host_key_policy)
        with self._lock:
            lock = self._jump_locks.setdefault(key, threading.Lock())
        with lock:
            known = self._jumps.get(key)
            if isinstance(known, HostError):
                raise HostError(node.name, node.address, known.phase, known.detail)
            if known is not None and known.get_transport() is not None and known.get_transport().is_active():
                return known
            port = hop.port or 22
            try:
                sock = self._via(node, chain[:-1], hop.host, port)
                client = _connect(node, hop.host, port, hop.user or settings.user, settings, sock,
                                  via=f"jump host {hop}")
            except HostError as exc:
                self._remember(key, exc)
                raise
            self._remember(key, client)
            return client

    def _remember(self, key: tuple, outcome: paramiko.SSHClient | HostError) -> None:
        with self._lock:
            self._jumps[key] = outcome

    def _tunnel(self, node: NodeSpec, jump: paramiko.SSHClient, host: str, port: int) -> paramiko.Channel:
        """A direct-tcpip channel from the jump host to host:port, to carry the next SSH connection."""
        try:
            return jump.get_transport().open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0),
                                                     timeout=node.ssh.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise HostError(node.name, node.address, "connect",
                            f"the jump host could not reach {host}:{port}: {exc or type(exc).__name__}") from None

    def close(self) -> None:
        """Close every connection, targets first, then jump hosts."""
        with self._lock:
            clients, self._clients = self._clients, []
            jumps, self._jumps = [c for c in self._jumps.values() if isinstance(c, paramiko.SSHClient)], {}
        for client in clients + jumps[::-1]:
            client.close()


def _connect(node: NodeSpec, host: str, port: int, user: str, settings: SSHSettings, sock: Any,
             via: str = "") -> paramiko.SSHClient:
    """Connect and authenticate one hop, turning each failure into a HostError naming its phase: "connect" for
    TCP and SSH transport failures only, "auth" (with the keys tried) when no key was accepted."""
    where = f"{via} {user}@{host}:{port}: " if via else ""
    client = new_client(settings)
    keys = KeyStrategy(settings, user)
    timeout = settings.connect_timeout
    try:
        client.connect(host, port, username=user, timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                       channel_timeout=timeout, sock=sock, auth_strategy=keys)
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise HostError(node.name, node.address, "host key",
                        f"{where}host key of {host_key_name(host, port)} CHANGED: {settings.known_hosts} has "
                        f"{exc.expected_key.get_name()} {exc.expected_key.fingerprint}, the server sent "
                        f"{exc.key.get_name()} {exc.key.fingerprint}; refusing (someone may be impersonating it). "
                        f"If the host was really re-keyed, remove its old line from {settings.known_hosts}") from None
    except UnknownHostKey as exc:
        client.close()
        raise HostError(node.name, node.address, "host key", f"{where}{exc}") from None
    except AuthFailure as exc:
        client.close()
        raise HostError(node.name, node.address, "auth",
                        f"{where}authentication as {user!r} failed: {keys.describe(exc)}") from None
    except (paramiko.SSHException, OSError, EOFError) as exc:
        client.close()
        raise HostError(node.name, node.address, "connect",
                        f"{where}cannot connect to {host}:{port}: {exc or type(exc).__name__}") from None
    client.get_transport().set_keepalive(math.ceil(settings.keepalive))  # 0 (ServerAliveInterval 0): off
    return client


def remote_argv(*args: str) -> str:
    """A shell command line from arguments, quoted, with a leading `~/` left for the remote shell to expand."""
    return " ".join('"$HOME"/' + shlex.quote(a[2:]) if a.startswith("~/") else shlex.quote(a) for a in args)


def run_command(client: paramiko.SSHClient, command: str, stdin: bytes, timeout: float) -> tuple[int, str, str]:
    """Run `command` (no pty), feed it `stdin` then EOF; returns (exit status, stdout, stderr) within `timeout` s."""
    deadline = time.monotonic() + timeout
    channel = client.get_transport().open_session(timeout=timeout)
    try:
        channel.settimeout(timeout)
        channel.exec_command(command)
        stderr: list[bytes] = []
        drain = threading.Thread(target=lambda: stderr.append(channel.makefile_stderr("rb").read()), daemon=True)
        drain.start()
        try:
            channel.sendall(stdin)
            channel.shutdown_write()
        except OSError:
            pass  # the command ended without reading its stdin (e.g. not found): its status and stderr tell why
        stdout = channel.makefile("rb").read()
        drain.join(max(0.0, deadline - time.monotonic()))
        if not channel.status_event.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"{command!r} did not finish within {timeout} s")
        return channel.recv_exit_status(), stdout.decode(errors="replace"), b"".join(stderr).decode(errors="replace")
    except TimeoutError:
        raise TimeoutError(f"{command!r} did not finish within {timeout} s") from None
    finally:
        channel.close()


def run_hostscript(client: paramiko.SSHClient, python: str, *args: str, timeout: float,
                   private: Mapping[str, str] | None = None) -> tuple[int, Any, str]:
    """Run a hostscript command with the host's `python`, `private` (JSON) on its stdin rather than its command
    line; returns (exit status, its JSON answer or None, stderr)."""
    stdin = HOSTSCRIPT + (json.dumps(dict(private)).encode() + b"\n" if private else b"")
    status, out, err = run_command(client, remote_argv(python, "-c", LOADER, *args), stdin, timeout)
    try:
        answer = json.loads(out.strip().splitlines()[-1]) if status == 0 and out.strip() else None
    except ValueError:
        answer = None
    return status, answer, err


def stream_hostscript(client: paramiko.SSHClient, python: str, *args: str, timeout: float,
                      output: Callable[[str], None], stop: threading.Event) -> tuple[int, Any, str]:
    """Run a hostscript command that writes text as it goes, handing it to `output`, until `stop` is set (answer
    True) or the command ends by itself (answer None, with its exit status and stderr). Its stdin stays open while
    it runs: closing the channel ends it on the host."""
    channel = client.get_transport().open_session(timeout=timeout)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        channel.exec_command(remote_argv(python, "-c", LOADER, *args))
        channel.sendall(HOSTSCRIPT)
        channel.settimeout(0.2)
        while not stop.is_set():
            try:
                chunk = channel.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                status = channel.recv_exit_status() if channel.status_event.wait(timeout) else -1
                err = channel.recv_stderr(65536) if channel.recv_stderr_ready() else b""
                return status, None, err.decode(errors="replace")
            output(decoder.decode(chunk))
        return 0, True, ""
    finally:
        channel.close()
