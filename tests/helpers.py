"""What tests share besides fixtures: the repo root, one polling wait, one reader of a subprocess's lines (and of
its `PCREADY {json}` line), and node servers as real subprocesses. Fixtures that use these live in conftest.py."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import psutil

REPO = Path(__file__).resolve().parent.parent  # the repository root (setup.cfg, deploy/, tests/)
KEY = "test-shared-key"  # the authkey that node servers started by tests and the roots connecting to them share

NO_HANG = 30.0  # seconds: a bound that only tells "finished" from "hung", far above any normal duration; never a
# speed claim (those are measured in bench/)

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02) -> T:
    """Poll `predicate` until it is truthy or `timeout` s pass; returns its last value (assert on it)."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


@contextmanager
def returns_within(what: str, seconds: float = NO_HANG) -> Iterator[None]:
    """Fail if the block takes `seconds` or longer: for calls whose promise is to return (stop, fail, give up) at
    all rather than hang; the default is generous on purpose."""
    started = time.monotonic()
    yield
    elapsed = time.monotonic() - started
    assert elapsed < seconds, f"{what} took {elapsed:.1f} s (the bound, {seconds} s, only catches a hang)"


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


ZYGOTE = "pipeline_cluster.worker.zygote"  # in the command line of a node's zygote, and of the workers it forks


def is_zygote(proc: psutil.Process) -> bool:
    """Whether `proc` is a node's zygote (the workers it forks share its command line, and have it as parent)."""
    try:
        return ZYGOTE in " ".join(proc.cmdline()) and ZYGOTE not in " ".join(proc.parent().cmdline())
    except psutil.Error:
        return False


def live_workers() -> list[psutil.Process]:
    """The live descendants of this test process other than zygotes (worker processes and node servers)."""
    return [proc for proc in live_children() if not is_zygote(proc)]


def log_tail(proc: subprocess.Popen, log: Path | None = None, limit: int = 3000) -> str:
    """The last `limit` characters of what `proc` logged: the file `log`, else what its stderr pipe holds now."""
    if log is not None:
        try:
            return log.read_text(errors="replace")[-limit:]
        except OSError as exc:
            return f"(cannot read {log}: {exc})"
    if proc.stderr is None:
        return "(stderr not captured)"
    fd, chunks = proc.stderr.fileno(), []
    while select.select([fd], [], [], 0)[0]:  # what is there now, without waiting for a live process
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")[-limit:]


def read_line(proc: subprocess.Popen, timeout: float, log: Path | None = None,
              stream: IO[Any] | None = None) -> str:
    """The next line `proc` writes to its stdout (or `stream`, another pipe of it), without the newline, within
    `timeout` s; fails the test with the process's log tail when none comes (no line in time, or EOF).

    Reads the pipe's file descriptor a byte at a time after select(), so a silent process cannot block the test and
    nothing after the line is taken from the pipe. Use it for every line read from that pipe (a buffered
    readline() on the same pipe could hold bytes back from it).
    """
    stream = stream if stream is not None else proc.stdout
    assert stream is not None, "the process's output is not a pipe"
    fd, deadline, line = stream.fileno(), time.monotonic() + timeout, bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no line from pid {proc.pid} within {timeout} s (got {bytes(line)!r} so far; "
                                 f"exit status {proc.poll()}); its log ends:\n{log_tail(proc, log)}")
        byte = os.read(fd, 1)
        if not byte:
            raise AssertionError(f"pid {proc.pid} closed its output before a full line (got {bytes(line)!r}; exit "
                                 f"status {proc.poll()}); its log ends:\n{log_tail(proc, log)}")
        if byte == b"\n":
            return line.decode()
        line += byte


def read_ready(proc: subprocess.Popen, timeout: float = 30.0, log: Path | None = None) -> dict:
    """The JSON of the `PCREADY {json}` line `proc` prints once it listens (lines before it are skipped), within
    `timeout` s; fails the test with the process's log tail when it does not come."""
    deadline = time.monotonic() + timeout
    skipped: list[str] = []
    while True:
        try:
            line = read_line(proc, max(0.0, deadline - time.monotonic()), log)
        except AssertionError as exc:
            raise AssertionError(f"no PCREADY line (lines before: {skipped}): {exc}") from None
        if line.startswith("PCREADY "):
            return json.loads(line[len("PCREADY "):])
        skipped.append(line)


def run_cli(*args: str, cwd: str | os.PathLike = REPO, env: dict | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """`pipeline-cluster ARGS` in a fresh interpreter, its output captured."""
    return subprocess.run([sys.executable, "-m", "pipeline_cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def start_script(tmp_path: Path, text: str) -> subprocess.Popen:
    """Write `text` to a script in `tmp_path` and start it with a run directory there as its argument, its stdout
    and stderr piped (read them with `read_line`)."""
    script = tmp_path / "script.py"
    script.write_text(text)
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_stage(tmp_path: Path, stage: Any, inputs: Any) -> tuple[list, list, dict]:
    """Run one stage over `inputs` on a LocalCluster: its sorted outputs, its dead letters and its stats."""
    import pipeline_cluster as pc

    with pc.LocalCluster(run_dir=str(tmp_path / "run")) as cluster:
        outputs = sorted(cluster.run([stage], inputs))
        return outputs, cluster.failures(), cluster.stats()[stage.name]


def terminate(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM a process we started, SIGKILL it if it is still there after `grace` seconds, and reap it."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class NodeProcess:
    """A `pipeline-cluster node` subprocess on a loopback address; its address comes from its PCREADY line, its
    stderr goes to a log file."""

    def __init__(self, host: str, tmp_path: Path, workers: int = 2, env: dict | None = None,
                 log_addr: tuple | None = None) -> None:
        self.log = tmp_path / f"node-{host}.log"
        args = [sys.executable, "-m", "pipeline_cluster.cli", "node", "--host", host, "--port", "0",
                "--workers", str(workers)]
        if log_addr:
            args += ["--log-host", log_addr[0], "--log-port", str(log_addr[1])]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True,
                                         env={**os.environ, **(env or {})}, cwd=REPO)
        try:
            ready = read_ready(self.proc, 30, self.log)
        except BaseException:
            terminate(self.proc, 5)
            raise
        self.address = (ready["host"], ready["port"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a SIGSTOPped node must run to handle SIGTERM
            terminate(self.proc, 15)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
