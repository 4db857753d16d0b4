"""Which keys a deployment offers a host, in OpenSSH's order, and what became of each when all were refused.

Each identity file first: loaded as is, or (encrypted) through the running ssh-agent's copy of it, found by its
public key (the `.pub` beside it), or else with its passphrase asked on the terminal, once per process. Then,
unless identities_only, the agent's other keys and the default ~/.ssh/id_* files.
"""
from __future__ import annotations

import base64
import getpass
import os
import sys
import threading
from collections.abc import Iterator

import paramiko
from paramiko.auth_strategy import AuthFailure, AuthStrategy, InMemoryPrivateKey

from pipeline_cluster.deploy.config import SSHSettings

DEFAULT_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")

_prompt_lock = threading.Lock()  # nodes connect in parallel threads; one passphrase prompt at a time
_unlocked: dict[str, paramiko.PKey] = {}  # path -> key decrypted with a passphrase typed in this process


class _Key(InMemoryPrivateKey):
    """A key to offer, shown by where it came from."""

    def __init__(self, username: str, pkey: paramiko.PKey, label: str) -> None:
        super().__init__(username, pkey)
        self.label = f"{label} ({pkey.get_name()} {pkey.fingerprint})"

    def __repr__(self) -> str:
        return self.label


def _public_blob(path: str) -> bytes | None:
    """The public key in `path`.pub, if there is one."""
    try:
        with open(path + ".pub") as f:
            return base64.b64decode(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _load(path: str, passphrase: str | None = None) -> paramiko.PKey:
    """The private key in `path`; PasswordRequiredException when it is encrypted and no passphrase is given."""
    try:
        return paramiko.PKey.from_path(path, passphrase.encode() if passphrase is not None else None)
    except TypeError as exc:  # how cryptography says that the key is encrypted
        raise paramiko.PasswordRequiredException(str(exc)) from None


class KeyStrategy(AuthStrategy):
    """Offers a host the keys `settings` allow; `skipped` says why an identity file could not be offered."""

    def __init__(self, settings: SSHSettings, username: str) -> None:
        super().__init__(ssh_config=None)
        self.settings = settings
        self.username = username
        self.skipped: list[str] = []

    def get_sources(self) -> Iterator[_Key]:
        """The keys to try, lazily: a passphrase is asked only when nothing before it worked."""
        try:
            agent = paramiko.Agent()  # no keys when no agent runs
        except paramiko.SSHException as exc:
            self.skipped.append(f"the ssh-agent at $SSH_AUTH_SOCK ({exc})")
            agent = None
        try:
            agent_keys = list(agent.get_keys()) if agent is not None else []
            offered: set[bytes] = set()
            for path in self.settings.identity_files:
                yield from self._file(path, agent_keys, offered)
            if self.settings.identities_only:
                return
            for key in agent_keys:
                yield from self._offer(key, f"agent key {key.comment}".strip(), offered)
            for path in map(os.path.expanduser, DEFAULT_KEYS):
                if os.path.exists(path):
                    yield from self._file(path, agent_keys, offered)
        finally:
            if agent is not None:
                agent.close()

    def _offer(self, key: paramiko.PKey, label: str, offered: set[bytes]) -> Iterator[_Key]:
        """`key`, unless it was offered already."""
        if key.asbytes() not in offered:
            offered.add(key.asbytes())
            yield _Key(self.username, key, label)

    def _file(self, path: str, agent_keys: list[paramiko.AgentKey], offered: set[bytes]) -> Iterator[_Key]:
        """The key in `path`, or the agent's copy of it, or it decrypted with a passphrase typed on the terminal."""
        try:
            key = _unlocked.get(path) or _load(path)
        except paramiko.PasswordRequiredException:
            public = _public_blob(path)
            in_agent = [k for k in agent_keys if k.asbytes() == public]
            if in_agent:
                yield from self._offer(in_agent[0], f"{path}, from the agent", offered)
                return
            if sys.stdin is None or not sys.stdin.isatty():
                found = "not in the agent" if public else f"no {path}.pub to find it in the agent by"
                self.skipped.append(f"{path} (encrypted; {found}; no terminal to ask for its passphrase)")
                return
            unlocked = self._ask(path)
            if unlocked is None:
                return
            key = unlocked
        except (OSError, paramiko.SSHException, ValueError) as exc:
            self.skipped.append(f"{path} (cannot read it: {exc})")
            return
        yield from self._offer(key, path, offered)

    def _ask(self, path: str) -> paramiko.PKey | None:
        """`path` decrypted with a passphrase asked on the terminal (once per process); None if it is wrong."""
        with _prompt_lock:
            if path not in _unlocked:
                try:
                    passphrase = getpass.getpass(f"Enter passphrase for key '{path}': ")
                    _unlocked[path] = _load(path, passphrase)
                except (paramiko.SSHException, ValueError, EOFError):
                    self.skipped.append(f"{path} (the passphrase typed did not open it)")
                    return None
            return _unlocked[path]

    def describe(self, failure: AuthFailure) -> str:
        """What was offered and refused, and what could not be offered, as one line."""
        tried = [f"{source!r} " + ("refused" if str(result) in ("", "Authentication failed.") else f"failed: {result}")
                 for source, result in failure.result]
        parts = [f"tried {'; '.join(tried)}" if tried else "no key to offer"]
        if self.skipped:
            parts.append(f"could not use {'; '.join(self.skipped)}")
        if self.settings.identities_only:
            parts.append("only the identity file(s) are offered (identities_only)")
        return ". ".join(parts)
