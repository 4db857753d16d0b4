"""Authenticated, framed TCP message channels between cluster processes.

`connect` and `Listener.accept` hand out a `Channel` only after the handshake of `pipeline_cluster.transport.auth`
succeeded, so nothing is ever unpickled from an unauthenticated peer; and such a channel authenticates every frame
with the connection's session keys, so nothing is unpickled that the peer did not send in that order either.

Wire format after the handshake: frames of an 8-byte big-endian header, whose top byte is the frame kind and whose
low 56 bits are the payload length, followed by the payload. A message is either one BYTES frame (raw bytes), or
zero or more BUFFER or RBUFFER frames (pickle protocol 5 out-of-band buffers, sent without copying them; an RBUFFER
holds a read-only one and is received as `bytes`, so a big `bytes` item wrapped by `out_of_band` arrives as itself
with one copy from the kernel) followed by one PICKLE frame.

On a keyed channel every frame carries a 16-byte tag right after its header: GMAC under the direction's session
key, with the frame's kind and number as the nonce and its payload as the authenticated data, the number being a
per-direction frame counter that both sides keep (it is never sent). A frame that fails its tag (altered,
injected, replayed, reordered or reflected) closes the channel with IntegrityError, before any frame of its message
is unpickled.

This is integrity, not secrecy: frames are not encrypted, and anyone on the path can read them. Encryption is the
job of `connect = "tunnel"` (the SSH tunnel); use it on networks you do not trust.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import pickle
import queue
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, NoReturn

import cloudpickle

from pipeline_cluster.transport.auth import SessionKeys, client_handshake, server_handshake

__all__ = ["DEFAULT_MAX_FRAME", "Channel", "FrameTooLargeError", "IntegrityError", "Listener", "Packed",
           "UnpicklingFailed", "connect", "out_of_band", "pack"]

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
TAG_SIZE = 16  # bytes of the GMAC tag that follows the header of every frame of a keyed channel
_NONCE = struct.Struct("!BxxxQ")  # a frame's kind and number: never the same twice under one session key


class _FrameMac:
    """GMAC (AES-GCM with nothing to encrypt) of frames under one session key. The frame's kind and number form
    the nonce and its payload is the authenticated data, whose length GCM covers too, so a tag binds the whole
    header, the payload and the frame's place in the stream. With AES instructions it costs a few percent of
    HMAC-SHA256 per byte (both are in the cryptography package's OpenSSL), so big payloads keep their speed."""

    __slots__ = ("_gcm",)

    def __init__(self, key: bytes) -> None:
        # imported here: worker processes, whose channel to their node has no keys, never load OpenSSL's bindings
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._gcm = AESGCM(hashlib.sha256(key).digest())

    def tag(self, sequence: int, kind: int, payload: bytes | memoryview) -> bytes:
        """The tag of frame number `sequence` of `kind` holding `payload`."""
        return self._gcm.encrypt(_NONCE.pack(kind, sequence), b"", payload)


class FrameTooLargeError(ConnectionError):
    """An incoming frame announced more than `max_frame` bytes; the channel is closed rather than allocating it."""


class IntegrityError(ConnectionError):
    """A frame on a keyed channel failed its check (altered, injected, replayed, reordered or reflected on the way);
    the channel is closed and nothing of that message was unpickled. The message names the peer."""


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

    Get one from `connect` or `Listener.accept`, which pass the handshake's session `keys`: then every frame is
    authenticated (see the module docstring). `keys=None` sends and checks no tags at all, so only use it for a
    socket whose peer is trusted by construction: the socket pair between a node and a worker process it started.
    Wrapping any other socket without keys would unpickle whatever anyone sends or injects.
    `send` may be called from several threads at once; `recv` is meant for one reader thread.
    The socket has no user-space read buffer, so `select` on `fileno()` tells truthfully whether `recv` has data to
    read. `peer` is the remote address.
    """

    def __init__(self, sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME, *,
                 keys: SessionKeys | None = None) -> None:
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
        # None: no tags (a trusted socket pair)
        self._send_mac = None if keys is None else _FrameMac(keys.send)
        self._recv_mac = None if keys is None else _FrameMac(keys.recv)
        self._send_sequence = 0  # frames sent so far: guarded by _send_lock
        self._recv_sequence = 0  # frames received so far: only the reader thread touches it

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        keyed = " keyed" if self.keyed else ""
        return f"<Channel peer={self.peer!r}{keyed} {state}>"

    @property
    def keyed(self) -> bool:
        """Whether frames carry and are checked against session-key tags (False only for trusted socket pairs)."""
        return self._recv_mac is not None

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
            self._send_frame(_HEADER.pack(_PICKLE << _KIND_SHIFT | len(payload)), payload)
            return
        frames: list[tuple[bytes, bytes | memoryview]] = []
        for buffer in buffers:
            kind = _RBUFFER if buffer.readonly else _BUFFER
            frames.append((_HEADER.pack(kind << _KIND_SHIFT | buffer.nbytes), buffer))
        frames.append((_HEADER.pack(_PICKLE << _KIND_SHIFT | len(payload)), payload))
        self._send_frames(frames)

    def send_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Send one raw frame holding `data` (any contiguous bytes-like object), without copying it."""
        view = memoryview(data).cast("B")
        self._check_size(view.nbytes)
        header = _HEADER.pack(_BYTES << _KIND_SHIFT | view.nbytes)
        if view.nbytes <= _CONCAT_MAX:
            self._send_frame(header, view)
        else:
            self._send_frames([(header, view)])

    def recv(self) -> Any:
        """Receive the next message: the unpickled object, or `bytes` for a raw frame.

        Raises EOFError when the peer has closed the connection (or this channel was closed), FrameTooLargeError on a
        frame over `max_frame`, IntegrityError (channel closed) on a frame that fails its tag. UnpicklingFailed (the
        channel stays usable) when the message cannot be unpickled.
        """
        buffers: list[bytearray | bytes] = []
        while True:
            kind, length, tag = self._recv_header()
            if kind == _BUFFER:
                buffer = bytearray(length)
                self._recv_buffer(kind, memoryview(buffer), tag)
                buffers.append(buffer)
            elif kind == _RBUFFER:  # read-only: a bytes object, which the unpickled message then holds as is
                buffers.append(self._recv_payload(kind, length, tag))
            elif kind == _PICKLE:
                payload = self._recv_payload(kind, length, tag)  # every frame of the message is checked by now
                try:
                    return pickle.loads(payload, buffers=buffers)
                except Exception as exc:
                    raise UnpicklingFailed(f"{type(exc).__name__}: {exc}") from exc
            elif buffers:
                self._broken(f"raw frame inside a pickled message from {self.peer}")
            else:
                return self._recv_payload(kind, length, tag)

    def recv_bytes(self) -> bytes:
        """Receive the next raw frame sent by `send_bytes` (or `send` of bytes); TypeError if it was a pickle."""
        kind, length, tag = self._recv_header()
        if kind == _BYTES:
            return self._recv_payload(kind, length, tag)
        while kind in (_BUFFER, _RBUFFER):  # skip the whole pickled message so that the stream stays in step
            self._recv_payload(kind, length, tag)
            kind, length, tag = self._recv_header()
        if kind != _PICKLE:
            self._broken(f"raw frame inside a pickled message from {self.peer}")
        self._recv_payload(kind, length, tag)
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

    def _send_frame(self, header: bytes, payload: bytes | memoryview) -> None:
        """Write one small frame (header, tag on a keyed channel, payload), joined into one send, under the send
        lock."""
        if self._closed:
            raise OSError("channel closed")
        with self._send_lock:
            try:
                if self._send_mac is not None:
                    header += self._send_mac.tag(self._send_sequence, header[0], payload)
                    self._send_sequence += 1
                self._sock.sendall(header + payload)
            except BaseException:
                self.close()  # a partly written frame would desynchronise the stream for good
                raise

    def _send_frames(self, frames: list[tuple[bytes, bytes | memoryview]]) -> None:
        """Write (header, payload) frames, each with its tag, as one unit under the send lock, with vectored writes
        and no concatenation."""
        if self._closed:
            raise OSError("channel closed")
        with self._send_lock:
            try:
                if self._send_mac is None:
                    self._write([memoryview(piece) for frame in frames for piece in frame])
                else:
                    self._write_tagged(frames)
            except BaseException:
                self.close()  # a partly written message would desynchronise the stream for good
                raise

    def _write_tagged(self, frames: list[tuple[bytes, bytes | memoryview]]) -> None:
        """Write frames, each with its tag between header and payload (the caller holds the send lock)."""
        views: list[memoryview] = []
        assert self._send_mac is not None
        for header, payload in frames:
            payload_view = memoryview(payload).cast("B")
            tag = self._send_mac.tag(self._send_sequence, header[0], payload_view)
            views += (memoryview(header), memoryview(tag), payload_view)
            self._send_sequence += 1
        self._write(views)

    def _write(self, views: list[memoryview]) -> None:
        """Write all views with vectored writes (the caller holds the send lock)."""
        while views:
            sent = self._sock.sendmsg(views[:_IOV_MAX])
            while sent:
                if sent >= views[0].nbytes:
                    sent -= views.pop(0).nbytes
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    def _recv_header(self) -> tuple[int, int, bytes]:
        """Read the next frame header (and on a keyed channel the tag that follows it, in the same read), returning
        (kind, length, tag) after checking kind and length; the tag is checked once the payload is in."""
        if self._recv_mac is None:
            header, tag = self._recv_exact(_HEADER.size), b""
        else:
            data = self._recv_exact(_HEADER.size + TAG_SIZE)
            header, tag = data[:_HEADER.size], data[_HEADER.size:]
        (value,) = _HEADER.unpack(header)
        kind, length = value >> _KIND_SHIFT, value & _LENGTH_MASK
        if kind not in (_BYTES, _PICKLE, _BUFFER, _RBUFFER):
            self._broken(f"corrupt frame header {header.hex()} from {self.peer}")
        if length > self.max_frame:
            self.close()
            raise FrameTooLargeError(f"frame of {length} bytes from {self.peer} exceeds max_frame of "
                                     f"{self.max_frame} bytes; channel closed")
        return kind, length, tag

    def _recv_payload(self, kind: int, length: int, tag: bytes) -> bytes:
        """Read a frame's payload (straight into the bytes object returned) and, on a keyed channel, check its tag."""
        payload = self._recv_exact(length)
        if self._recv_mac is not None:
            self._check_tag(self._recv_mac.tag(self._recv_sequence, kind, payload), tag)
        return payload

    def _recv_buffer(self, kind: int, view: memoryview, tag: bytes) -> None:
        """Read a frame's payload into `view` and, on a keyed channel, check its tag."""
        self._recv_into(view)
        if self._recv_mac is not None:
            self._check_tag(self._recv_mac.tag(self._recv_sequence, kind, view), tag)

    def _check_tag(self, expected: bytes, tag: bytes) -> None:
        """Accept the received frame if its `tag` is the `expected` one, else close with IntegrityError."""
        if not hmac.compare_digest(expected, tag):
            self._broken(f"frame {self._recv_sequence} from {self.peer} failed its integrity check (altered, "
                         "injected, replayed, reordered or reflected on the way)")
        self._recv_sequence += 1

    def _broken(self, what: str) -> NoReturn:
        """Close the channel for good; on a keyed channel any broken framing is an IntegrityError, and logged."""
        self.close()
        if self._recv_mac is not None:
            log.warning("%s; channel closed", what)
            raise IntegrityError(f"{what}; channel closed")
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
        keys = client_handshake(sock, authkey, timeout=max(deadline - time.monotonic(), 0.001))
        return Channel(sock, max_frame=max_frame, keys=keys)
    except BaseException:
        sock.close()
        raise


class Listener:
    """A TCP server socket handing out authenticated Channels, one handshake thread per incoming connection.

    Handshakes run concurrently in short-lived threads, so a slow or silent client never delays the others. Peers
    that flood us cannot lock valid clients out: a peer must send its first frame within `hello_timeout` s (the
    whole handshake within `handshake_timeout` s); one source address holds at most `max_handshakes_per_address`
    handshakes (more connections from it are closed at once); and when `max_handshakes` are in progress, the oldest
    handshake of the address holding the most is dropped to make room, rather than refusing the newcomer.
    Refusals are logged (WARNING, logger ``pipeline_cluster.transport.wire``) with the peer address and reason, but
    at most 5 per `log_interval` s: the rest as one summary line per interval.
    """

    def __init__(self, address: tuple[str, int], authkey: bytes, handshake_timeout: float = 5.0,
                 backlog: int = 1024, *, max_handshakes: int = 64, max_handshakes_per_address: int = 16,
                 hello_timeout: float = 1.0, log_interval: float = 10.0, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if not isinstance(authkey, bytes) or not authkey:
            raise ValueError("authkey must be non-empty bytes (see pipeline_cluster.transport.auth.resolve_authkey)")
        self._authkey = authkey
        self.handshake_timeout = handshake_timeout
        self.hello_timeout = hello_timeout
        self.max_handshakes = max_handshakes
        self.max_handshakes_per_address = max_handshakes_per_address
        self.max_frame = max_frame
        host, port = address
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
            self._sock.listen(backlog)
            self._sock.settimeout(min(1.0, log_interval))  # wakes the acceptor now and then to log summaries
        except BaseException:
            self._sock.close()
            raise
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._lock = threading.Lock()
        self._closed = threading.Event()
        # handshakes in progress, oldest first: socket -> source host; and how many each host has
        self._handshaking: dict[socket.socket, str] = {}
        self._per_host: Counter[str] = Counter()
        self._evicted: set[socket.socket] = set()
        self._refusals = _RefusalLog(log_interval)
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
        self._refusals.flush(force=True)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                self._refusals.flush()
                continue
            except OSError as e:
                if not self._closed.is_set():
                    log.warning("accept on %s:%s failed: %s", *self.address, e)
                    self._closed.wait(0.1)  # e.g. out of file descriptors: do not spin
                continue
            host = str(peer[0])
            victim = None
            with self._lock:
                closed = self._closed.is_set()
                crowded = self._per_host[host] >= self.max_handshakes_per_address
                if not (closed or crowded):
                    if len(self._handshaking) - len(self._evicted) >= self.max_handshakes:
                        victim = self._oldest_of_busiest_host()
                        self._evicted.add(victim)
                    self._handshaking[conn] = host
                    self._per_host[host] += 1
            if closed or crowded:
                _reset(conn)  # cheap: no thread, no handshake, no TIME_WAIT left behind
                if not closed:
                    self._refusals.refused(peer, "crowded", f"{self.max_handshakes_per_address} handshakes from "
                                                            f"{host} already in progress")
                continue
            if victim is not None:
                try:
                    victim.shutdown(socket.SHUT_RDWR)  # its handshake thread fails at once and closes it
                except OSError:
                    pass  # its handshake thread is closing it already
            try:
                threading.Thread(target=self._handshake, args=(conn, peer), daemon=True,
                                 name=f"pipeline_cluster handshake {_format_address(peer)}").start()
            except RuntimeError as e:  # "can't start new thread": out of threads for now; keep accepting
                with self._lock:
                    self._forget(conn)
                _reset(conn)
                self._refusals.refused(peer, "no thread", f"cannot start a handshake thread ({e})")
                self._closed.wait(0.05)
            self._refusals.flush()

    def _oldest_of_busiest_host(self) -> socket.socket:
        """The handshake to drop when all slots are taken (under the lock): the oldest of the host holding most."""
        live = [(sock, host) for sock, host in self._handshaking.items() if sock not in self._evicted]
        busiest, _ = Counter(host for _, host in live).most_common(1)[0]
        return next(sock for sock, host in live if host == busiest)

    def _handshake(self, conn: socket.socket, peer: Any) -> None:
        channel = None
        try:
            keys = server_handshake(conn, self._authkey, timeout=self.handshake_timeout,
                                    hello_timeout=self.hello_timeout)
            channel = Channel(conn, max_frame=self.max_frame, keys=keys)
        except Exception as e:
            if not self._closed.is_set():
                if conn in self._evicted:
                    self._refusals.refused(peer, "dropped", f"dropped as the oldest of {self.max_handshakes} "
                                                            "handshakes in progress")
                else:
                    self._refusals.refused(peer, _refusal_kind(str(e)), str(e))
        with self._lock:
            evicted = self._forget(conn)
            if channel is not None and not evicted and not self._closed.is_set():
                self._ready.put(channel)
                return
        conn.close()

    def _forget(self, conn: socket.socket) -> bool:
        """Take a finished handshake off the books (under the lock); returns whether it had been dropped."""
        host = self._handshaking.pop(conn)
        self._per_host[host] -= 1
        if not self._per_host[host]:
            del self._per_host[host]
        evicted = conn in self._evicted
        self._evicted.discard(conn)
        return evicted


def _refusal_kind(reason: str) -> str:
    """The summary category of a failed handshake's reason."""
    for needle, kind in (("silent", "silent"), ("wrong authkey", "wrong key"), ("version", "wrong version"),
                         ("closed", "closed"), ("magic", "garbage"), ("malformed", "garbage"),
                         ("unexpected", "garbage")):
        if needle in reason:
            return kind
    return "other"


def _reset(conn: socket.socket) -> None:
    """Close `conn` with a TCP reset (linger 0): the cheapest way to turn a connection away."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already reset by the peer: closing is all there is to do
    conn.close()


class _RefusalLog:
    """Logs refused connections without flooding the log: up to `burst` refusals per `interval` s in full, the rest
    as one summary line per interval (counts by reason, top source addresses). While refusals go on, the intervals
    after a summary get summaries only."""

    def __init__(self, interval: float, burst: int = 5) -> None:
        self.interval = interval
        self.burst = burst
        self._lock = threading.Lock()
        self._kinds: Counter[str] = Counter()
        self._sources: Counter[str] = Counter()
        self._window_start = -float("inf")  # monotonic time the current interval began
        self._in_full = 0  # refusals logged in full in the current interval

    def refused(self, peer: Any, kind: str, reason: str) -> None:
        with self._lock:
            now = time.monotonic()
            summary = self._summary(now, force=False)
            if now - self._window_start >= self.interval:  # a quiet interval is over: log in full again
                self._window_start, self._in_full = now, 0
            in_full = self._in_full < self.burst
            if in_full:
                self._in_full += 1
            else:
                self._kinds[kind] += 1
                self._sources[str(peer[0]) if isinstance(peer, tuple) else str(peer)] += 1
        if summary:
            log.warning(summary)
        if in_full:
            log.warning("refused connection from %s: %s", _format_address(peer), reason)

    def flush(self, force: bool = False) -> None:
        """Log the summary if there is one and its interval is over (or `force`)."""
        with self._lock:
            summary = self._summary(time.monotonic(), force)
        if summary:
            log.warning(summary)

    def _summary(self, now: float, force: bool) -> str | None:
        """The summary line due now, if any (under the lock); it starts an interval without lines in full."""
        if not self._kinds or (now - self._window_start < self.interval and not force):
            return None
        total = sum(self._kinds.values())
        kinds = ", ".join(f"{count} {kind}" for kind, count in self._kinds.most_common())
        sources = ", ".join(f"{host} ({count})" for host, count in self._sources.most_common(3))
        since = now - self._window_start
        line = f"refused {total} connections in the last {since:.1f} s: {kinds}; top sources {sources}"
        self._kinds.clear()
        self._sources.clear()
        self._window_start, self._in_full = now, self.burst
        return line


def _format_address(address: Any) -> str:
    """Render a socket address as host:port for log lines."""
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
