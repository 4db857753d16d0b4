"""Real OpenSSH servers for deploy tests: sshd on 127.0.0.N with generated keys, and network namespaces as hosts.

Needs root, Debian's openssh-server (/usr/sbin/sshd) and ssh-keygen; namespaces also need `ip` and CAP_NET_ADMIN
(tests that use them are skipped, with the reason, where namespaces cannot be created).
Everything started here is stopped by pid (sshd) or deleted by name (the namespaces and veths this run created).
"""
from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import terminate, wait_until

SSHD = "/usr/sbin/sshd"


def tagger(delay: float = 0.0):
    """A stage defined in a function, so cloudpickle ships it by value to nodes that cannot import the tests:
    item -> (item, $NODE_TAG), after `delay` s."""
    def tag(x):
        if delay:
            time.sleep(delay)
        return (x, os.environ.get("NODE_TAG"))
    return tag


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def require_sshd() -> None:
    """Fail clearly unless OpenSSH's server and ssh-keygen are installed and this runs as root (as in CI)."""
    if not os.path.exists(SSHD) or not shutil.which("ssh-keygen"):
        pytest.fail("the deploy tests need a real sshd: apt-get install -y openssh-server (.ci/run does)")
    if os.geteuid() != 0:
        pytest.fail("the deploy tests run sshd for other users' logins, which needs root (as CI runs)")


def keygen(path: Path, passphrase: str = "") -> Path:
    """An ed25519 key pair at `path` / `path`.pub, without passphrase unless given one."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", "pipeline-cluster-test", "-f",
                    str(path)], check=True)
    return path


class SshAgent:
    """A real ssh-agent on a socket of its own (`sock`); `add` loads a key, typing its passphrase; stop() by pid."""

    def __init__(self, directory: Path) -> None:
        self.sock = directory / "agent.sock"
        self.directory = directory
        self.proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(self.sock)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        if not wait_until(self.sock.exists, 10):
            self.stop()
            raise RuntimeError("ssh-agent did not create its socket")

    def add(self, key: Path, passphrase: str) -> None:
        """`ssh-add KEY`, its passphrase given by an SSH_ASKPASS script (no terminal needed)."""
        askpass = self.directory / "askpass.sh"
        askpass.write_text(f"#!/bin/sh\necho '{passphrase}'\n")
        askpass.chmod(0o700)
        env = {**os.environ, "SSH_AUTH_SOCK": str(self.sock), "SSH_ASKPASS": str(askpass),
               "SSH_ASKPASS_REQUIRE": "force"}
        subprocess.run(["ssh-add", "-q", str(key)], env=env, check=True, stdin=subprocess.DEVNULL, timeout=30)

    def stop(self) -> None:
        """Stop the agent, by pid."""
        terminate(self.proc, 10)


def free_port(address: str) -> int:
    """A port that was free on `address` a moment ago."""
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class Sshd:
    """One sshd on address:port (inside namespace `netns` if given), accepting `user_keys`; stop() kills it by pid."""

    def __init__(self, directory: Path, address: str, user_keys: list[Path], port: int | None = None,
                 netns: str | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.address = address
        self.netns = netns
        self.host_key = keygen(directory / "host_key")
        authorized = directory / "authorized_keys"
        authorized.write_text("".join(Path(f"{k}.pub").read_text() for k in user_keys))
        os.makedirs("/run/sshd", exist_ok=True)
        self.log = directory / "sshd.log"
        self.proc: subprocess.Popen | None = None
        for _ in range(3):  # a port picked by free_port can be taken before sshd binds it
            self.port = port or free_port(address)
            if self._start(authorized):
                return
        raise RuntimeError(f"sshd did not start on {address}:\n{self.log.read_text()}")

    def _start(self, authorized: Path) -> bool:
        config = self.directory / "sshd_config"
        config.write_text(f"""\
