"""Node servers as real subprocesses for tests: started on a loopback address, address read from PCREADY."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

KEY = "test-shared-key"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NodeProcess:
    """A `pipeline-cluster node` subprocess; its address comes from the PCREADY line, its log goes to a file."""

    def __init__(self, host: str, tmp_path, workers: int = 2, env: dict | None = None, log_addr: tuple | None = None):
        self.log = tmp_path / f"node-{host}.log"
        args = [sys.executable, "-m", "pipeline_cluster.cli", "node", "--host", host, "--port", "0",
                "--workers", str(workers)]
        if log_addr:
            args += ["--log-host", log_addr[0], "--log-port", str(log_addr[1])]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True,
                                         env={**os.environ, **(env or {})}, cwd=REPO)
        line = self.proc.stdout.readline()
        assert line.startswith("PCREADY "), (line, self.log.read_text())
        ready = json.loads(line.split(" ", 1)[1])
        self.address = (ready["host"], ready["port"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a SIGSTOPped node must run to handle SIGTERM
            terminate(self.proc, 15)


def terminate(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM a process we started, SIGKILL it if it is still there after `grace` seconds, and reap it."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
