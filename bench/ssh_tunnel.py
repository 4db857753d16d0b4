"""SSH deployments: `tunnel` against `direct`, and against what one raw SSH channel of the same connection carries.

    sudo .venv/bin/python -m bench.ssh_tunnel [--mib 256] [--small 20000] [--rounds 3]

Needs what the SSH tests need (root, OpenSSH's sshd and ssh): one sshd on 127.0.0.2, one deployed node per mode.
Per round: MiB of 1 MiB items into a stage that returns their size (the bytes cross once, root to node); small
items (ints) through an identity stage; on the tunnel node's own SSH connection, 1 MiB writes into a session
channel running `cat > /dev/null` (paramiko's channel, as the tunnel uses it); and OpenSSH's own client,
`ssh host 'cat > /dev/null' < file`, for the same bytes. Medians of the rounds are printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pipeline_cluster as pc
from tests.sshd import SshLab, Sshd, require_sshd

MIB = 1 << 20


def _size() -> Callable[[bytes], int]:
    def size(item: bytes) -> int:  # defined in a function: shipped by value to the node
        return len(item)
    return size


def _same() -> Callable[[Any], Any]:
    def same(item: Any) -> Any:
        return item
    return same


def big_items(cluster: pc.SSHCluster, mib: int) -> float:
    """MB/s of `mib` 1 MiB items from the root into the node."""
    payload = os.urandom(MIB)
    started = time.perf_counter()
    total = sum(cluster.run([_size()], (payload for _ in range(mib))))
    elapsed = time.perf_counter() - started
    assert total == mib * MIB, total
    return mib * MIB / elapsed / 1e6


def small_items(cluster: pc.SSHCluster, count: int) -> float:
    """Items/s of `count` ints through an identity stage and back."""
    started = time.perf_counter()
    done = sum(1 for _ in cluster.run([_same()], range(count)))
    elapsed = time.perf_counter() - started
    assert done == count, done
    return count / elapsed


def raw_channel(cluster: pc.SSHCluster, mib: int) -> float:
    """MB/s that one session channel of the node's SSH connection carries into `cat > /dev/null`."""
    payload = os.urandom(MIB)
    channel = cluster.deployment.nodes[0].ssh.get_transport().open_session()
    try:
        channel.exec_command("cat > /dev/null")
        started = time.perf_counter()
        for _ in range(mib):
            channel.sendall(payload)
        channel.shutdown_write()
        status = channel.recv_exit_status()
        elapsed = time.perf_counter() - started
    finally:
        channel.close()
    assert status == 0, status
    return mib * MIB / elapsed / 1e6


def openssh_client(lab: SshLab, server: Sshd, mib: int) -> float:
    """MB/s of `ssh host 'cat > /dev/null' < file` (OpenSSH's client, a connection of its own)."""
    payload = lab.tmp / "payload"
    with open(payload, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))
    ssh = ["ssh", "-q", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", str(lab.user_key), "-o",
           f"UserKnownHostsFile={lab.known_hosts}", "-p", str(server.port), f"root@{server.address}", "cat > /dev/null"]
    with open(payload, "rb") as stdin:
        started = time.perf_counter()
        subprocess.run(ssh, stdin=stdin, check=True, timeout=600)
        elapsed = time.perf_counter() - started
    return mib * MIB / elapsed / 1e6


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print one line per figure (medians)."""
    parser = argparse.ArgumentParser(prog="python -m bench.ssh_tunnel", description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="1 MiB items per round (default 256)")
    parser.add_argument("--small", type=int, default=20000, help="small items per round (default 20000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args(argv)
    require_sshd()
    figures: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        lab = SshLab(Path(tmp))
        try:
            server = lab.sshd("127.0.0.2")
            for connect in ("tunnel", "direct"):
                path = lab.config([lab.node(server, "n")], connect=connect)
                with pc.SSHCluster.from_config(path) as cluster:
                    for _ in range(args.rounds):
                        figures.setdefault(f"{connect}: 1 MiB items, MB/s", []).append(big_items(cluster, args.mib))
                        figures.setdefault(f"{connect}: small items/s", []).append(small_items(cluster, args.small))
                        if connect == "tunnel":
                            figures.setdefault("raw SSH channel (same connection), MB/s", []).append(
                                raw_channel(cluster, args.mib))
                            figures.setdefault("OpenSSH client, cat > /dev/null, MB/s", []).append(
                                openssh_client(lab, server, args.mib))
        finally:
            lab.close()
    for name, values in figures.items():
        print(f"{name}: {statistics.median(values):,.0f} (rounds: {', '.join(f'{v:,.0f}' for v in values)})")
    tunnel = statistics.median(figures["tunnel: 1 MiB items, MB/s"])
    raw = statistics.median(figures["raw SSH channel (same connection), MB/s"])
    print(f"tunnel / raw channel: {tunnel / raw:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
