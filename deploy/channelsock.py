"""A paramiko Channel with the socket methods that `wire.Channel` and `auth.client_handshake` call.

A paramiko Channel has `sendall`, `recv(n)`, `settimeout`, `gettimeout`, `shutdown` and `close`, but no `sendmsg`,
no `recv_into`, no `recv` flags and no `family`; and its `send` returns 0 instead of raising once EOF was sent
(so its own `sendall` would spin). `ChannelSocket` fills those gaps for the tunnel mode.
"""
from __future__ import annotations

import socket
from typing import Any
from collections.abc import Iterable

import paramiko


class ChannelSocket:
    """The socket-like face of a direct-tcpip channel to a node (no TCP options apply to it)."""

    family = socket.AF_UNSPEC  # not AF_INET: wire.Channel then sets no TCP_NODELAY on it

    def __init__(self, channel: paramiko.Channel, peer: tuple[str, int]) -> None:
        self._channel = channel
        self._peer = peer

    def getpeername(self) -> tuple[str, int]:
        """The node's address as seen from its own host (the tunnel's far end)."""
        return self._peer

    def settimeout(self, timeout: float | None) -> None:
        """Timeout of later sends and receives, like socket.settimeout."""
        self._channel.settimeout(timeout)

    def gettimeout(self) -> float | None:
        """The current timeout."""
        return self._channel.gettimeout()

    def sendall(self, data: Any) -> None:
        """Send every byte, or raise OSError if the channel closed meanwhile."""
        view = memoryview(data).cast("B")
        while view.nbytes:
            sent = self._channel.send(view)
            if not sent:
                raise OSError(f"tunnel to {self._peer[0]}:{self._peer[1]} closed")
            view = view[sent:]

    def sendmsg(self, buffers: Iterable[Any]) -> int:
        """Send several buffers in order (socket.sendmsg without ancillary data); returns the bytes sent."""
        total = 0
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            self.sendall(view)
            total += view.nbytes
        return total

    def recv(self, size: int, flags: int = 0) -> bytes:
        """Receive up to `size` bytes (all of them with MSG_WAITALL, unless the channel ends first)."""
        data = self._channel.recv(size)
        if not flags & socket.MSG_WAITALL or len(data) in (0, size):
            return data
        parts = [data]
        got = len(data)
        while got < size:
            chunk = self._channel.recv(size - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def recv_into(self, view: memoryview, nbytes: int = 0, flags: int = 0) -> int:
        """Receive into `view`, like socket.recv_into; returns the number of bytes written."""
        data = self.recv(nbytes or len(view), flags)
        view[:len(data)] = data
        return len(data)

    def shutdown(self, how: int) -> None:
        """Stop reading and/or writing (sends EOF when writing stops)."""
        self._channel.shutdown(how)

    def close(self) -> None:
        """Close the channel; a recv blocked in another thread returns EOF."""
        self._channel.close()

    def fileno(self) -> int:
        """A descriptor for select/poll (paramiko makes a pipe for it)."""
        return self._channel.fileno()
