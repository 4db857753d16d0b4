"""`cluster.toml`: the nodes to deploy to and how to reach them, validated as a whole so every bad key is named.

    [cluster]                     # name, connect, heartbeat, dead_after, start_timeout, credit, min_nodes,
                                  # idle_timeout, node defaults
    [ssh]                         # user, port, identity_file, known_hosts, host_key_policy, jump, ssh_config...
    [[node]]                      # name, host, python, workdir, env, workers, ship, install_timeout, install_env,
                                  # wheelhouse,
                                  # listen, node_port + any [ssh] key
    [stages.NAME]                 # workers / supervision overrides, as for any cluster

Relative paths (identity_file, known_hosts, ssh_config) are relative to the file's directory; `~` is expanded
locally. What cluster.toml leaves unset comes from the OpenSSH client config (see sshconfig.py), then defaults.
"""
from __future__ import annotations

import dataclasses
import getpass
import hashlib
import os
import re
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from pipeline_cluster.config import Check, Problems, load_toml, positive_int
from pipeline_cluster.deploy import sshconfig
from pipeline_cluster.deploy.errors import ConfigError

POLICIES = ("strict", "accept-new", "insecure")
CONNECT_MODES = ("tunnel", "direct")
SHIP_MODES = ("auto", "always", "never")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_JUMP = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?P<host>\[[^\]\s]+\]|[^:@\s\[\]]+)(?::(?P<port>\d{1,5}))?$")


@dataclasses.dataclass(frozen=True)
class Jump:
    """One jump host (`user@host:port`); the user defaults to the node's SSH user, the port to 22."""

    host: str
    user: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        return (f"{self.user}@" if self.user else "") + self.host + (f":{self.port}" if self.port else "")


@dataclasses.dataclass(frozen=True)
class SSHSettings:
    """How to open an SSH connection: a node's own keys, then [ssh], then the ssh_config file, then defaults.

    `identity_files` are offered first (an encrypted one through the agent's copy of it); unless
    `identities_only`, the agent's other keys and ~/.ssh/id_* follow.
    """

    user: str = dataclasses.field(default_factory=getpass.getuser)
    port: int = 22
    identity_files: tuple[str, ...] = ()
    identities_only: bool = False
    known_hosts: str = dataclasses.field(default_factory=lambda: os.path.expanduser("~/.ssh/known_hosts"))
    host_key_policy: str = "strict"
    jump: tuple[Jump, ...] = ()
    connect_timeout: float = 10.0
    keepalive: float = 15.0


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """One [[node]]: where it runs, with which python, work dir, environment and worker count."""

    name: str
    host: str
    ssh: SSHSettings
    python: str = "python3"
    workdir: str = "~/.cache/pipeline-cluster"
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    workers: int | None = None
    ship: str = "auto"
    install_timeout: float = 120.0  # for a venv's install on the host, pip included; killed after it
    install_env: Mapping[str, str] = dataclasses.field(default_factory=dict)  # for that install only
    wheelhouse: bool | str = False  # ship the dependencies too: True fetches them here, a path is a directory
    listen: str | None = None
    node_port: int = 0
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)  # setting -> where from

    @property
    def address(self) -> str:
        """`user@host:port`, as errors and reports show it."""
        return f"{self.ssh.user}@{self.host}:{self.ssh.port}"


@dataclasses.dataclass(frozen=True)
class DeployConfig:
    """A whole cluster.toml."""

    source: str
    name: str
    nodes: tuple[NodeSpec, ...]
    path: str | None = None  # the file's absolute path; None for a config given as a dict
    connect: str = "tunnel"
    heartbeat: float = 1.0
    dead_after: float = 10.0
    start_timeout: float = 60.0
    credit: int | None = None  # None: adapt to item size (see actors/root.py)
    min_nodes: int | None = None  # None: every node must come up
    idle_timeout: float = 1800.0  # a detached node (`deploy up --detach`) with no root for this long stops
    stages: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)  # as read
    base: str = "."  # where its relative paths start: the file's directory (for a dict, the working directory)

    def extra_node(self, table: Mapping[str, Any]) -> NodeSpec:
        """One more [[node]] table for a running cluster of this config, checked as if it were in the file (with its
        [ssh] and [cluster] defaults; a name already taken is an error); ConfigError names every problem."""
        tables = list(self.raw.get("node") or []) + [dict(table)]
        return load_config({**self.raw, "node": tables}, base=Path(self.base), label=self.source).nodes[-1]

    @property
    def identity(self) -> str:
        """What tells this cluster's nodes from others' on a host: its name and its file's path, so that two files
        with the same name never share, or stop, each other's nodes."""
        return f"{self.name}-{hashlib.sha256(self.path.encode()).hexdigest()[:8]}" if self.path else self.name

    def node(self, name: str) -> NodeSpec:
        """The node called `name`; KeyError naming the known ones otherwise."""
        for spec in self.nodes:
            if spec.name == name:
                return spec
        raise KeyError(f"no node {name!r} in {self.source}; nodes: {[n.name for n in self.nodes]}")


