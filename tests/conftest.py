"""Shared fixtures: every test gets its own run directory and must leave no child process behind."""
from __future__ import annotations

import os
import time

import psutil
import pytest

from tests.nodeproc import KEY, NodeProcess

pytest_plugins = ["tests.sshd"]  # the ssh_lab fixture: real sshd servers and network namespaces


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll `predicate` until it is truthy or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


def live_children() -> list[psutil.Process]:
    """Descendants of this test process that are still running (zombies excluded)."""
    alive = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


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
