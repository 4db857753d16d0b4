"""Tests of the authenticated transport: pipeline_cluster.auth (keys, handshake) and pipeline_cluster.wire."""

from __future__ import annotations

import logging
import os
import pickle
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import pytest

from pipeline_cluster.transport import auth, wire
from pipeline_cluster.transport.auth import AuthenticationError, ProtocolVersionError, resolve_authkey
from pipeline_cluster.transport.wire import Channel, FrameTooLargeError, Listener, connect
from tests.helpers import wait_until

KEY = b"test-key-0123456789"


def blocked_call(call: Callable[[], object], unblock: Callable[[], None]) -> list[BaseException]:
    """Run `call` in a thread until it blocks, `unblock()` it from here, and return what it raised."""
    errors: list[BaseException] = []
    started = threading.Event()

    def run() -> None:
        started.set()
        try:
            call()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    started.wait(5)
    unblock()
    thread.join(5)
    assert not thread.is_alive()
    return errors
WIRE_LOGGER = "pipeline_cluster.transport.wire"


class Blob:
    """A picklable object exposing its memory as a PickleBuffer, like a numpy array, to exercise out-of-band frames."""

    def __init__(self, data: bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: int) -> tuple:
        return Blob, (pickle.PickleBuffer(self.data),)


# ---------------------------------------------------------------------------------------------------------- helpers


def wait_for_log(caplog: pytest.LogCaptureFixture, *needles: str, timeout: float = 5.0) -> str:
    """Wait for a WARNING record of pipeline_cluster.wire containing all `needles`; return its message."""
    found: list[str] = []

    def seen() -> bool:
        for record in caplog.records:
            message = record.getMessage()
            if record.name == WIRE_LOGGER and record.levelno == logging.WARNING and all(n in message for n in needles):
                found.append(message)
                return True
        return False

    assert wait_until(seen, timeout, 0.005), f"no log record containing {needles} within {timeout} s"
    return found[0]


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Return whether the peer closed `sock` (EOF or reset) within `timeout` s."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def still_open(sock: socket.socket) -> bool:
    """Return whether `sock` is still connected with nothing to read, without waiting."""
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False
    finally:
        sock.setblocking(True)
    return False


def raw_client(address: tuple[str, int], source: str | None = None) -> socket.socket:
    """Open a plain TCP connection (no handshake), optionally from a chosen 127.0.0.N source address."""
    return socket.create_connection(address, timeout=5, source_address=(source, 0) if source else None)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Return two raw connected TCP sockets on loopback: (server side, client side)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
    return conn, client


def run_both(server: Callable[[], object], client: Callable[[], object]) -> tuple[object, object]:
    """Run `server` in a thread and `client` here; return what each returned or raised."""
    results: dict[str, object] = {}

    def target() -> None:
        try:
            results["server"] = server()
        except Exception as e:
            results["server"] = e

    thread = threading.Thread(target=target)
    thread.start()
    try:
        results["client"] = client()
    except Exception as e:
        results["client"] = e
    thread.join(10)
    assert not thread.is_alive()
    return results["server"], results["client"]


def assert_good_client_works(listener: Listener) -> None:
    """A correctly keyed client is accepted and can talk both ways."""
    with connect(listener.address, KEY, timeout=5) as client, listener.accept(timeout=5) as server:
        client.send(("ping", 1))
        assert server.recv() == ("ping", 1)
        server.send("pong")
        assert client.recv() == "pong"


@pytest.fixture
def listener() -> Iterator[Listener]:
    with Listener(("127.0.0.1", 0), KEY, handshake_timeout=5.0) as lst:
        yield lst


@pytest.fixture
def channels(listener: Listener) -> Iterator[tuple[Channel, Channel]]:
    """A connected (client, server) pair of channels."""
    client = connect(listener.address, KEY, timeout=5)
    server = listener.accept(timeout=5)
    yield client, server
    client.close()
    server.close()


@pytest.fixture
def wire_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger=WIRE_LOGGER)
    return caplog