# -- value checkers (`Check`): each returns a problem text, or None when the value is fine ------------------------


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else f"must be a non-empty string, got {value!r}"


def _name(value: Any) -> str | None:
    if not isinstance(value, str) or not _NAME.match(value):
        return f"must be letters, digits, '.', '_' or '-' (it names directories), got {value!r}"
    return None


def _seconds(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return None if ok else f"must be a positive number of seconds, got {value!r}"


def _port(lowest: int) -> Check:
    def check(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and lowest <= value <= 65535
        return None if ok else f"must be a port number ({lowest}-65535), got {value!r}"
    return check


def _choice(*options: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in options else f"must be one of {', '.join(map(repr, options))}; got {value!r}"
    return check


def _env(value: Any) -> str | None:
    if not isinstance(value, Mapping):
        return f"must be a table of NAME = \"value\", got {value!r}"
    bad = [k for k, v in value.items() if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k) or not isinstance(v, str)]
    return f"has bad entries {bad} (names like PATH, string values)" if bad else None


def _jump(value: Any) -> str | None:
    hops = [value] if isinstance(value, str) else value
    if not isinstance(hops, list) or not all(isinstance(h, str) and _JUMP.match(h) for h in hops):
        return f"must be \"[user@]host[:port]\" or a list of them ([] for none), got {value!r}"
    return None


def _wheelhouse(value: Any) -> str | None:
    if isinstance(value, bool) or (isinstance(value, str) and value):
        return None
    return f"must be true (fetch the dependencies' wheels here) or a directory of wheels, got {value!r}"


_SSH_KEYS: dict[str, Check] = {
    "user": _text, "port": _port(1), "identity_file": _text, "known_hosts": _text,
    "host_key_policy": _choice(*POLICIES), "jump": _jump, "connect_timeout": _seconds, "keepalive": _seconds,
    "ssh_config": _text,
}
_NODE_DEFAULT_KEYS: dict[str, Check] = {
    "python": _text, "workdir": _text, "env": _env, "workers": positive_int, "ship": _choice(*SHIP_MODES),
    "node_port": _port(0), "install_timeout": _seconds, "install_env": _env, "wheelhouse": _wheelhouse,
}
_NODE_KEYS: dict[str, Check] = {"name": _name, "host": _text, "listen": _text, **_NODE_DEFAULT_KEYS, **_SSH_KEYS}
_CLUSTER_KEYS: dict[str, Check] = {
    "name": _name, "connect": _choice(*CONNECT_MODES), "heartbeat": _seconds, "dead_after": _seconds,
    "start_timeout": _seconds, "credit": positive_int, "min_nodes": positive_int, "idle_timeout": _seconds,
    **_NODE_DEFAULT_KEYS,
}
_TABLES = ("cluster", "ssh", "node", "stages")


def _local_path(value: str, base: Path) -> str:
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else base / path)


def _toml_fields(values: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """cluster.toml's SSH keys as SSHSettings fields: an identity_file is the only key offered."""
    fields = {k: v for k, v in values.items() if k not in ("identity_file", "ssh_config")}
    if "identity_file" in values:
        fields["identity_files"] = (_local_path(values["identity_file"], base),)
        fields["identities_only"] = True
    if "known_hosts" in fields:
        fields["known_hosts"] = _local_path(fields["known_hosts"], base)
    if "jump" in fields:
        fields["jump"] = tuple([fields["jump"]] if isinstance(fields["jump"], str) else fields["jump"])
    return fields


def _resolve(host: str, tables: Mapping[str, Mapping[str, Any]], base: Path,
             problems: Problems, where: str) -> tuple[str, SSHSettings, dict[str, str]]:
    """A node's real host name, SSH settings and where each came from: cluster.toml's `tables` ([ssh], then the
    node's own keys, which win), else what the ssh_config file says for `host`, else the defaults."""
    explicit = {key: value for table in tables.values() for key, value in table.items()}
    path = _local_path(explicit.get("ssh_config", sshconfig.DEFAULT_PATH), base)
    hostname, found, bad = sshconfig.lookup(path, host)
    for problem in bad:
        problems.add(where, problem)
    fields: dict[str, Any] = dict(found)
    sources = dict.fromkeys(found, f"ssh_config {path}")
    sources["host"] = f"ssh_config {path} (HostName of {host!r})" if hostname != host else "cluster.toml"
    for table, values in tables.items():
        for field, value in _toml_fields(values, base).items():
            fields[field], sources[field] = value, f"cluster.toml {table}"
    jumps = []
    for text in fields.get("jump", ()):
        match = _JUMP.match(text)
        if match is None:
            problems.add(where, f"{path}: for host {host!r}, proxyjump: {text!r} is not [user@]host[:port]")
            continue
        hop = match["host"].strip("[]")
        hop_name, hop_found, _ = sshconfig.lookup(path, hop)  # a hop may be an alias too
        port = int(match["port"]) if match["port"] else hop_found.get("port")
        jumps.append(Jump(host=hop_name, user=match["user"] or hop_found.get("user"), port=port))
    fields["jump"] = tuple(jumps)
    for field in (f.name for f in dataclasses.fields(SSHSettings)):
        sources.setdefault(field, "default")
    return hostname, SSHSettings(**fields), sources


def load_config(source: str | os.PathLike | Mapping[str, Any], *, base: Path | None = None,
                label: str | None = None) -> DeployConfig:
    """Read and validate a cluster.toml (or an equivalent dict, whose relative paths start at `base`, by default
    the working directory); ConfigError lists every problem at once."""
    label = label or ("<dict>" if isinstance(source, Mapping) else str(source))
    if base is None:
        base = Path.cwd() if isinstance(source, Mapping) else Path(source).resolve().parent
    try:
        raw = load_toml(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(label, [str(exc)]) from None
    problems = Problems()
    problems.top_level(raw, _TABLES, show=lambda table: "[[node]]" if table == "node" else f"[{table}]")
    cluster = problems.table("[cluster]", raw.get("cluster", {}), _CLUSTER_KEYS)
    ssh = problems.table("[ssh]", raw.get("ssh", {}), _SSH_KEYS)
    _check_file("[ssh].identity_file", ssh.get("identity_file"), base, problems)
    _check_file("[ssh].ssh_config", ssh.get("ssh_config"), base, problems)
    stages = problems.stages(raw.get("stages", {}))
    node_defaults = {k: v for k, v in cluster.items() if k in _NODE_DEFAULT_KEYS}
    nodes = _nodes(raw.get("node"), ssh, node_defaults, base, problems)
    tables = raw.get("node")
    count = len(tables) if isinstance(tables, list) else 0
    if cluster.get("min_nodes", 0) > count:
        problems.add("[cluster].min_nodes", f"is {cluster['min_nodes']}, but there are {count} [[node]] table(s)")
    if "heartbeat" in cluster and "dead_after" in cluster and cluster["dead_after"] <= cluster["heartbeat"]:
        problems.add("[cluster].dead_after", f"must be longer than heartbeat ({cluster['heartbeat']} s)")
    default_name = Path(label).stem if not isinstance(source, Mapping) else "cluster"
    name = cluster.get("name", default_name if _NAME.match(default_name) else "cluster")
    if problems.items:
        raise ConfigError(label, problems.items)
    options = {k: v for k, v in cluster.items() if k not in _NODE_DEFAULT_KEYS and k != "name"}
    path = None if isinstance(source, Mapping) else str(Path(source).resolve())
    return DeployConfig(source=label, name=name, nodes=tuple(nodes), path=path, stages=stages, raw=raw,
                        base=str(base), **options)


def _nodes(tables: Any, ssh: Mapping[str, Any], defaults: Mapping[str, Any], base: Path,
           problems: Problems) -> list[NodeSpec]:
    """Every [[node]], with [ssh] and [cluster] defaults applied; names must be unique."""
    if tables is None:
        problems.add("[[node]]", "no nodes: add at least one [[node]] table with a host")
        return []
    if not isinstance(tables, list):
        problems.add("node", "must be an array of tables: write [[node]], not [node]")
        return []
    nodes: list[NodeSpec] = []
    for index, table in enumerate(tables, 1):
        label = (table.get("name") or table.get("host")) if isinstance(table, Mapping) else None
        where = f"[[node]] #{index}" + (f" ({label})" if label else "")
        good = problems.table(where, table, _NODE_KEYS)
        if isinstance(table, Mapping) and "host" not in table:
            problems.add(where, "missing 'host'")
        if "host" not in good:
            continue
        own_ssh = {k: v for k, v in good.items() if k in _SSH_KEYS}
        own = {k: v for k, v in good.items() if k not in _SSH_KEYS and k != "name"}
        name = good.get("name", good["host"])
        if "name" not in good and _name(name):
            problems.add(where, f"needs a 'name': its host {name!r} cannot name a directory")
            continue
        for key in ("identity_file", "ssh_config"):
            _check_file(f"{where}.{key}", own_ssh.get(key), base, problems)
        tables = {"[ssh]": ssh, "[[node]]": own_ssh}
        host, settings, sources = _resolve(own.pop("host"), tables, base, problems, where)
        fields = {**defaults, **own}
        if isinstance(fields.get("wheelhouse"), str):
            fields["wheelhouse"] = _local_path(fields["wheelhouse"], base)
        nodes.append(NodeSpec(name=name, host=host, ssh=settings, sources=sources, **fields))
    names = [node.name for node in nodes]
    for name in sorted({name for name in names if names.count(name) > 1}):
        problems.add(f"[[node]] {name!r}", "duplicate name: give each [[node]] a distinct 'name'")
    return nodes


def _check_file(where: str, value: str | None, base: Path, problems: Problems) -> None:
    """A file named in cluster.toml must exist (checked without connecting anywhere)."""
    if value is not None and not os.path.isfile(_local_path(value, base)):
        problems.add(where, f"no such file: {_local_path(value, base)}")
