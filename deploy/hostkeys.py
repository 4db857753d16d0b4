"""Host key checking for deployments: `strict` (the default), `accept-new` (pins on first use) and `insecure`.

Every policy first loads the configured known_hosts file, so a host whose key differs from the one on file always
fails (paramiko raises BadHostKeyException whatever the policy); the policies only differ on hosts not on file.
"""
from __future__ import annotations

import os
import threading
import warnings

import paramiko

from pipeline_cluster.deploy.config import SSHSettings

_pin_lock = threading.Lock()


class UnknownHostKey(paramiko.SSHException):
    """Under `strict`, the server's key is not in known_hosts."""


def host_key_name(host: str, port: int) -> str:
    """The name known_hosts files use: `host`, or `[host]:port` for a port other than 22."""
    return host if port == 22 else f"[{host}]:{port}"


class StrictPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse a host that is not in known_hosts, saying how to add it after checking its fingerprint."""

    def __init__(self, known_hosts: str) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        """Raise UnknownHostKey with the key's fingerprint and the file to add it to."""
        raise UnknownHostKey(
            f"{hostname} is not in {self.known_hosts} (its {key.get_name()} key is {key.fingerprint}); "
            f"after checking that fingerprint, add the key (ssh-keyscan) or use host_key_policy = \"accept-new\"")


def _hashed(known_hosts: str) -> bool:
    """Whether the file stores host names hashed (`|1|salt|hash`, as `ssh-keygen -H` or HashKnownHosts leave it)."""
    try:
        with open(known_hosts) as f:
            return any(line.startswith("|1|") for line in f)
    except OSError:
        return False


class AcceptNewPolicy(paramiko.MissingHostKeyPolicy):
    """OpenSSH's accept-new: trust a host seen for the first time and pin its key into the known_hosts file."""

    def __init__(self, known_hosts: str) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        """Append `hostname keytype base64` to the known_hosts file (0600, directory 0700) and trust the key; the
        name is hashed when the file's entries are."""
        with _pin_lock:  # nodes connect in parallel threads; each line is written whole
            name = paramiko.HostKeys.hash_host(hostname) if _hashed(self.known_hosts) else hostname
            directory = os.path.dirname(self.known_hosts)
            if directory:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(self.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write(f"{name} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)


class InsecurePolicy(paramiko.MissingHostKeyPolicy):
    """Accept an unknown host without pinning it, with a warning: only when the config asks for it."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        """Warn that this connection is open to a man in the middle."""
        warnings.warn(f"host_key_policy = \"insecure\": accepting {hostname}'s unverified {key.get_name()} key "
                      f"{key.fingerprint}; anyone between here and there could impersonate it", RuntimeWarning,
                      stacklevel=2)


def new_client(settings: SSHSettings) -> paramiko.SSHClient:
    """An SSHClient that knows the configured known_hosts and applies the configured policy to unknown hosts."""
    client = paramiko.SSHClient()
    if os.path.exists(settings.known_hosts):
        client.load_host_keys(settings.known_hosts)
    policies = {"strict": StrictPolicy(settings.known_hosts), "accept-new": AcceptNewPolicy(settings.known_hosts),
                "insecure": InsecurePolicy()}
    client.set_missing_host_key_policy(policies[settings.host_key_policy])
    return client
