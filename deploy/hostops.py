"""Operations on every node's host from a fresh SSH connection: stop by pidfile, status, logs (`deploy down`...).

They find a cluster's nodes through the pidfiles under `WORKDIR/runs/CLUSTER` on each host, so they work from any
process, after any crash of the root, and stop nothing that is not a node of that cluster.
"""
from __future__ import annotations

import dataclasses
from typing import Any
from collections.abc import Callable

import paramiko

from pipeline_cluster.deploy.bootstrap import in_parallel, runs_dir
from pipeline_cluster.deploy.config import DeployConfig, NodeSpec
from pipeline_cluster.deploy.errors import HostError
from pipeline_cluster.deploy.remote import Connector, run_hostscript, tail


@dataclasses.dataclass
class HostReply:
    """One node's answer (the hostscript's JSON), or why there is none."""

    node: NodeSpec
    answer: Any = None
    error: str | None = None


def on_each_node(config: DeployConfig, args: Callable[[NodeSpec], list[str]], timeout: float,
                 only: str | None = None) -> list[HostReply]:
    """Run a hostscript command on every node's host (or node `only`), in parallel; one reply per node."""
    nodes = [config.node(only)] if only else list(config.nodes)
    connector = Connector()

    def ask(spec: NodeSpec) -> HostReply:
        try:
            client = connector.open(spec)
            status, answer, err = run_hostscript(client, spec.python, *args(spec), timeout=timeout)
        except HostError as exc:
            return HostReply(spec, error=str(exc))
        except (TimeoutError, paramiko.SSHException, OSError) as exc:
            return HostReply(spec, error=f"node {spec.name} ({spec.address}): {exc}")
        if status != 0 or answer is None:
            return HostReply(spec, error=f"node {spec.name} ({spec.address}): python {spec.python!r} failed "
                                         f"(exit status {status}): {tail(err, 10)}")
        return HostReply(spec, answer)

    try:
        return in_parallel(nodes, ask)
    finally:
        connector.close()


def stop(config: DeployConfig, grace: float = 10.0) -> list[HostReply]:
    """Stop every node of the cluster on every host (SIGTERM, SIGKILL after `grace` s), by pidfile; idempotent."""
    return on_each_node(config, lambda spec: ["stop", runs_dir(spec.workdir, config.name), str(grace)],
                        timeout=grace + 30)


def status(config: DeployConfig) -> list[HostReply]:
    """The cluster's nodes on every host: run, node, pid, alive."""
    return on_each_node(config, lambda spec: ["status", runs_dir(spec.workdir, config.name)], timeout=30)


def logs(config: DeployConfig, node: str | None = None, lines: int = 50, run: str | None = None) -> list[HostReply]:
    """The tail of each node's node.log (its stderr), from run `run` or the latest run."""
    return on_each_node(config, lambda spec: ["logs", runs_dir(spec.workdir, config.name), spec.name, str(lines),
                                              *([run] if run else [])], timeout=30, only=node)
