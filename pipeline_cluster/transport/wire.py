"""Authenticated, framed TCP message channels between cluster processes.

`connect` and `Listener.accept` hand out a `Channel` only after the handshake of `pipeline_cluster.transport.auth`
succeeded, so nothing is ever unpickled from an unauthenticated peer.

Wire format after the handshake: frames of an 8-byte big-endian header, whose top byte is the frame kind and whose
low 56 bits are the payload length, followed by the payload. A message is either one BYTES frame (raw bytes), or
zero or more BUFFER or RBUFFER frames (pickle protocol 5 out-of-band buffers, sent without copying them; an RBUFFER
holds a read-only one and is received as `bytes`, so a big `bytes` item wrapped by `out_of_band` arrives as itself
with one copy from the kernel) followed by one PICKLE frame.
"""

from __future__ import annotations

import logging
import pickle
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import cloudpickle

from pipeline_cluster.transport.auth import client_handshake, server_handshake

__all__ = ["DEFAULT_MAX_FRAME", "Channel", "FrameTooLargeError", "Listener", "Packed", "UnpicklingFailed", "connect",
           "out_of_band", "pack"]

DEFAULT_MAX_FRAME = 1 << 30  # 1 GiB

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!Q")
_KIND_SHIFT = 56
_LENGTH_MASK = (1 << _KIND_SHIFT) - 1
_BYTES, _PICKLE, _BUFFER, _RBUFFER = 1, 2, 3, 4

_OUT_OF_BAND_MIN = 64 * 1024  # smaller pickle buffers stay in-band: one frame is cheaper than a copy
_MAIN = b"__main__"  # in a pickle from the C pickler: a reference the peer cannot resolve (see pack)
_CONCAT_MAX = 64 * 1024  # header and payload up to this size are joined into one send call
_IOV_MAX = 512  # buffers per sendmsg call, well under the usual IOV_MAX of 1024


class FrameTooLargeError(ConnectionError):
    """An incoming frame announced more than `max_frame` bytes; the channel is closed rather than allocating it."""


class UnpicklingFailed(Exception):
    """A whole message arrived but could not be unpickled (whatever the unpickler raised, an OSError included);
    the channel is still in step and usable. Not an OSError, so it is never taken for a broken connection."""


class Packed:
    """A message pickled for sending: the pickle and its out-of-band buffers (the objects' own memory, no copies)."""

    def __init__(self, payload: bytes, buffers: list[memoryview]) -> None:
        self.payload = payload
        self.buffers = buffers
        self.nbytes = len(payload) + sum(buffer.nbytes for buffer in buffers)


def pack(obj: Any) -> Packed:
    """Pickle `obj` with protocol 5, as cloudpickle would (lambdas, closures and `__main__` code by value); big pickle
    buffers stay out-of-band. Raises whatever pickling raises, before anything is sent.

    The C pickler goes first: it is several times quicker on small messages. Its result is kept only when it holds no
    `__main__` reference (which the peer, another program, could not resolve); anything it cannot pickle or that
    names `__main__` is pickled again by cloudpickle, which carries such code by value.
    """
    try:
        packed = _pack_with(pickle.dumps, obj)
        if _MAIN not in packed.payload:
            return packed
    except Exception:
        pass
    return _pack_with(cloudpickle.dumps, obj)


def _pack_with(dumps: Callable[..., bytes], obj: Any) -> Packed:
    buffers: list[memoryview] = []

    def keep_out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: let pickle copy it in-band
            return True
        if raw.nbytes < _OUT_OF_BAND_MIN:
            return True
        buffers.append(raw)
        return False

    return Packed(dumps(obj, protocol=5, buffer_callback=keep_out_of_band), buffers)


def out_of_band(items: list) -> list:
    """`items` with each big `bytes` item wrapped so that it travels out-of-band (pickle never offers `bytes`
    itself to a buffer callback); the receiver gets the very `bytes` object it read from the socket. Only a list
    whose first item is big `bytes` is looked through: other lists come back as they are, at no per-item cost."""
    if not items or type(items[0]) is not bytes or len(items[0]) < _OUT_OF_BAND_MIN:
        return items
    return [pickle.PickleBuffer(item) if type(item) is bytes and len(item) >= _OUT_OF_BAND_MIN else item
            for item in items]


