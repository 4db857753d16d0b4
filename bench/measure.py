"""Measuring: run a trial in a fresh process, sample its whole process tree's RSS, summarise rounds, write JSON.

Peak RSS is the largest sum of resident set sizes over the trial process and all its descendants (workers, node
servers and their workers), sampled with psutil from a background thread of the harness: every FIRST_SAMPLE
seconds at first, the gap growing by SAMPLE_GROWTH up to SAMPLE_SECONDS, so a trial of a few tens of milliseconds
is still seen while a long one costs the harness little CPU. Listing the tree means reading every process on the
machine (about 2 ms here, a burst that would show in W4's p99), so after the trial's first STARTUP_SECONDS (when
its workers start) the tree is listed again only every TREE_SECONDS and whenever a process of it has ended; the
samples between read the known processes' RSS alone.
Shared pages count once per process, as `ps` shows.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import psutil

from .runners import REPO
from .trial import RESULT_PREFIX

FIRST_SAMPLE = 0.005
SAMPLE_GROWTH = 1.2
SAMPLE_SECONDS = 0.1
TREE_SECONDS = 0.5
STARTUP_SECONDS = 2.0
TRIAL_TIMEOUT = 1800.0  # seconds; past it the trial's whole process tree is killed and the trial fails
MB = 1e6


class TreeSampler:
    """A background thread that records the peak summed RSS of a process and all its descendants."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak = 0
        self._tree: list[psutil.Process] = []
        self._listed = float("-inf")  # when the tree was last listed (time.monotonic)
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss-sampler", daemon=True)

    def start(self) -> None:
        """Begin sampling."""
        self._thread.start()

    def stop(self) -> int:
        """Stop sampling; returns the peak in bytes."""
        self._stop.set()
        self._thread.join()
        return self.peak

    def sample(self) -> int:
        """The current summed RSS of the tree in bytes (processes that vanish mid-sample count as 0)."""
        now = time.monotonic()
        if now - self._started < STARTUP_SECONDS or now - self._listed >= TREE_SECONDS:
            try:
                self._tree = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                return 0
            self._listed = now
        total = 0
        for proc in self._tree:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                self._listed = float("-inf")  # one has ended: list the tree afresh next time
        return total

    def _run(self) -> None:
        gap = FIRST_SAMPLE
        while True:
            self.peak = max(self.peak, self.sample())
            if self._stop.wait(gap):
                return
            gap = min(SAMPLE_SECONDS, gap * SAMPLE_GROWTH)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a trial process and every descendant it started (by pid), then reap the trial."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    for child in family:
        try:
            child.kill()
        except psutil.Error:
            pass
    proc.kill()
    proc.communicate()


def run_trial(spec: dict[str, Any], env: dict[str, str], timeout: float = TRIAL_TIMEOUT) -> dict[str, Any]:
    """Run `python -m bench.trial SPEC` from the repo root; return its result with `peak_rss_mb` added.

    A trial that fails or times out raises RuntimeError with the end of its stderr.
    """
    steal_before = psutil.cpu_times()
    proc = subprocess.Popen([sys.executable, "-m", f"{__package__}.trial", json.dumps(spec)], cwd=REPO, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:  # timeout or Ctrl-C: leave no process of the trial behind
        kill_tree(proc)
        if isinstance(exc, subprocess.TimeoutExpired):
            raise RuntimeError(f"trial {spec} timed out after {timeout} s") from None
        raise
    finally:
        peak = sampler.stop()
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"trial {spec} failed with exit code {proc.returncode}:\n{err[-3000:]}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["peak_rss_mb"] = peak / MB
    result["steal_pct"] = steal_share(steal_before, psutil.cpu_times())
    return result


def steal_share(before: Any, after: Any) -> float:
    """Percent of the machine's CPU time the hypervisor gave to other guests between two `psutil.cpu_times()`
    (a virtual machine's noisy neighbours: on this one it swings from 1% to 20% and moves W4's tail with it)."""
    total = sum(after) - sum(before)
    return 100.0 * (getattr(after, "steal", 0.0) - getattr(before, "steal", 0.0)) / total if total > 0 else 0.0


def medians(results: list[dict[str, Any]]) -> dict[str, float]:
    """The median of each numeric field over rounds."""
    keys = [k for k, v in results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: statistics.median(r[k] for r in results) for k in keys}


def machine_facts() -> dict[str, Any]:
    """What the figures depend on: CPUs, Python, OS, load, memory, date, source version."""
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "source": source_version(),
    }


def source_version() -> str:
    """The repo's commit as `git describe --always --dirty` (others may be editing the tree), or "unknown"."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(path: str, document: dict[str, Any]) -> None:
    """Write the run's document (machine, arguments, summary rows, every trial) as indented JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2)
        f.write("\n")
