"""The log server: an authenticated TCP service writing every record it receives as one line of a file."""
from __future__ import annotations

import os
import threading

from pipeline_cluster.logs.records import Record
from pipeline_cluster.transport import wire
from pipeline_cluster.transport.auth import resolve_authkey


class LogServer:
    """An authenticated log server writing every record it receives as one line of `filename`."""

    def __init__(self, addr: tuple[str, int], filename: str, authkey: bytes | str | None = None) -> None:
        self.listener = wire.Listener((addr[0], int(addr[1])), resolve_authkey(authkey))
        self.address = self.listener.address
        fd = os.open(filename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # log lines may hold items: owner only
        self.file = open(fd, "a", buffering=1, encoding="utf-8")
        self.lock = threading.Lock()

    def serve_forever(self) -> None:
        """Accept senders until `stop()`; each gets a reader thread."""
        while True:
            try:
                channel = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(channel,), daemon=True).start()

    def _read(self, channel: wire.Channel) -> None:
        try:
            while True:
                try:
                    record = channel.recv()
                except wire.UnpicklingFailed:  # one record we cannot read: the stream is still in step
                    continue
                if isinstance(record, Record):
                    with self.lock:
                        self.file.write(record.format() + "\n")
        except (EOFError, OSError, ValueError):
            channel.close()

    def stop(self) -> None:
        """Stop accepting and close the file."""
        self.listener.close()
        with self.lock:
            self.file.close()


def serve(addr: tuple[str, int], filename: str, conn_buffer_size: int | None = None, detach: bool = False,
          authkey: bytes | str | None = None) -> LogServer:
    """Run a log server on `addr` writing to `filename` (the older project's call); `detach=True` serves in a
    thread. `conn_buffer_size` is accepted for old scripts and means nothing here (connections need no buffer)."""
    server = LogServer(addr, filename, authkey)
    if detach:
        threading.Thread(target=server.serve_forever, daemon=True, name="pipeline-cluster-log-server").start()
    else:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            server.stop()
    return server
