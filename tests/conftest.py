"""Shared fixtures: every test gets its own run directory and must leave no child process behind.

Helpers that are not fixtures (wait_until, live_children, read_ready, NodeProcess, REPO) are in tests/helpers.py.
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.helpers import KEY, NodeProcess, live_children, wait_until

pytest_plugins = ["tests.sshd"]  # the ssh_lab fixture: real sshd servers and network namespaces


def pytest_collection_modifyitems(items):
    """A test that needs sshd must say so (`pytest.mark.ssh`), so that `pytest -m "not ssh"` runs without it."""
    unmarked = [item.nodeid for item in items
                if "ssh_lab" in getattr(item, "fixturenames", ()) and item.get_closest_marker("ssh") is None]
    if unmarked:
        raise pytest.UsageError(f"tests using ssh_lab without pytest.mark.ssh: {unmarked}")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Run directories and key files go under the test's tmp dir, never the real home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    yield


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Fail a test that leaves any of its child processes running."""
    before = {p.pid for p in live_children()}
    yield
    leftover = wait_until(lambda: [p for p in live_children() if p.pid not in before] == [], timeout=10)
    if not leftover:
        stray = [p for p in live_children() if p.pid not in before]
        for proc in stray:
            proc.kill()
        pytest.fail(f"processes left behind: {[(p.pid, p.cmdline()[:3]) for p in stray]}")


@pytest.fixture
def nodes(tmp_path, monkeypatch):
    """Start node servers with `nodes(host, **options)`; all are stopped after the test."""
    monkeypatch.setenv("PIPELINE_CLUSTER_AUTHKEY", KEY)
    started: list[NodeProcess] = []

    def start(host: str, **kwargs) -> NodeProcess:
        node = NodeProcess(host, tmp_path, **kwargs)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


@pytest.fixture
def full_disk(tmp_path) -> Iterator[str]:
    """A 1 MB tmpfs: a run directory there fills up within the run."""
    if os.geteuid() != 0:
        pytest.fail("the full-disk test needs root to mount a tmpfs (CI runs as root)")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield str(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