ListenAddress {self.address}:{self.port}
HostKey {self.host_key}
PidFile none
AuthorizedKeysFile {authorized}
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding yes
MaxStartups 100
MaxSessions 100
Subsystem sftp internal-sftp
""")
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(prefix + [SSHD, "-D", "-e", "-f", str(config)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        proc = self.proc

        def listening_or_exited() -> str | None:
            if "Server listening on" in self.log.read_text():
                return "listening"
            return "exited" if proc.poll() is not None else None

        if wait_until(listening_or_exited, 10) == "listening":
            return True
        self.stop()  # still silent after 10 s (a no-op when it exited: its port was taken)
        return False

    def known_hosts_line(self, key: Path | None = None) -> str:
        """This server's known_hosts line (or one claiming `key` as its host key)."""
        kind, blob = Path(f"{key or self.host_key}.pub").read_text().split()[:2]
        name = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        return f"{name} {kind} {blob}\n"

    def sessions(self) -> list[int]:
        """Pids of the processes this sshd runs for clients (sessions and what they started)."""
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True) if alive(p.pid)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """Stop sshd and every session it still runs, by pid."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            sessions = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            sessions = []
        terminate(self.proc, 10)
        for proc in sessions:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(sessions, timeout=10)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class NetLab:
    """Network namespaces as hosts: each has lo up and a veth to the root namespace (or to another namespace).

    Every address lies in one 10.X.0.0/16 that gets a blackhole route in the root namespace, so that a link set
    down (a partition) or an address only reachable through a jump host drops packets here instead of sending
    them out through the default route.
    """

    _instances = 0

    def __init__(self) -> None:
        NetLab._instances += 1  # names are unique per lab: the kernel frees a deleted namespace's veths lazily
        self.tag = f"pc{os.getpid() % 10000}n{NetLab._instances % 100}"
        self.namespaces: list[str] = []
        self.root_links: list[str] = []
        self.root_side: dict[str, str] = {}  # host label -> the root namespace's address on its veth
        self.block = self._free_block()
        _ip("route", "add", "blackhole", str(self.block))
        self._subnets = self.block.subnets(new_prefix=24)

    @staticmethod
    def available() -> str | None:
        """None if namespaces can be made here, else why not."""
        if os.geteuid() != 0 or not shutil.which("ip"):
            return "network namespaces need root and iproute2"
        name = f"pcprobe{os.getpid() % 100000}"
        made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if made.returncode != 0:
            return f"cannot create a network namespace: {made.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        return None

    @staticmethod
    def _free_block() -> ipaddress.IPv4Network:
        """A 10.X.0.0/16 that no address or route here uses yet (another test run may hold one)."""
        used = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
        used += subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
        rng = random.Random()
        while True:
            block = ipaddress.ip_network(f"10.{rng.randrange(100, 250)}.0.0/16")
            if f"10.{block.network_address.packed[1]}." not in used:
                return block

    def host(self, label: str, to_root: bool = True) -> str | None:
        """A new namespace `label`, linked to the root namespace unless not `to_root`; returns that link's address."""
        ns = f"{self.tag}{label}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        if not to_root:
            return None
        self.root_side[label], address = self._veth(None, ns, f"{self.tag}{label}r")
        return address

    def link(self, a: str, b: str) -> tuple[str, str]:
        """A veth between namespaces `a` and `b` (labels); returns (address in a, address in b)."""
        return self._veth(f"{self.tag}{a}", f"{self.tag}{b}", f"{self.tag}{a}{b}")

    def _veth(self, left: str | None, right: str, name: str) -> tuple[str, str]:
        net = next(self._subnets)
        hosts = list(net.hosts())
        left_ip, right_ip = str(hosts[0]), str(hosts[1])
        _ip("link", "add", name, "type", "veth", "peer", "name", name + "p")
        if left is None:
            self.root_links.append(name)
        else:
            _ip("link", "set", name, "netns", left)
        _ip("link", "set", name + "p", "netns", right)
        for ns, dev, ip in ((left, name, left_ip), (right, name + "p", right_ip)):
            where = ["-n", ns] if ns else []
            _ip(*where, "addr", "add", f"{ip}/24", "dev", dev)
            _ip(*where, "link", "set", dev, "up")
        return left_ip, right_ip

    def namespace(self, label: str) -> str:
        """The namespace name of host `label`."""
        return f"{self.tag}{label}"

    def set_link(self, label: str, up: bool) -> None:
        """Bring the root-side end of host `label`'s veth up or down (down = a partition: no FIN, no RST)."""
        _ip("link", "set", f"{self.tag}{label}r", "up" if up else "down")

    def blackhole(self, label: str) -> None:
        """Host `label` silently drops what it would send back to the root namespace: a connect from here gets no
        answer at all (no RST, no ICMP) and runs into its timeout, as with a host that is down or firewalled."""
        _ip("-n", self.namespace(label), "route", "add", "blackhole", f"{self.root_side[label]}/32")

    def close(self) -> None:
        """Delete the veths to the root namespace, the namespaces (and their veths) and the blackhole route."""
        for link in self.root_links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()
        subprocess.run(["ip", "route", "del", "blackhole", str(self.block)], capture_output=True)


