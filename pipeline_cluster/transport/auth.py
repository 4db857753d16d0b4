"""Shared-key authentication for pipeline_cluster connections.

Every TCP connection between cluster processes (root, node servers, log server) starts with the handshake below,
done on raw sockets with small fixed-size frames, so that no byte from a peer is unpickled before the peer has proved
it knows the authkey (docs/ARCHITECTURE.md, "Security").

Handshake frames are ``MAGIC (4 bytes) | kind (1 byte) | body length (1 byte) | body``, never longer than
``HANDSHAKE_FRAME_MAX`` bytes. The exchange, client ``C`` and server ``S``::

    C -> S  HELLO      version (u16)
    S -> C  CHALLENGE  32 random bytes            or  VERSION (u16, S's version) and both sides fail
    C -> S  RESPONSE   HMAC(key, client label + S challenge) + 32 random bytes of C's own challenge
    S -> C  PROOF      HMAC(key, server label + C challenge + S challenge)   or  REFUSED and both sides fail
    C -> S  WELCOME                                                          or  REFUSED and both sides fail

The HELLO, VERSION and REFUSED frames must keep this layout in every future protocol version, so that peers of
different versions can still tell each other which versions they speak.

Both sides then derive two session keys, one per direction, as HMAC(key, direction label + C challenge + S challenge)
(`SessionKeys`); `pipeline_cluster.transport.wire` uses them to authenticate every later frame, so a relay that
passed the handshake on cannot alter, inject, replay, reorder or reflect frames afterwards.

This gives authenticity and integrity, not secrecy: frames travel unencrypted, and anyone on the path can read
them. Encryption is the job of `connect = "tunnel"` (the SSH tunnel); use it on networks you do not trust.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import socket
import struct
import time
from pathlib import Path
from typing import NamedTuple

PROTOCOL_VERSION: int = 4  # 3: typed messages (pipeline_cluster.messages); 4: per-frame MACs with session keys

MAGIC = b"PCLU"
HANDSHAKE_FRAME_MAX = 256
AUTHKEY_ENV = "PIPELINE_CLUSTER_AUTHKEY"

_HEADER = struct.Struct("!4sBB")  # magic, kind, body length
_VERSION = struct.Struct("!H")
_CHALLENGE_SIZE = 32
_MAC_SIZE = hashlib.sha256().digest_size

_HELLO, _CHALLENGE, _RESPONSE, _PROOF, _WELCOME, _REFUSED, _VERSION_MISMATCH = range(1, 8)
_BODY_SIZES = {
    _HELLO: _VERSION.size,
    _CHALLENGE: _CHALLENGE_SIZE,
    _RESPONSE: _MAC_SIZE + _CHALLENGE_SIZE,
    _PROOF: _MAC_SIZE,
    _WELCOME: 0,
    _REFUSED: 1,
    _VERSION_MISMATCH: _VERSION.size,
}
_KIND_NAMES = {
    _HELLO: "hello",
    _CHALLENGE: "challenge",
    _RESPONSE: "response",
    _PROOF: "proof",
    _WELCOME: "welcome",
}
assert _HEADER.size + max(_BODY_SIZES.values()) <= HANDSHAKE_FRAME_MAX

# Why a peer refused us. Only a code travels, so no peer-chosen text ever reaches our logs.
_REFUSED_WRONG_KEY = 1
_REFUSED_BAD_FRAME = 2

_CLIENT_LABEL = b"pipeline_cluster client proof"
_SERVER_LABEL = b"pipeline_cluster server proof"
_CLIENT_TO_SERVER_LABEL = b"pipeline_cluster session key client to server"
_SERVER_TO_CLIENT_LABEL = b"pipeline_cluster session key server to client"

log = logging.getLogger(__name__)


class AuthenticationError(ConnectionError):
    """A peer failed the handshake; `reason` says why in words (wrong key, garbage, silence, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ProtocolVersionError(AuthenticationError):
    """The peer speaks another protocol version; the message names ours and theirs."""

    def __init__(self, ours: int, theirs: int) -> None:
        super().__init__(f"protocol version mismatch: ours {ours}, theirs {theirs}")
        self.ours = ours
        self.theirs = theirs

    def __reduce__(self) -> tuple[type[ProtocolVersionError], tuple[int, int]]:
        """Pickle by the two versions, since the constructor does not take the message."""
        return type(self), (self.ours, self.theirs)


class SessionKeys(NamedTuple):
    """The two session keys of one connection, as seen from one side: `send` authenticates the frames it sends,
    `recv` those it receives. Pass them to `wire.Channel(sock, keys=...)`."""

    send: bytes
    recv: bytes


def default_authkey_path() -> Path:
    """Return where the default key file lives: $XDG_CONFIG_HOME (or ~/.config)/pipeline_cluster/authkey."""
    config = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(config) if os.path.isabs(config) else Path.home() / ".config"
    return base / "pipeline_cluster" / "authkey"


def resolve_authkey(authkey: bytes | str | None = None) -> bytes:
    """Return the cluster's shared key: `authkey` if given, else $PIPELINE_CLUSTER_AUTHKEY, else the key file.

    The key file is created with 32 random bytes (as hex text) on first use, readable by its owner only. Its stripped
    text is the key, so copying that text into $PIPELINE_CLUSTER_AUTHKEY on another machine gives the same key.
    """
    if authkey is not None:
        key = authkey.encode("utf-8") if isinstance(authkey, str) else bytes(authkey)
        source = "the authkey argument"
    elif AUTHKEY_ENV in os.environ:
        key = os.environ[AUTHKEY_ENV].encode("utf-8")
        source = f"${AUTHKEY_ENV}"
    else:
        path = default_authkey_path()
        key = _read_or_create_key_file(path)
        source = f"the key file {path}"
    if not key:
        raise ValueError(f"empty authkey from {source}")
    return key


def _read_or_create_key_file(path: Path) -> bytes:
    """Read the key file, creating it atomically (mode 0600, directory 0700) if it does not exist yet."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Write a private temporary file, then hard-link it into place: concurrent first uses agree on one key and
        # no reader ever sees a half-written file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process created it first: use theirs
        finally:
            tmp.unlink()
    _warn_if_readable_by_others(path)
    return path.read_bytes().strip()


def read_authkey_file(path: str | os.PathLike[str]) -> bytes:
    """Return the key in the file at `path` (its stripped content), for options like ``--authkey-file``.

    Logs a warning when group or other users have any access to the file, and raises ValueError naming the file when
    it holds no key; OSError (e.g. FileNotFoundError) when it cannot be read.
    """
    path = Path(path)
    key = path.read_bytes().strip()
    _warn_if_readable_by_others(path)
    if not key:
        raise ValueError(f"empty authkey in the key file {path}")
    return key


def _warn_if_readable_by_others(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & 0o077:
        log.warning("authkey file %s is readable by other users (mode %o); chmod 600 it", path, mode & 0o777)


def server_handshake(sock: socket.socket, authkey: bytes, timeout: float = 5.0, *, hello_timeout: float | None = None,
                     version: int = PROTOCOL_VERSION) -> SessionKeys:
    """Authenticate the client on `sock` (and prove our key to it) within `timeout` s, or raise AuthenticationError.

    `hello_timeout`, if shorter, bounds the wait for the client's first frame, so a silent peer is dropped early.
    Returns the server's session keys.
    """
    with _Handshake(sock, authkey, timeout, version) as hs:
        theirs = hs.read(_HELLO, within=hello_timeout)
        (their_version,) = _VERSION.unpack(theirs)
        if their_version != version:
            hs.tell_peer(_VERSION_MISMATCH, _VERSION.pack(version))
            raise ProtocolVersionError(version, their_version)
        our_challenge = secrets.token_bytes(_CHALLENGE_SIZE)
        hs.write(_CHALLENGE, our_challenge)
        response = hs.read(_RESPONSE)
        their_mac, their_challenge = response[:_MAC_SIZE], response[_MAC_SIZE:]
        if not hmac.compare_digest(their_mac, _mac(authkey, _CLIENT_LABEL, our_challenge)):
            hs.tell_peer(_REFUSED, bytes([_REFUSED_WRONG_KEY]))
            raise AuthenticationError("wrong authkey")
        hs.write(_PROOF, _mac(authkey, _SERVER_LABEL, their_challenge, our_challenge))
        hs.read(_WELCOME)
    client_to_server, server_to_client = _session_keys(authkey, their_challenge, our_challenge)
    return SessionKeys(send=server_to_client, recv=client_to_server)


def client_handshake(sock: socket.socket, authkey: bytes, timeout: float = 5.0, *,
                     version: int = PROTOCOL_VERSION) -> SessionKeys:
    """Authenticate to the server on `sock` and check its proof within `timeout` s, or raise AuthenticationError.

    Returns the client's session keys, for ``wire.Channel(sock, keys=...)``.
    """
    with _Handshake(sock, authkey, timeout, version) as hs:
        hs.write(_HELLO, _VERSION.pack(version))
        their_challenge = hs.read(_CHALLENGE)
        our_challenge = secrets.token_bytes(_CHALLENGE_SIZE)
        hs.write(_RESPONSE, _mac(authkey, _CLIENT_LABEL, their_challenge) + our_challenge)
        proof = hs.read(_PROOF)
        if not hmac.compare_digest(proof, _mac(authkey, _SERVER_LABEL, our_challenge, their_challenge)):
            hs.tell_peer(_REFUSED, bytes([_REFUSED_WRONG_KEY]))
            raise AuthenticationError("wrong authkey (the server could not prove it knows our key)")
        hs.write(_WELCOME, b"")
    client_to_server, server_to_client = _session_keys(authkey, our_challenge, their_challenge)
    return SessionKeys(send=client_to_server, recv=server_to_client)


def _session_keys(authkey: bytes, client_challenge: bytes, server_challenge: bytes) -> tuple[bytes, bytes]:
    """(client-to-server, server-to-client) keys: fresh per connection, and a frame reflected back to its sender
    fails, since each direction has its own key."""
    return (_mac(authkey, _CLIENT_TO_SERVER_LABEL, client_challenge, server_challenge),
            _mac(authkey, _SERVER_TO_CLIENT_LABEL, client_challenge, server_challenge))


def _mac(authkey: bytes, label: bytes, *challenges: bytes) -> bytes:
    """HMAC-SHA256 of a role label and challenges; the label keeps a client proof from passing as a server one."""
    return hmac.new(authkey, label + b"".join(challenges), hashlib.sha256).digest()


class _Handshake:
    """Deadline-bounded reads and writes of handshake frames on a raw socket, restoring its timeout afterwards."""

    def __init__(self, sock: socket.socket, authkey: bytes, timeout: float, version: int) -> None:
        if not isinstance(authkey, bytes):
            raise TypeError(f"authkey must be bytes, not {type(authkey).__name__} (see resolve_authkey)")
        if not authkey:
            raise ValueError("empty authkey")
        self.sock = sock
        self.timeout = timeout
        self.version = version
        self.deadline = time.monotonic() + timeout
        self.saved_timeout = sock.gettimeout()

    def __enter__(self) -> _Handshake:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.sock.settimeout(self.saved_timeout)
        except OSError:
            pass  # socket already closed by the caller's error handling: nothing to restore

    def _arm(self) -> None:
        """Give the next socket call only what is left of the whole handshake's deadline."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self._silent()
        self.sock.settimeout(remaining)

    def _silent(self) -> AuthenticationError:
        return AuthenticationError(f"peer silent for {round(self.timeout, 2)} s (handshake not completed in time)")

    def read(self, expected: int, within: float | None = None) -> bytes:
        """Receive the body of one handshake frame of kind `expected`, raising on anything else; `within`, if
        given, is a shorter deadline for this frame alone."""
        if within is None or within >= self.timeout:
            return self._read(expected)
        saved = self.deadline, self.timeout
        self.deadline, self.timeout = min(self.deadline, time.monotonic() + within), within
        try:
            return self._read(expected)
        finally:
            self.deadline, self.timeout = saved

    def write(self, kind: int, body: bytes) -> None:
        """Send one handshake frame before the deadline."""
        frame = _HEADER.pack(MAGIC, kind, len(body)) + body
        try:
            self._arm()
            self.sock.sendall(frame)
        except TimeoutError:
            raise self._silent() from None
        except OSError as e:
            raise AuthenticationError(f"connection closed during handshake ({e})") from None

    def tell_peer(self, kind: int, body: bytes) -> None:
        """Best-effort notice to the peer of why we are giving up, so it can raise a precise error too."""
        try:
            self.write(kind, body)
        except AuthenticationError:
            pass  # the peer is gone or stuck; our own error is what matters now

    def _read(self, expected: int) -> bytes:
        header = self._recv_exact(_HEADER.size, check_magic=True)
        _, kind, length = _HEADER.unpack(header)
        if kind not in _BODY_SIZES or length != _BODY_SIZES[kind]:
            self.tell_peer(_REFUSED, bytes([_REFUSED_BAD_FRAME]))
            raise AuthenticationError(f"malformed handshake frame (kind {kind}, length {length})")
        body = self._recv_exact(length)
        if kind == expected:
            return body
        if kind == _VERSION_MISMATCH:
            raise ProtocolVersionError(self.version, _VERSION.unpack(body)[0])
        if kind == _REFUSED:
            if body[0] == _REFUSED_WRONG_KEY:
                raise AuthenticationError("wrong authkey (the peer refused our proof)")
            raise AuthenticationError("the peer refused our handshake frames as malformed")
        self.tell_peer(_REFUSED, bytes([_REFUSED_BAD_FRAME]))
        raise AuthenticationError(f"unexpected handshake frame {_KIND_NAMES[kind]!r}, "
                                  f"expected {_KIND_NAMES[expected]!r}")

    def _recv_exact(self, size: int, check_magic: bool = False) -> bytes:
        """Read exactly `size` bytes before the deadline; `check_magic` rejects a wrong prefix at its first byte."""
        buf = bytearray()
        while len(buf) < size:
            try:
                self._arm()
                chunk = self.sock.recv(size - len(buf))
            except TimeoutError:
                raise self._silent() from None
            except OSError as e:
                raise AuthenticationError(f"connection closed during handshake ({e})") from None
            if not chunk:
                raise AuthenticationError("connection closed during handshake")
            buf += chunk
            if check_magic and not MAGIC.startswith(bytes(buf[:len(MAGIC)])):
                raise AuthenticationError("bad magic (garbage bytes?)")
        return bytes(buf)
