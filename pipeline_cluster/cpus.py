"""How many CPUs this process may really use: its CPU affinity capped by any cgroup CPU quota (v2 or v1), since a
container limited to 1 CPU still sees all the host's CPUs. Nothing is cached; an unreadable file means no limit.
"""
from __future__ import annotations

import math
import os
import re

_V1_CONTROLLER = "cpu"


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` ("QUOTA PERIOD" in microseconds), or None for "max" or unparsable."""
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """CPUs allowed by cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`, or None for -1 (no limit) or unparsable."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_proc_cgroup(text: str) -> tuple[str | None, dict[str, str]]:
    """This process's cgroup v2 path ("0::PATH" line, None if absent) and its v1 paths by controller, from
    /proc/self/cgroup."""
    unified: str | None = None
    v1: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            unified = path
        else:
            for controller in controllers.split(","):
                if controller:
                    v1[controller] = path
    return unified, v1


def _unescape(field: str) -> str:
    """A mountinfo path with its octal escapes (`\\040` for a space, ...) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def parse_mountinfo(text: str) -> tuple[tuple[str, str] | None, dict[str, tuple[str, str]]]:
    """(root, mount point) of the first cgroup2 mount (None if none) and of each v1 controller's first mount, from
    /proc/self/mountinfo; root is the cgroup the mount shows at its mount point."""
    unified: tuple[str, str] | None = None
    v1: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 1:
            continue
        root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        if tail[0] == "cgroup2":
            if unified is None:
                unified = (root, mount_point)
        elif tail[0] == "cgroup" and len(tail) >= 3:
            for option in tail[2].split(","):
                v1.setdefault(option, (root, mount_point))
    return unified, v1


def _cgroup_dirs(cgroup_path: str, mount_root: str, mount_point: str) -> list[str]:
    """Directories of a cgroup and of each of its ancestors visible under the mount point, innermost first.

    A cgroup path outside the mount's root (as seen from another cgroup namespace) is taken to be the mount root."""
    root = mount_root.rstrip("/")
    path = cgroup_path.rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root):]
    elif root:
        path = ""
    parts = [part for part in path.split("/") if part]
    if ".." in parts:
        parts = []
    return [os.path.join(mount_point, *parts[:depth]) for depth in range(len(parts), -1, -1)]


def _read(path: str) -> str | None:
    """A small file's text, or None if it cannot be read."""
    try:
        with open(path) as f:
            return f.read()
    except (OSError, ValueError):
        return None


def _tightest(values: list[float | None]) -> float | None:
    """The smallest of the limits that are set, or None if none is."""
    limits = [value for value in values if value is not None]
    return min(limits) if limits else None


def _quota_cpus(proc_self: str = "/proc/self", fs_root: str = "/") -> float | None:
    """The tightest cgroup CPU quota on this process and its ancestors, in CPUs, or None without one.

    `proc_self` stands for /proc/self and `fs_root` is put before every mount point, so tests can use a fake tree."""
    cgroup_text = _read(os.path.join(proc_self, "cgroup"))
    mountinfo_text = _read(os.path.join(proc_self, "mountinfo"))
    if cgroup_text is None or mountinfo_text is None:
        return None
    v2_path, v1_paths = parse_proc_cgroup(cgroup_text)
    v2_mount, v1_mounts = parse_mountinfo(mountinfo_text)
    limits: list[float | None] = []
    if v2_path is not None and v2_mount is not None:
        mount_point = os.path.join(fs_root, v2_mount[1].lstrip("/"))
        for directory in _cgroup_dirs(v2_path, v2_mount[0], mount_point):
            text = _read(os.path.join(directory, "cpu.max"))
            limits.append(parse_cpu_max(text) if text is not None else None)
    if _V1_CONTROLLER in v1_paths and _V1_CONTROLLER in v1_mounts:
        mount_root, mount_point = v1_mounts[_V1_CONTROLLER]
        mount_point = os.path.join(fs_root, mount_point.lstrip("/"))
        for directory in _cgroup_dirs(v1_paths[_V1_CONTROLLER], mount_root, mount_point):
            quota = _read(os.path.join(directory, "cpu.cfs_quota_us"))
            period = _read(os.path.join(directory, "cpu.cfs_period_us"))
            limits.append(parse_cfs(quota, period) if quota is not None and period is not None else None)
    return _tightest(limits)


def affinity_cpus() -> int:
    """CPUs this process may be scheduled on: its affinity mask where the OS has one, else the machine's CPU count."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:
            pass
    return os.cpu_count() or 1


def cpus_from(affinity: int, quota: float | None) -> int:
    """CPUs usable given an affinity count and a cgroup quota in CPUs (None: no quota), quota rounded up, at least 1."""
    if quota is None:
        return max(1, affinity)
    return max(1, min(affinity, math.ceil(quota)))


def usable_cpus() -> int:
    """CPUs this process may really use: the affinity count capped by the cgroup CPU quota rounded up, at least 1."""
    return cpus_from(affinity_cpus(), _quota_cpus())