def toml_value(value) -> str:
    """A Python value as TOML (strings, numbers, booleans, lists, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"


def toml_table(header: str, values: dict) -> str:
    """One `[header]` (or `[[header]]`) table."""
    return header + "\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()) + "\n"


class SshLab:
    """sshd servers sharing one user key and one known_hosts file, and cluster.toml files that use them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.user_key = keygen(tmp / "id_user")
        self.known_hosts = tmp / "known_hosts"
        self.known_hosts.touch()
        self.ssh_config = tmp / "ssh_config"  # never the real ~/.ssh/config
        self.ssh_config.touch()
        self.servers: list[Sshd] = []

    def sshd(self, address: str, netns: str | None = None, port: int | None = None, trust: bool = True,
             keys: tuple[Path, ...] = ()) -> Sshd:
        """Start an sshd accepting the lab's user key (and `keys`); `trust` puts its host key into known_hosts."""
        server = Sshd(self.tmp / f"sshd-{len(self.servers)}", address, [self.user_key, *keys], port, netns)
        self.servers.append(server)
        if trust:
            with open(self.known_hosts, "a") as f:
                f.write(server.known_hosts_line())
        return server

    def node(self, server: Sshd, name: str, **options) -> dict:
        """A [[node]] table for `server`: this interpreter as its python, its own work dir, NODE_TAG = name."""
        return {"name": name, "host": server.address, "port": server.port, "python": sys.executable,
                "workdir": str(self.tmp / f"work-{name}"), "env": {"NODE_TAG": name}, **options}

    def config(self, nodes: list[dict], ssh: dict | None = None, stages: dict | None = None, **cluster) -> Path:
        """Write a cluster.toml for `nodes` (and `[stages.NAME]` tables); short heartbeats so that losses show fast."""
        cluster = {"name": "test", "heartbeat": 0.3, "dead_after": 3.0, "start_timeout": 30.0, "workers": 2,
                   **cluster}
        ssh = {"user": "root", "identity_file": str(self.user_key), "known_hosts": str(self.known_hosts),
               "connect_timeout": 5.0, "ssh_config": str(self.ssh_config), **(ssh or {})}
        ssh = {key: value for key, value in ssh.items() if value is not None}  # None: leave it to ssh_config
        path = self.tmp / f"cluster-{len(list(self.tmp.glob('cluster-*.toml')))}.toml"
        path.write_text(toml_table("[cluster]", cluster) + toml_table("[ssh]", ssh)
                        + "".join(toml_table("[[node]]", node) for node in nodes)
                        + "".join(toml_table(f"[stages.{name}]", table) for name, table in (stages or {}).items()))
        return path

    def sessions(self) -> list[int]:
        """Pids of what any lab sshd still runs for clients (deployed nodes, their workers, shells)."""
        return [p for server in self.servers for p in server.sessions()]

    def close(self) -> None:
        """Stop every sshd (and anything still running under it)."""
        for server in self.servers:
            server.stop()


@pytest.fixture
def ssh_lab(tmp_path):
    """An SshLab (fails without sshd); every server stopped after the test."""
    require_sshd()
    lab = SshLab(tmp_path)
    yield lab
    lab.close()
