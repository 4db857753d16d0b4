"""OpenSSH's client config (`~/.ssh/config`, or `[ssh].ssh_config`), read by paramiko's SSHConfig.

A node's `host` may be a `Host` alias or match a pattern, as with `ssh HOST`: HostName, User, Port, IdentityFile,
IdentitiesOnly, ProxyJump, ConnectTimeout, ServerAliveInterval and UserKnownHostsFile fill in what cluster.toml
leaves unset (cluster.toml's own values win).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import paramiko

DEFAULT_PATH = "~/.ssh/config"


def _port(value: str) -> int:
    port = int(value)
    if not 1 <= port <= 65535:
        raise ValueError(f"{value!r} is not a port number")
    return port


def _seconds(value: str) -> float:
    seconds = float(value)
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    return seconds


def _yes_no(value: str) -> bool:
    if value.lower() not in ("yes", "no"):
        raise ValueError(f"{value!r} is not yes or no")
    return value.lower() == "yes"


def _hops(value: str) -> tuple[str, ...]:
    return () if value.lower() == "none" else tuple(hop.strip() for hop in value.split(","))


# ssh_config keyword (lower case, as paramiko returns it) -> the SSHSettings field it sets, and how to read it
KEYWORDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "user": ("user", str),
    "port": ("port", _port),
    "identityfile": ("identity_files", lambda paths: tuple(os.path.expanduser(p) for p in paths)),
    "identitiesonly": ("identities_only", _yes_no),
    "proxyjump": ("jump", _hops),
    "connecttimeout": ("connect_timeout", _seconds),
    "serveraliveinterval": ("keepalive", _seconds),
    "userknownhostsfile": ("known_hosts", lambda paths: os.path.expanduser(paths.split()[0])),
}


def lookup(path: str, host: str) -> tuple[str, dict[str, Any], list[str]]:
    """What the file at `path` says for `host`: (HostName, {SSHSettings field: value}, problems).

    A missing file says nothing (the caller checks an explicitly configured path exists).
    """
    if not os.path.isfile(path):
        return host, {}, []
    try:
        options = paramiko.SSHConfig.from_path(path).lookup(host)
    except (paramiko.ConfigParseError, OSError, ValueError) as exc:
        return host, {}, [f"cannot read {path}: {exc}"]
    fields: dict[str, Any] = {}
    problems = []
    for keyword, (field, read) in KEYWORDS.items():
        if keyword in options:
            try:
                fields[field] = read(options[keyword])
            except ValueError as exc:
                problems.append(f"{path}: for host {host!r}, {keyword}: {exc}")
    return options["hostname"], fields, problems