class Channel:
    """A framed, bidirectional message channel over an authenticated socket.

    Get one from `connect` or `Listener.accept`: wrapping a socket that did not pass the handshake would unpickle
    unauthenticated bytes. The one exception is a socket whose peer is trusted by construction: the socket pair
    between a node and a worker process it started. `send` may be called from several threads at once; `recv` is
    meant for one reader thread.
    The socket has no user-space read buffer, so `select` on `fileno()` tells truthfully whether `recv` has data to
    read. `peer` is the remote address.
    """

    def __init__(self, sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        sock.settimeout(None)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self.max_frame = max_frame
        try:
            self.peer: Any = sock.getpeername()
        except OSError:
            self.peer = None  # already disconnected; recv will report EOF
        self._send_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Channel peer={self.peer!r} {state}>"

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether `close` has been called (a peer hang-up shows as EOFError from `recv`, not here)."""
        return self._closed

    def fileno(self) -> int:
        """Return the socket's file descriptor, for select/poll."""
        return self._sock.fileno()

    def send(self, obj: Any) -> None:
        """Send one object, pickled by cloudpickle with protocol 5 (lambdas, closures and __main__ code by value).

        Big pickle buffers go out-of-band without copies. A `bytes` or `memoryview` object is sent as a raw frame,
        also without copies, and `recv` returns it as `bytes`.
        """
        if type(obj) is bytes or type(obj) is memoryview:
            self.send_bytes(obj)
            return
        if type(obj) is bytearray:
            obj = pickle.PickleBuffer(obj)  # lets a big bytearray go out-of-band; it unpickles as a bytearray
        self.send_packed(pack(obj))

    def send_packed(self, message: Packed) -> None:
        """Send a message made by `pack` (for a sender that pickles first, e.g. to measure or check it)."""
        payload, buffers = message.payload, message.buffers
        self._check_size(len(payload))
        for buffer in buffers:
            self._check_size(buffer.nbytes)
        if not buffers and len(payload) <= _CONCAT_MAX:
            self._send_frame(_HEADER.pack(_PICKLE << _KIND_SHIFT | len(payload)) + payload)
            return
        pieces: list[bytes | memoryview] = []
        for buffer in buffers:
            kind = _RBUFFER if buffer.readonly else _BUFFER
            pieces += (_HEADER.pack(kind << _KIND_SHIFT | buffer.nbytes), buffer)
        pieces += (_HEADER.pack(_PICKLE << _KIND_SHIFT | len(payload)), payload)
        self._send_pieces(pieces)

    def send_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Send one raw frame holding `data` (any contiguous bytes-like object), without copying it."""
        view = memoryview(data).cast("B")
        self._check_size(view.nbytes)
        header = _HEADER.pack(_BYTES << _KIND_SHIFT | view.nbytes)
        if view.nbytes <= _CONCAT_MAX:
            self._send_frame(header + view)
        else:
            self._send_pieces([header, view])

    def recv(self) -> Any:
        """Receive the next message: the unpickled object, or `bytes` for a raw frame.

        Raises EOFError when the peer has closed the connection (or this channel was closed), FrameTooLargeError on a
        frame over `max_frame`. UnpicklingFailed (the channel stays usable) when the message cannot be unpickled.
        """
        buffers: list[bytearray | bytes] = []
        while True:
            kind, length = self._recv_header()
            if kind == _BUFFER:
                buffer = bytearray(length)
                self._recv_into(memoryview(buffer))
                buffers.append(buffer)
            elif kind == _RBUFFER:  # read-only: a bytes object, which the unpickled message then holds as is
                buffers.append(self._recv_exact(length))
            elif kind == _PICKLE:
                payload = self._recv_exact(length)
                try:
                    return pickle.loads(payload, buffers=buffers)
                except Exception as exc:
                    raise UnpicklingFailed(f"{type(exc).__name__}: {exc}") from exc
            elif buffers:
                self._broken(f"raw frame inside a pickled message from {self.peer}")
            else:
                return self._recv_exact(length)

    def recv_bytes(self) -> bytes:
        """Receive the next raw frame sent by `send_bytes` (or `send` of bytes); TypeError if it was a pickle."""
        kind, length = self._recv_header()
        if kind == _BYTES:
            return self._recv_exact(length)
        while kind in (_BUFFER, _RBUFFER):  # skip the whole pickled message so that the stream stays in step
            self._recv_exact(length)
            kind, length = self._recv_header()
        if kind != _PICKLE:
            self._broken(f"raw frame inside a pickled message from {self.peer}")
        self._recv_exact(length)
        raise TypeError("recv_bytes() got a pickled message (sent with send() of a non-bytes object); use recv()")

    def close(self) -> None:
        """Close the connection; idempotent. A `recv` blocked in another thread then raises EOFError."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes threads blocked in recv or send on this socket
        except OSError:
            pass  # not connected any more: nothing to wake
        self._sock.close()

    def _check_size(self, size: int) -> None:
        if size > self.max_frame:
            raise ValueError(f"message part of {size} bytes exceeds max_frame of {self.max_frame} bytes")

    def _send_frame(self, frame: bytes) -> None:
        """Write one small, already joined frame under the send lock."""
        if self._closed:
            raise OSError("channel closed")
        with self._send_lock:
            try:
                self._sock.sendall(frame)
            except BaseException:
                self.close()  # a partly written frame would desynchronise the stream for good
                raise

    def _send_pieces(self, pieces: Iterable[bytes | memoryview]) -> None:
        """Write all pieces as one unit under the send lock, with vectored writes and no concatenation."""
        if self._closed:
            raise OSError("channel closed")
        views = [memoryview(piece) for piece in pieces]
        with self._send_lock:
            try:
                while views:
                    sent = self._sock.sendmsg(views[:_IOV_MAX])
                    while sent:
                        if sent >= views[0].nbytes:
                            sent -= views.pop(0).nbytes
                        else:
                            views[0] = views[0][sent:]
                            sent = 0
            except BaseException:
                self.close()  # a partly written message would desynchronise the stream for good
                raise

    def _recv_header(self) -> tuple[int, int]:
        """Read the next frame header, returning (kind, length) after checking both."""
        header = self._recv_exact(_HEADER.size)
        (value,) = _HEADER.unpack(header)
        kind, length = value >> _KIND_SHIFT, value & _LENGTH_MASK
        if kind not in (_BYTES, _PICKLE, _BUFFER, _RBUFFER):
            self._broken(f"corrupt frame header {header.hex()} from {self.peer}")
        if length > self.max_frame:
            self.close()
            raise FrameTooLargeError(f"frame of {length} bytes from {self.peer} exceeds max_frame of "
                                     f"{self.max_frame} bytes; channel closed")
        return kind, length

    def _broken(self, what: str) -> NoReturn:
        self.close()
        raise ConnectionError(f"{what}; channel closed")

    def _recv_exact(self, size: int) -> bytes:
        """Read exactly `size` bytes; MSG_WAITALL usually gets them in one call straight into the result."""
        if size == 0:
            return b""
        data = self._recv(size)
        if len(data) == size:
            return data
        parts = [data]
        got = len(data)
        while got < size:
            chunk = self._recv(size - got)
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def _eof(self, error: OSError | None = None) -> EOFError:
        """The EOFError a reader gets: we closed, the peer closed (`error` None), or the connection broke."""
        if self._closed:
            return EOFError("channel closed")
        if error is None:
            return EOFError(f"peer {self.peer} closed the connection")
        return EOFError(f"connection to {self.peer} lost: {error}")

    def _recv(self, size: int) -> bytes:
        try:
            data = self._sock.recv(size, socket.MSG_WAITALL)
        except OSError as e:
            raise self._eof(e) from None
        if not data:
            raise self._eof()
        return data

    def _recv_into(self, view: memoryview) -> None:
        while view.nbytes:
            try:
                got = self._sock.recv_into(view, view.nbytes, socket.MSG_WAITALL)
            except OSError as e:
                raise self._eof(e) from None
            if not got:
                raise self._eof()
            view = view[got:]


def connect(address: tuple[str, int], authkey: bytes, timeout: float = 10.0, *,
            max_frame: int = DEFAULT_MAX_FRAME) -> Channel:
    """Open an authenticated Channel to a Listener at `address`; `timeout` bounds TCP connect and handshake together.

    Raises AuthenticationError (or ProtocolVersionError) if the handshake fails, OSError if the connection does.
    """
    deadline = time.monotonic() + timeout
    sock = socket.create_connection(address, timeout=timeout)
    try:
        client_handshake(sock, authkey, timeout=max(deadline - time.monotonic(), 0.001))
        return Channel(sock, max_frame=max_frame)
    except BaseException:
        sock.close()
        raise


class Listener:
    """A TCP server socket handing out authenticated Channels, one handshake thread per incoming connection.

    Handshakes run concurrently in short-lived threads, so a slow or silent client never delays the others; a failed
    handshake is logged (WARNING, logger ``pipeline_cluster.transport.wire``) with the peer address and reason, and
    dropped.
    """

    def __init__(self, address: tuple[str, int], authkey: bytes, handshake_timeout: float = 5.0,
                 backlog: int = 128, *, max_handshakes: int = 64, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if not isinstance(authkey, bytes) or not authkey:
            raise ValueError("authkey must be non-empty bytes (see pipeline_cluster.transport.auth.resolve_authkey)")
        self._authkey = authkey
        self.handshake_timeout = handshake_timeout
        self.max_handshakes = max_handshakes
        self.max_frame = max_frame
        host, port = address
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
            self._sock.listen(backlog)
        except BaseException:
            self._sock.close()
            raise
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._handshaking: set[socket.socket] = set()
        self._ready: queue.SimpleQueue[Channel | None] = queue.SimpleQueue()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name=f"pipeline_cluster listener {self.address[0]}:{self.address[1]}")
        self._acceptor.start()

    def __repr__(self) -> str:
        state = "closed" if self._closed.is_set() else "listening"
        return f"<Listener {self.address[0]}:{self.address[1]} {state}>"

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def accept(self, timeout: float | None = None) -> Channel:
        """Return the next authenticated Channel, waiting up to `timeout` s (None: forever).

        Raises TimeoutError when the time is up, and OSError("listener closed") once `close` has been called, also in
        a thread already waiting here.
        """
        if self._closed.is_set():
            raise OSError("listener closed")
        try:
            channel = self._ready.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no authenticated connection within {timeout} s") from None
        if channel is None:
            self._ready.put(None)  # pass the wake-up on to any other waiting thread
            raise OSError("listener closed")
        return channel

    def close(self) -> None:
        """Stop listening, abort handshakes in progress, close channels not yet accepted; idempotent."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            handshaking = list(self._handshaking)
        for sock in (self._sock, *handshaking):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the acceptor in accept() and handshakes in recv()
            except OSError:
                pass  # never connected, or its handshake thread closed it already
        self._sock.close()
        while True:
            try:
                channel = self._ready.get_nowait()
            except queue.Empty:
                break
            if channel is not None:
                channel.close()
        self._ready.put(None)
        if threading.current_thread() is not self._acceptor:
            self._acceptor.join(timeout=5.0)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = self._sock.accept()
            except OSError as e:
                if not self._closed.is_set():
                    log.warning("accept on %s:%s failed: %s", *self.address, e)
                    self._closed.wait(0.1)  # e.g. out of file descriptors: do not spin
                continue
            with self._lock:
                closed = self._closed.is_set()
                full = len(self._handshaking) >= self.max_handshakes
                if not (closed or full):
                    self._handshaking.add(conn)
            if closed or full:
                conn.close()
                if not closed:
                    log.warning("refused connection from %s: %d handshakes already in progress",
                                _format_address(peer), self.max_handshakes)
                continue
            threading.Thread(target=self._handshake, args=(conn, peer), daemon=True,
                             name=f"pipeline_cluster handshake {_format_address(peer)}").start()

    def _handshake(self, conn: socket.socket, peer: Any) -> None:
        channel = None
        try:
            server_handshake(conn, self._authkey, timeout=self.handshake_timeout)
            channel = Channel(conn, max_frame=self.max_frame)
        except Exception as e:
            if not self._closed.is_set():
                log.warning("refused connection from %s: %s", _format_address(peer), e)
        with self._lock:
            self._handshaking.discard(conn)
            if channel is not None and not self._closed.is_set():
                self._ready.put(channel)
                return
        conn.close()


def _format_address(address: Any) -> str:
    """Render a socket address as host:port for log lines."""
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