# ------------------------------------------------------------------------------------------------- round trips


@pytest.mark.timeout(10)
def test_round_trip_objects_including_lambda_and_closure(channels: tuple[Channel, Channel]) -> None:
    client, server = channels
    factor = 3
    objects = [None, 0, -7, 3.5, "text é", {"a": [1, 2, (3, 4)]}, {1, 2}, ValueError("boom"), list(range(1000))]
    for obj in objects:
        client.send(obj)
        received = server.recv()
        if isinstance(obj, Exception):
            assert type(received) is ValueError and received.args == obj.args
        else:
            assert received == obj
    client.send(lambda x: x + 1)  # the C pickler fails on lambdas: cloudpickle takes over
    assert server.recv()(41) == 42
    server.send(lambda x: x * factor)  # closures too, in the other direction
    assert client.recv()(5) == 15



def test_main_classes_travel_by_value_although_the_c_pickler_goes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The C pickler would write a `__main__` class by reference, which the peer (another program) cannot resolve:
    such a message must be pickled again by cloudpickle, by value."""
    import __main__

    Point = type("Point", (), {"__module__": "__main__", "__init__": lambda self, x: setattr(self, "x", x)})
    monkeypatch.setattr(__main__, "Point", Point, raising=False)
    assert b"__main__" in pickle.dumps(Point(1))  # by reference: what pack must not keep
    packed = wire.pack(("batch", [Point(7)]))
    monkeypatch.delattr(__main__, "Point")  # as in a peer whose __main__ has no such class
    restored = pickle.loads(packed.payload, buffers=packed.buffers)[1][0]
    assert restored.x == 7 and type(restored).__name__ == "Point"
    plain = wire.pack(("batch", [1, "two", (3.0,)]))  # no __main__ in it: the C pickler's bytes are kept
    assert plain.payload == pickle.dumps(("batch", [1, "two", (3.0,)]), protocol=5)

@pytest.mark.timeout(20)
def test_large_payloads_round_trip(channels: tuple[Channel, Channel]) -> None:
    client, server = channels
    ten_mb = os.urandom(10 * 1024 * 1024)
    payloads = [
        ten_mb,                                              # raw frame, no copy on either side
        bytearray(ten_mb),                                   # out-of-band pickle buffer
        Blob(bytearray(ten_mb[:3_000_000])),                 # out-of-band buffer of a custom type
        [bytes([i]) * 100_000 for i in range(20)],           # a batch of 100 KB items
        {"header": "x", "body": memoryview(ten_mb)[:1000].tobytes()},
    ]
    sender = threading.Thread(target=lambda: [client.send(p) for p in payloads])
    sender.start()
    received = [server.recv() for _ in payloads]
    sender.join(10)
    assert type(received[0]) is bytes and received[0] == ten_mb
    assert type(received[1]) is bytearray and received[1] == ten_mb
    assert type(received[2]) is Blob and bytes(received[2].data) == ten_mb[:3_000_000]
    assert received[3] == payloads[3]
    assert received[4] == payloads[4]


@pytest.mark.timeout(10)
def test_big_bytes_items_travel_out_of_band_and_arrive_as_bytes(channels: tuple[Channel, Channel]) -> None:
    client, server = channels
    items = [os.urandom(100_000) for _ in range(5)] + [b"small", 7, bytearray(b"ba")]
    packed = wire.pack(("batch", wire.out_of_band(items)))
    assert len(packed.buffers) == 5 and len(packed.payload) < 1000  # the big items are not copied into the pickle
    assert all(buffer.readonly for buffer in packed.buffers)
    sender = threading.Thread(target=client.send_packed, args=(packed,))
    sender.start()
    kind, received = server.recv()
    sender.join(10)
    assert kind == "batch" and received == items
    assert [type(item) for item in received] == [bytes] * 6 + [int, bytearray]
    tiny = [1, 2, 3]
    assert wire.out_of_band(tiny) is tiny  # lists of small items are not looked through


@pytest.mark.timeout(10)
def test_send_bytes_and_recv_bytes(channels: tuple[Channel, Channel]) -> None:
    client, server = channels
    big = os.urandom(5_000_000)
    sender = threading.Thread(target=lambda: [client.send_bytes(b) for b in
                                              (b"raw", b"", bytearray(b"ba"), memoryview(big), big)])
    sender.start()
    assert server.recv_bytes() == b"raw"
    assert server.recv_bytes() == b""
    assert server.recv_bytes() == b"ba"
    assert server.recv_bytes() == big
    assert server.recv() == big  # recv() hands raw frames back as bytes
    sender.join(10)
    client.send(memoryview(b"view"))  # send() of a memoryview goes as a raw frame
    assert server.recv_bytes() == b"view"
    client.send({"not": "bytes"})
    with pytest.raises(TypeError, match="pickled message"):
        server.recv_bytes()
    client.send("still in step")
    assert server.recv() == "still in step"


@pytest.mark.timeout(10)
def test_eof_after_peer_closes(channels: tuple[Channel, Channel]) -> None:
    client, server = channels
    client.send("last words")
    client.close()
    client.close()  # idempotent
    assert client.closed
    assert server.recv() == "last words"
    with pytest.raises(EOFError):
        server.recv()
    with pytest.raises(OSError):
        client.send("after close")


@pytest.mark.timeout(10)
def test_local_close_wakes_a_blocked_reader(channels: tuple[Channel, Channel]) -> None:
    _, server = channels
    errors = blocked_call(server.recv, server.close)
    assert len(errors) == 1 and isinstance(errors[0], EOFError)


@pytest.mark.timeout(10)
def test_concurrent_senders_do_not_interleave_frames(channels: tuple[Channel, Channel]) -> None:
    client, server = channels
    n_threads, per_thread = 4, 2000
    threads = [threading.Thread(target=lambda t=t: [client.send((t, i, b"x" * (i % 300)))
                                                    for i in range(per_thread)])
               for t in range(n_threads)]
    for thread in threads:
        thread.start()
    next_index = [0] * n_threads
    for _ in range(n_threads * per_thread):
        t, i, pad = server.recv()
        assert i == next_index[t] and pad == b"x" * (i % 300)
        next_index[t] += 1
    for thread in threads:
        thread.join(5)
    assert next_index == [per_thread] * n_threads


@pytest.mark.timeout(10)
def test_frame_size_limits(listener: Listener) -> None:
    with connect(listener.address, KEY, timeout=5, max_frame=1000) as client, listener.accept(timeout=5) as server:
        with pytest.raises(ValueError, match="max_frame"):
            client.send_bytes(b"x" * 1001)  # refused before anything is written...
        client.send("fine")  # ...so the channel is still usable
        assert server.recv() == "fine"
        server.max_frame = 1000
        client.max_frame = wire.DEFAULT_MAX_FRAME
        client.send_bytes(b"y" * 5000)
        with pytest.raises(FrameTooLargeError, match="5000 bytes"):
            server.recv()
        assert server.closed


# ------------------------------------------------------------------------------------------------ authentication


@pytest.mark.timeout(10)
def test_wrong_key_refused_on_both_sides() -> None:
    server_sock, client_sock = tcp_pair()
    with server_sock, client_sock:
        server_error, client_error = run_both(lambda: auth.server_handshake(server_sock, KEY),
                                              lambda: auth.client_handshake(client_sock, b"not the key"))
    assert isinstance(server_error, AuthenticationError) and "wrong authkey" in str(server_error)
    assert isinstance(client_error, AuthenticationError) and "wrong authkey" in str(client_error)
    assert not isinstance(client_error, ProtocolVersionError)


@pytest.mark.timeout(10)
def test_wrong_key_refused_and_logged_by_listener(listener: Listener, wire_log: pytest.LogCaptureFixture) -> None:
    with pytest.raises(AuthenticationError, match="wrong authkey"):
        connect(listener.address, b"not the key", timeout=5)
    message = wait_for_log(wire_log, "wrong authkey", "127.0.0.1:")
    assert message.startswith("refused connection from 127.0.0.1:")
    assert_good_client_works(listener)


@pytest.mark.timeout(10)
def test_garbage_refused_quickly(wire_log: pytest.LogCaptureFixture) -> None:
    # handshake_timeout is far longer than the test may run: only recognising the garbage can end it in time
    with Listener(("127.0.0.2", 0), KEY, handshake_timeout=60.0) as lst:
        assert lst.address[0] == "127.0.0.2" and lst.address[1] > 0
        for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x80\x05\x95", b"P"):
            with raw_client(lst.address, source="127.0.0.5") as sock:
                sock.sendall(garbage)
                if garbage == b"P":  # a plausible first byte, then silence: decided by the timeout, not by us
                    assert still_open(sock)
                    continue
                assert closed_by_peer(sock, timeout=5)
        wait_for_log(wire_log, "bad magic (garbage bytes?)", "127.0.0.5:")
        assert_good_client_works(lst)


@pytest.mark.timeout(10)
def test_silent_client_dropped_without_blocking_others(wire_log: pytest.LogCaptureFixture) -> None:
    with Listener(("127.0.0.1", 0), KEY, handshake_timeout=0.5) as lst:
        silent = raw_client(lst.address, source="127.0.0.7")
        with silent:
            # a good client connecting meanwhile is accepted while the silent one still holds its handshake
            with connect(lst.address, KEY, timeout=5) as client, lst.accept(timeout=5) as server:
                assert still_open(silent), "the good client was only accepted after the silent one was dropped"
                client.send("hello")
                assert server.recv() == "hello"
            assert closed_by_peer(silent, timeout=5)
        wait_for_log(wire_log, "peer silent for 0.5 s", "127.0.0.7:")
        assert_good_client_works(lst)


@pytest.mark.timeout(10)
def test_whole_handshake_is_bounded_even_for_a_trickling_peer() -> None:
    server_sock, client_sock = tcp_pair()
    stop = threading.Event()
    sent: list[int] = []

    def trickle() -> None:  # one valid byte every 0.2 s: every single recv succeeds, the handshake never ends
        for byte in auth.MAGIC * 100:
            if stop.wait(0.2):
                return
            client_sock.sendall(bytes([byte]))
            sent.append(byte)

    thread = threading.Thread(target=trickle)
    thread.start()
    with server_sock, client_sock:
        with pytest.raises(AuthenticationError, match=r"peer silent for 0\.5 s"):
            auth.server_handshake(server_sock, KEY, timeout=0.5)
        given_up_after = len(sent)
        stop.set()
        thread.join(5)
    # the deadline covers the whole handshake: it gave up before even one frame header had trickled in (a timeout
    # per recv would have read the header and failed on its bytes instead, "malformed handshake frame")
    assert given_up_after < auth._HEADER.size, (given_up_after, auth._HEADER.size)


@pytest.mark.timeout(10)
def test_version_mismatch_named_on_client_side(listener: Listener, wire_log: pytest.LogCaptureFixture) -> None:
    with raw_client(listener.address) as sock:
        newer = auth.PROTOCOL_VERSION + 1
        with pytest.raises(ProtocolVersionError, match=f"protocol version mismatch: ours {newer}, theirs "
                                                      f"{auth.PROTOCOL_VERSION}") as info:
            auth.client_handshake(sock, KEY, version=newer)
    assert (info.value.ours, info.value.theirs) == (newer, auth.PROTOCOL_VERSION)
    wait_for_log(wire_log, f"protocol version mismatch: ours {auth.PROTOCOL_VERSION}, theirs {newer}")
    assert_good_client_works(listener)


@pytest.mark.timeout(10)
def test_version_mismatch_with_a_newer_server() -> None:
    server_sock, client_sock = tcp_pair()
    with server_sock, client_sock:
        newer = auth.PROTOCOL_VERSION + 1
        server_error, client_error = run_both(lambda: auth.server_handshake(server_sock, KEY, version=newer),
                                              lambda: auth.client_handshake(client_sock, KEY))
    assert isinstance(server_error, ProtocolVersionError)
    assert str(server_error) == f"protocol version mismatch: ours {newer}, theirs {auth.PROTOCOL_VERSION}"
    assert isinstance(client_error, ProtocolVersionError)
    assert str(client_error) == f"protocol version mismatch: ours {auth.PROTOCOL_VERSION}, theirs {newer}"


@pytest.mark.timeout(10)
def test_connection_closed_during_handshake(listener: Listener, wire_log: pytest.LogCaptureFixture) -> None:
    with raw_client(listener.address, source="127.0.0.9") as sock:
        sock.sendall(auth.MAGIC)
    wait_for_log(wire_log, "connection closed during handshake", "127.0.0.9:")
    assert_good_client_works(listener)


@pytest.mark.timeout(10)
def test_full_handshake_slots_drop_the_oldest_not_the_newcomer(wire_log: pytest.LogCaptureFixture) -> None:
    with Listener(("127.0.0.1", 0), KEY, handshake_timeout=5.0, hello_timeout=5.0, max_handshakes=1) as lst:
        with raw_client(lst.address, source="127.0.0.7") as silent:
            assert wait_until(lambda: len(lst._handshaking) == 1, 5), "the silent client took no handshake slot"
            assert_good_client_works(lst)  # the newcomer gets in: the silent one, holding the only slot, makes room
            assert closed_by_peer(silent, timeout=5)
        wait_for_log(wire_log, "dropped as the oldest of 1 handshakes in progress", "127.0.0.7:")
        assert wait_until(lambda: not lst._handshaking, 5), "the handshakes did not end"


@pytest.mark.timeout(10)
def test_handshake_errors_survive_pickling() -> None:
    for error in (AuthenticationError("wrong authkey"), ProtocolVersionError(1, 2)):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
        assert isinstance(copy, ConnectionError)
    assert pickle.loads(pickle.dumps(ProtocolVersionError(1, 2))).theirs == 2


# ---------------------------------------------------------------------------------------------------- listener


@pytest.mark.timeout(10)
def test_accept_timeout_and_close_unblocks_accept() -> None:
    lst = Listener(("127.0.0.1", 0), KEY)
    with pytest.raises(TimeoutError):
        lst.accept(timeout=0.05)
    errors = blocked_call(lst.accept, lambda: (lst.close(), lst.close()))  # close is idempotent
    assert len(errors) == 1 and type(errors[0]) is OSError and "listener closed" in str(errors[0])
    with pytest.raises(OSError, match="listener closed"):
        lst.accept(timeout=1)
    with pytest.raises(ConnectionRefusedError):
        connect(lst.address, KEY, timeout=5)


@pytest.mark.timeout(10)
def test_close_releases_unaccepted_channels() -> None:
    lst = Listener(("127.0.0.1", 0), KEY)
    client = connect(lst.address, KEY, timeout=5)
    assert wait_until(lambda: not lst._handshaking, 5), "the handshake did not finish"
    lst.close()
    with pytest.raises(EOFError):
        client.recv()
    client.close()


# --------------------------------------------------------------------------------------------------------- keys


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike) -> pytest.MonkeyPatch:
    """No key in the environment, HOME and XDG_CONFIG_HOME pointing into tmp_path."""
    monkeypatch.delenv(auth.AUTHKEY_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return monkeypatch


@pytest.mark.timeout(10)
def test_resolve_authkey_explicit_beats_env_beats_file(key_env: pytest.MonkeyPatch, tmp_path) -> None:
    key_env.setenv(auth.AUTHKEY_ENV, "from-env")
    assert resolve_authkey(b"explicit") == b"explicit"
    assert resolve_authkey("explicit é") == "explicit é".encode()
    assert resolve_authkey() == b"from-env"
    assert not (tmp_path / "home").exists()  # the key file is not created while the environment has a key
    key_env.delenv(auth.AUTHKEY_ENV)
    from_file = resolve_authkey()
    assert from_file != b"from-env" and len(from_file) == 64
    assert resolve_authkey(b"explicit") == b"explicit"


@pytest.mark.timeout(10)
def test_resolve_authkey_creates_private_key_file_once(key_env: pytest.MonkeyPatch, tmp_path) -> None:
    old_umask = os.umask(0)  # the 0600 must come from the code, not from a restrictive umask
    try:
        key = resolve_authkey()
    finally:
        os.umask(old_umask)
    path = tmp_path / "home" / ".config" / "pipeline_cluster" / "authkey"
    assert auth.default_authkey_path() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(key) == 64 and bytes.fromhex(key.decode())
    assert path.read_bytes().strip() == key
    assert resolve_authkey() == key  # reused, not regenerated
    assert [p.name for p in path.parent.iterdir()] == ["authkey"]  # no temporary file left behind


@pytest.mark.timeout(10)
def test_resolve_authkey_respects_xdg_config_home(key_env: pytest.MonkeyPatch, tmp_path) -> None:
    key_env.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    key = resolve_authkey()
    path = tmp_path / "xdg" / "pipeline_cluster" / "authkey"
    assert path.read_bytes().strip() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not (tmp_path / "home").exists()
    assert resolve_authkey() == key


@pytest.mark.timeout(10)
def test_resolve_authkey_rejects_empty_keys(key_env: pytest.MonkeyPatch, tmp_path) -> None:
    with pytest.raises(ValueError):
        resolve_authkey("")
    with pytest.raises(ValueError):
        resolve_authkey(b"")
    key_env.setenv(auth.AUTHKEY_ENV, "")
    with pytest.raises(ValueError, match=auth.AUTHKEY_ENV):
        resolve_authkey()
    key_env.delenv(auth.AUTHKEY_ENV)
    path = auth.default_authkey_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\n")
    path.chmod(0o600)
    with pytest.raises(ValueError, match="key file"):
        resolve_authkey()


@pytest.mark.timeout(10)
def test_resolve_authkey_warns_about_a_readable_key_file(key_env: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    key = resolve_authkey()
    auth.default_authkey_path().chmod(0o644)
    caplog.set_level(logging.WARNING, logger="pipeline_cluster.transport.auth")
    assert resolve_authkey() == key
    assert any("readable by other users" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(10)
def test_handshake_requires_a_bytes_key() -> None:
    server_sock, client_sock = tcp_pair()
    with server_sock, client_sock:
        with pytest.raises(TypeError, match="bytes"):
            auth.client_handshake(client_sock, "a str key")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Listener(("127.0.0.1", 0), b"")


# --------------------------------------------------------------------------------------------------- throughput


def transfer(client: Channel, server: Channel, messages: Iterable[object]) -> tuple[list, float]:
    """Send `messages` from client to a reader thread on server; returns what arrived and the seconds it took."""
    messages = list(messages)
    received: list = []
    reader = threading.Thread(target=lambda: received.extend(server.recv() for _ in messages))
    started = time.perf_counter()
    reader.start()
    for message in messages:
        client.send(message)
    reader.join(50)
    return received, time.perf_counter() - started


@pytest.mark.timeout(60)
def test_throughput_smoke(channels: tuple[Channel, Channel], capsys: pytest.CaptureFixture) -> None:
    client, server = channels
    n = 20_000
    received, elapsed = transfer(client, server, range(n))
    assert received == list(range(n))

    payload = os.urandom(10 * 1024 * 1024)
    rounds = 20
    big, mb_elapsed = transfer(client, server, [payload] * rounds)
    assert len(big) == rounds and big[-1] == payload
    with capsys.disabled():
        print(f"\nwire throughput (sender and reader threads in one process): {n / elapsed:,.0f} small msgs/s, "
              f"{rounds * len(payload) / mb_elapsed / 1e6:,.0f} MB/s in 10 MB messages")
