"""WorkerProcess: the node's handle on one worker process (started, watched, killed, reaped).

The process is a fresh interpreter running `pipeline_cluster.worker.main` (like multiprocessing's spawn, without
re-importing the user's `__main__`). It inherits the node's environment, CPUs and scheduling unchanged; it runs in a
session of its own, so a Ctrl-C at the terminal reaches the node, which stops it cleanly, and not the task code.
"""
from __future__ import annotations

import mmap
import os
import signal
import socket
import subprocess
import sys

from pipeline_cluster.placement import Placement
from pipeline_cluster.transport import wire
from pipeline_cluster.worker import main as worker_main

# `python -c` puts the current directory first on sys.path; the package's own root takes its place, so a source
# checkout there cannot shadow the package the node runs (the worker then takes the node's own sys.path).
LAUNCH = ("import sys; sys.path[0] = sys.argv[1]; from pipeline_cluster.worker.main import main; "
          "sys.exit(main(sys.argv[2:]))")
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(worker_main.__file__))))


class WorkerProcess:
    """A started worker process with its socket and progress record; `kill()` is safe from any thread."""

    def __init__(self, placement: Placement) -> None:
        parent_sock, child_sock = socket.socketpair()
        self.progress_fd = os.memfd_create("pipeline-cluster-progress")
        os.ftruncate(self.progress_fd, worker_main.PROGRESS_SIZE)
        self.progress = mmap.mmap(self.progress_fd, worker_main.PROGRESS_SIZE)
        worker_main.PROGRESS.pack_into(self.progress, 0, -1, 0.0)
        try:
            with placement.spawning():
                self.popen = subprocess.Popen(
                    [sys.executable, "-c", LAUNCH, PACKAGE_ROOT, str(child_sock.fileno()), str(self.progress_fd)],
                    pass_fds=(child_sock.fileno(), self.progress_fd), stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
        finally:
            child_sock.close()
        self.pid = self.popen.pid
        self.conn = wire.Channel(parent_sock, max_frame=worker_main.MAX_FRAME)

    def running_item(self) -> tuple[int, float]:
        """(index in batch, start time) of the item being run now; index -1 when idle."""
        index, started = worker_main.PROGRESS.unpack_from(self.progress, 0)
        return index, started

    def kill(self) -> None:
        """SIGKILL the process if it still runs."""
        if self.popen.poll() is None:
            try:
                self.popen.kill()
            except ProcessLookupError:
                pass

    def reap(self, timeout: float = 5.0) -> int:
        """Wait for the exit (killing after `timeout`) and return its returncode."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.popen.wait()

    def release(self) -> None:
        """Close the socket and the progress record."""
        self.conn.close()
        self.progress.close()
        os.close(self.progress_fd)


def describe_exit(returncode: int | None) -> tuple[int | None, str | None]:
    """(exit code, signal name) of a finished process."""
    if returncode is not None and returncode < 0:
        try:
            return None, signal.Signals(-returncode).name
        except ValueError:
            return None, f"signal {-returncode}"
    return returncode, None
