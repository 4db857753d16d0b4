"""Security properties of the transport, on real sockets: frames after the handshake cannot be altered, injected,
replayed, reordered or reflected by a relay in the middle; a flood of half-open connections cannot lock valid clients
out of a Listener; key files are checked for their mode and emptiness."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import pickle
import re
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline_cluster.transport import auth, wire
from pipeline_cluster.transport.auth import SessionKeys, read_authkey_file
from pipeline_cluster.transport.wire import Channel, IntegrityError, Listener, connect
from tests.helpers import wait_until

KEY = b"test-key-security-0123"
WIRE_LOGGER = "pipeline_cluster.transport.wire"
AUTH_LOGGER = "pipeline_cluster.transport.auth"

UNPICKLED: list[str] = []  # tags of the Tracer objects unpickled in this process, in order


def unpickled(tag: str) -> str:
    """What a Tracer unpickles as: records that its message was unpickled."""
    UNPICKLED.append(tag)
    return tag


class Tracer:
    """An object whose unpickling is visible: it calls `unpickled(tag)`."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __reduce__(self) -> tuple:
        return unpickled, (self.tag,)


class Touch:
    """An object whose unpickling creates the file at `path`: what an attacker's pickle could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return pathlib.Path.touch, (self.path,)


@pytest.fixture(autouse=True)
def no_tracers_yet() -> Iterator[None]:
    UNPICKLED.clear()
    yield
    UNPICKLED.clear()


# ------------------------------------------------------------------------------------------------------ the relay


def recv_exact(sock: socket.socket, size: int) -> bytes | None:
    """Exactly `size` bytes from `sock`, or None at EOF or on a broken connection."""
    data = bytearray()
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def read_handshake_frame(sock: socket.socket) -> bytes | None:
    """One handshake frame: 6-byte header (magic, kind, body length), then the body."""
    header = recv_exact(sock, 6)
    if header is None:
        return None
    body = recv_exact(sock, header[5])
    return None if body is None else header + body


def read_frame(sock: socket.socket) -> bytes | None:
    """One frame of a keyed channel, whole: 8-byte header (kind, length), payload, tag."""
    header = recv_exact(sock, 8)
    if header is None:
        return None
    (value,) = struct.unpack("!Q", header)
    rest = recv_exact(sock, (value & ((1 << 56) - 1)) + wire.TAG_SIZE)
    return None if rest is None else header + rest


def pickle_frame(obj: object) -> bytes:
    """A PICKLE frame built without the session key, as an attacker would: header, pickle, a made-up tag."""
    payload = pickle.dumps(obj, protocol=5)
    return struct.pack("!Q", wire._PICKLE << wire._KIND_SHIFT | len(payload)) + payload + os.urandom(wire.TAG_SIZE)


Tamper = Callable[[int, bytes], list[bytes]]


class Relay:
    """A man in the middle on loopback, between a client and a Listener: it forwards the handshake (3 client
    frames, 2 server frames) untouched, then hands each client-to-server frame with its index to `tamper`, which
    returns the frames to forward in its place. Frames from the server are forwarded as they are, and kept in
    `server_frames`."""

    def __init__(self, target: tuple[str, int], tamper: Tamper) -> None:
        self.target = target
        self.tamper = tamper
        self.server_frames: list[bytes] = []
        self._listening = socket.create_server(("127.0.0.1", 0))
        self.address = self._listening.getsockname()
        self._sockets: list[socket.socket] = [self._listening]
        self._threads = [threading.Thread(target=self._run, daemon=True)]
        self._threads[0].start()

    def _run(self) -> None:
        try:
            client, _ = self._listening.accept()
        except OSError:
            return
        server = socket.create_connection(self.target)
        self._sockets += (client, server)
        pumps = [threading.Thread(target=self._pump, args=(client, server, 3, True), daemon=True),
                 threading.Thread(target=self._pump, args=(server, client, 2, False), daemon=True)]
        self._threads += pumps
        for pump in pumps:
            pump.start()

    def _pump(self, source: socket.socket, sink: socket.socket, handshake_frames: int, to_server: bool) -> None:
        try:
            for _ in range(handshake_frames):
                frame = read_handshake_frame(source)
                if frame is None:
                    return
                sink.sendall(frame)
            index = 0
            while (frame := read_frame(source)) is not None:
                if to_server:
                    sink.sendall(b"".join(self.tamper(index, frame)))
                else:
                    self.server_frames.append(frame)
                    sink.sendall(frame)
                index += 1
        except OSError:
            pass  # the receiving side closed the connection, as it should on a tampered frame
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def listener() -> Iterator[Listener]:
    with Listener(("127.0.0.1", 0), KEY) as lst:
        yield lst


@pytest.fixture
def wire_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger=WIRE_LOGGER)
    return caplog


@contextlib.contextmanager
def relayed(listener: Listener, tamper: Tamper) -> Iterator[tuple[Channel, Channel, Relay]]:
    """The (client, server) channels connected through a relay running `tamper`, and the relay; all closed
    afterwards."""
    relay = Relay(listener.address, tamper)
    client = connect(relay.address, KEY, timeout=5)
    try:
        yield client, listener.accept(timeout=5), relay
    finally:
        client.close()
        relay.close()


def second_message_rejected(listener: Listener, wire_log: pytest.LogCaptureFixture, tamper: Tamper,
                            second: Any = None) -> None:
    """Through a relay running `tamper`, a first message arrives; the second one (tampered with) is refused, and
    only the first was ever unpickled."""
    with relayed(listener, tamper) as (client, server, _):
        client.send(Tracer("first"))
        assert server.recv() == "first"
        client.send(Tracer("second") if second is None else second)
        assert_rejected(server, wire_log)
    assert UNPICKLED == ["first"]


def assert_rejected(server: Channel, wire_log: pytest.LogCaptureFixture) -> IntegrityError:
    """The next recv on `server` fails the integrity check, closes the channel, names the peer and logs it."""
    with pytest.raises(IntegrityError, match="failed its integrity check") as info:
        server.recv()
    assert server.closed
    assert str(server.peer[1]) in str(info.value)  # names the peer
    assert isinstance(info.value, ConnectionError)
    assert any(r.name == WIRE_LOGGER and "failed its integrity check" in r.getMessage() for r in wire_log.records)
    return info.value


# ---------------------------------------------------------------------------------------------- frame integrity


@pytest.mark.timeout(30)
def test_untouched_relay_passes_small_and_big_messages_both_ways(listener: Listener) -> None:
    """The relay itself changes nothing: a normal exchange of small and 10 MB out-of-band messages works."""
    ten_mb = os.urandom(10 * 1024 * 1024)
    messages = [("small", i) for i in range(100)] + [
        bytearray(ten_mb),                                  # one out-of-band (writable) buffer frame + pickle
        ("batch", wire.out_of_band([ten_mb[:5_000_000], ten_mb[5_000_000:]])),  # read-only buffer frames
        ten_mb,                                             # one raw frame
        "last",
    ]
    expected = messages[:100] + [bytearray(ten_mb), ("batch", [ten_mb[:5_000_000], ten_mb[5_000_000:]]), ten_mb,
                                 "last"]
    with relayed(listener, lambda index, frame: [frame]) as (client, server, _):
        for sender, receiver in ((client, server), (server, client)):
            thread = threading.Thread(target=lambda s=sender: [s.send(m) for m in messages])
            thread.start()
            received = [receiver.recv() for _ in messages]
            thread.join(10)
            assert received == expected
            assert type(received[100]) is bytearray and type(received[102]) is bytes
        server.close()


@pytest.mark.timeout(10)
def test_altered_payload_byte_is_rejected_before_unpickling(listener: Listener,
                                                            wire_log: pytest.LogCaptureFixture) -> None:
    def flip(index: int, frame: bytes) -> list[bytes]:
        if index == 1:
            at = frame.index(b"x" * 100) + 50  # inside padding: the altered pickle would still unpickle
            frame = frame[:at] + bytes([frame[at] ^ 1]) + frame[at + 1:]
        return [frame]

    second_message_rejected(listener, wire_log, flip, (Tracer("second"), b"x" * 100))


@pytest.mark.timeout(10)
def test_injected_frame_is_rejected_and_never_unpickled(listener: Listener, wire_log: pytest.LogCaptureFixture,
                                                        tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    injected = pickle_frame(Touch(marker))
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Touch(control)))
    assert control.exists()  # unpickling the injected kind of frame would create the marker file

    # the relay slips its own frame in before the second message
    second_message_rejected(listener, wire_log, lambda index, frame: [injected, frame] if index == 1 else [frame])
    assert not marker.exists()


@pytest.mark.timeout(10)
def test_replayed_frame_is_rejected(listener: Listener, wire_log: pytest.LogCaptureFixture) -> None:
    seen: list[bytes] = []

    def replay(index: int, frame: bytes) -> list[bytes]:
        seen.append(frame)
        return [seen[0]] if index == 1 else [frame]  # the second message is replaced by the first, again

    second_message_rejected(listener, wire_log, replay)  # "first" is not unpickled twice


@pytest.mark.timeout(10)
def test_swapped_frames_are_rejected(listener: Listener, wire_log: pytest.LogCaptureFixture) -> None:
    held: list[bytes] = []

    def swap(index: int, frame: bytes) -> list[bytes]:
        if index == 0:
            held.append(frame)
            return []
        return [frame, *held] if index == 1 else [frame]

    with relayed(listener, swap) as (client, server, _):
        client.send(Tracer("first"))
        client.send(Tracer("second"))
        assert_rejected(server, wire_log)
        assert UNPICKLED == []


@pytest.mark.timeout(10)
def test_reflected_frame_is_rejected(listener: Listener, wire_log: pytest.LogCaptureFixture) -> None:
    """A frame the server sent, sent back to it with the right sequence number, fails: each direction has its key."""
    relays: list[Relay] = []

    def reflect(index: int, frame: bytes) -> list[bytes]:
        return [relays[0].server_frames[0]] if index == 0 else [frame]

    with relayed(listener, reflect) as (client, server, relay):
        relays.append(relay)
        server.send(Tracer("from server"))
        assert client.recv() == "from server"
        client.send(Tracer("from client"))
        assert_rejected(server, wire_log)
        assert UNPICKLED == ["from server"]


@pytest.mark.timeout(10)
def test_altered_out_of_band_frame_stops_the_message_before_unpickling(listener: Listener,
                                                                       wire_log: pytest.LogCaptureFixture) -> None:
    """Every frame of a message is checked before its pickle is unpickled: here the first, a buffer frame."""
    def flip_buffer(index: int, frame: bytes) -> list[bytes]:
        if index == 0:
            assert frame[0] == wire._BUFFER  # the header's top byte is the kind: the out-of-band frame is first
            frame = frame[:1000] + bytes([frame[1000] ^ 0xFF]) + frame[1001:]
        return [frame]

    with relayed(listener, flip_buffer) as (client, server, _):
        client.send((Tracer("message"), pickle.PickleBuffer(bytearray(200_000))))  # the buffer goes out-of-band
        assert_rejected(server, wire_log)
        assert UNPICKLED == []


@pytest.mark.timeout(10)
def test_frame_tags_are_standard_gmac_binding_kind_number_and_length() -> None:
    """A frame's tag is AES-GCM's over nothing to encrypt, with the frame's kind and number as nonce and its payload
    as authenticated data; changing any of the four changes the tag."""
    key = os.urandom(32)
    mac = wire._FrameMac(key)
    payload = b"payload" * 1000
    expected = AESGCM(hashlib.sha256(key).digest()).encrypt(struct.pack("!BxxxQ", 2, 7), b"", payload)
    assert mac.tag(7, 2, memoryview(payload)) == expected and len(expected) == wire.TAG_SIZE
    others = {mac.tag(8, 2, payload), mac.tag(7, 3, payload), mac.tag(7, 2, payload + b"\0"),
              mac.tag(7, 2, payload[:-1])}
    assert expected not in others and len(others) == 4


@pytest.mark.timeout(10)
def test_handshake_gives_fresh_matching_keys_and_connect_gives_keyed_channels(listener: Listener) -> None:
    def handshake() -> tuple[SessionKeys, SessionKeys]:
        with socket.create_server(("127.0.0.1", 0)) as srv:
            client_sock = socket.create_connection(srv.getsockname())
            server_sock, _ = srv.accept()
        with client_sock, server_sock:
            result: list[SessionKeys] = []
            thread = threading.Thread(target=lambda: result.append(auth.server_handshake(server_sock, KEY)))
            thread.start()
            client_keys = auth.client_handshake(client_sock, KEY)
            thread.join(5)
        return client_keys, result[0]

    client_keys, server_keys = handshake()
    assert client_keys.send == server_keys.recv and client_keys.recv == server_keys.send
    assert client_keys.send != client_keys.recv
    assert handshake()[0] != client_keys  # fresh per connection
    with connect(listener.address, KEY, timeout=5) as client, listener.accept(timeout=5) as server:
        assert client.keyed and server.keyed
    a, b = socket.socketpair()
    with Channel(a) as plain, Channel(b, keys=None) as other:  # the trusted node<->worker pair: no tags
        assert not plain.keyed and not other.keyed
        plain.send("untagged")
        assert other.recv() == "untagged"


# ------------------------------------------------------------------------------------------ handshake flooding


class Flood:
    """`sockets` half-open connections from `source` that reconnect as soon as the server drops them, for at most
    `seconds` s: they connect and never send a byte."""

    def __init__(self, address: tuple[str, int], source: str, sockets: int = 200, seconds: float = 30.0) -> None:
        self.address, self.source, self.sockets, self.seconds = address, source, sockets, seconds
        self.connects = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()

        def open_one() -> None:
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((self.source, 0))
            sock.connect_ex(self.address)
            selector.register(sock, selectors.EVENT_READ)
            self.connects += 1

        try:
            for _ in range(self.sockets):
                open_one()
            deadline = time.monotonic() + self.seconds
            while not self._stop.is_set() and time.monotonic() < deadline:
                for key, _ in selector.select(0.05):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        if sock.recv(64):
                            continue
                    except BlockingIOError:
                        continue
                    except OSError:
                        pass  # reset or refused: dropped by the server, like EOF
                    selector.unregister(sock)
                    sock.close()
                    open_one()
        finally:
            for key in list(selector.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            selector.close()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == WIRE_LOGGER and r.levelno >= logging.WARNING]


@pytest.mark.timeout(60)
def test_flood_of_half_open_sockets_does_not_lock_out_valid_clients(wire_log: pytest.LogCaptureFixture) -> None:
    with Listener(("127.0.0.1", 0), KEY) as lst:  # default limits: they are what must hold up
        with Flood(lst.address, "127.0.0.9", sockets=200, seconds=30) as flood:
            assert wait_until(lambda: flood.connects >= 1000, 10), f"the flood did not get going ({flood.connects})"
            flood_before = flood.connects
            times: list[float | str] = []
            for _ in range(20):
                started = time.monotonic()
                try:
                    with connect(lst.address, KEY, timeout=5) as client, lst.accept(timeout=5) as server:
                        client.send("ping")
                        assert server.recv() == "ping"
                    times.append(round(time.monotonic() - started, 3))
                except (OSError, EOFError) as exc:
                    times.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.1)  # spread over ~2 s of flooding
            flood_during = flood.connects - flood_before
        assert all(isinstance(t, float) and t < 2.0 for t in times), times
        assert flood_during >= 200, f"the flood paused while the valid client connected ({flood_during} connects)"
        during = warnings_of(wire_log)
        assert len(during) <= 10, during
    summaries = [m for m in warnings_of(wire_log) if re.match(r"refused \d+ connections in the last", m)]
    assert summaries and "127.0.0.9" in summaries[-1], warnings_of(wire_log)


@pytest.mark.timeout(20)
def test_one_address_cannot_take_every_handshake_slot(wire_log: pytest.LogCaptureFixture) -> None:
    with Listener(("127.0.0.1", 0), KEY, hello_timeout=5.0, max_handshakes_per_address=2) as lst:
        silent = [socket.create_connection(lst.address, timeout=5, source_address=("127.0.0.9", 0)) for _ in range(2)]
        try:
            assert wait_until(lambda: len(lst._handshaking) == 2, 5)
            started = time.monotonic()
            try:
                with socket.create_connection(lst.address, timeout=5, source_address=("127.0.0.9", 0)) as extra:
                    assert extra.recv(1) == b""
            except ConnectionResetError:
                pass  # turned away at once, with a reset (which connect itself may already report)
            assert time.monotonic() - started < 1.0
            with connect(lst.address, KEY, timeout=5) as client, lst.accept(timeout=5) as server:
                client.send("still welcome")
                assert server.recv() == "still welcome"
            assert len(lst._handshaking) == 2  # the silent ones keep their slots until their deadline
        finally:
            for sock in silent:
                sock.close()
    assert any("2 handshakes from 127.0.0.9 already in progress" in m for m in warnings_of(wire_log))


@pytest.mark.timeout(20)
def test_full_slots_make_room_for_newcomers_from_many_addresses(wire_log: pytest.LogCaptureFixture) -> None:
    """Silent peers from many addresses, each dropped in turn for the next: the newest ones and a valid client
    get in, and the acceptor survives evictions that come faster than the dropped handshakes end."""
    with Listener(("127.0.0.1", 0), KEY, hello_timeout=5.0, max_handshakes=2) as lst:
        silent = [socket.create_connection(lst.address, timeout=5, source_address=(f"127.0.0.{n}", 0))
                  for n in range(11, 31)]
        try:
            newest = ["127.0.0.29", "127.0.0.30"]
            assert wait_until(lambda: sorted(lst._handshaking.values()) == newest, 5), lst._handshaking
            with connect(lst.address, KEY, timeout=5) as client, lst.accept(timeout=5) as server:
                client.send("in")
                assert server.recv() == "in"
            assert lst._acceptor.is_alive()
        finally:
            for sock in silent:
                sock.close()
    assert any("dropped as the oldest of 2 handshakes in progress" in m for m in warnings_of(wire_log))


@pytest.mark.timeout(20)
def test_silent_peer_dropped_after_the_hello_timeout_but_a_slow_handshake_may_go_on(
        wire_log: pytest.LogCaptureFixture) -> None:
    with Listener(("127.0.0.1", 0), KEY, hello_timeout=0.3, handshake_timeout=5.0) as lst:
        with socket.create_connection(lst.address, timeout=5, source_address=("127.0.0.6", 0)) as silent:
            started = time.monotonic()
            silent.settimeout(5)
            try:
                assert silent.recv(1) == b""
            except ConnectionResetError:
                pass
            assert time.monotonic() - started < 2.0
        assert any("peer silent for 0.3 s" in m and "127.0.0.6:" in m for m in warnings_of(wire_log))
        with socket.create_connection(lst.address, timeout=5) as slow:
            slow.sendall(auth._HEADER.pack(auth.MAGIC, auth._HELLO, 2) + auth._VERSION.pack(auth.PROTOCOL_VERSION))
            assert len(slow.recv(64)) == 6 + 32  # the challenge
            time.sleep(0.6)  # longer than the hello timeout: the rest of the handshake has the whole deadline
            assert len(lst._handshaking) == 1


@pytest.mark.timeout(20)
def test_refusals_are_logged_in_rate_limited_summaries(wire_log: pytest.LogCaptureFixture) -> None:
    attempts = 30
    with Listener(("127.0.0.1", 0), KEY, log_interval=0.5) as lst:
        for _ in range(attempts):
            with socket.create_connection(lst.address, timeout=5, source_address=("127.0.0.3", 0)) as sock:
                with pytest.raises(auth.AuthenticationError, match="wrong authkey"):
                    auth.client_handshake(sock, b"not the key")
        assert wait_until(lambda: not lst._handshaking, 5)
    messages = warnings_of(wire_log)
    in_full = [m for m in messages if m.startswith("refused connection from 127.0.0.3:") and "wrong authkey" in m]
    assert messages[:5] == in_full, messages  # the first few in full, with address and reason
    summaries = [re.match(r"refused (\d+) connections in the last [\d.]+ s: (\d+) wrong key; top sources "
                          r"127\.0\.0\.3 \((\d+)\)$", m) for m in messages[5:]]
    assert summaries and all(summaries), messages
    assert 5 + sum(int(m.group(1)) for m in summaries if m) == attempts
    assert len(messages) <= 10, messages


# ---------------------------------------------------------------------------------------------------- key files


@pytest.mark.timeout(10)
def test_read_authkey_file_private_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=AUTH_LOGGER)
    path = tmp_path / "authkey"
    path.write_bytes(b"  secret key \n")
    path.chmod(0o600)
    assert read_authkey_file(path) == b"secret key"
    assert read_authkey_file(str(path)) == b"secret key"
    assert not caplog.records


@pytest.mark.timeout(10)
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_read_authkey_file_warns_when_others_may_read_it(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                         mode: int) -> None:
    caplog.set_level(logging.WARNING, logger=AUTH_LOGGER)
    path = tmp_path / "authkey"
    path.write_bytes(b"secret\n")
    path.chmod(mode)
    assert read_authkey_file(path) == b"secret"
    [record] = [r for r in caplog.records if r.name == AUTH_LOGGER]
    assert record.levelno == logging.WARNING
    assert str(path) in record.getMessage() and f"mode {mode:o}" in record.getMessage()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("content", [b"", b"\n", b"  \t\n"])
def test_read_authkey_file_empty_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty-key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ValueError, match=f"empty authkey in the key file {re.escape(str(path))}"):
        read_authkey_file(path)


@pytest.mark.timeout(10)
def test_read_authkey_file_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "no-such-key"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        read_authkey_file(path)
