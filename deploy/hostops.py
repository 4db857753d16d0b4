"""Operations on every node's host from a fresh SSH connection: stop by pidfile, status, logs (`deploy down`...).

They find a cluster's nodes through the pidfiles under `WORKDIR/runs/NAME-FILEHASH` on each host (the cluster's name
and its file's path: two files never share nodes), so they work from any
process, after any crash of the root, and stop nothing that is not a node of that cluster.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any
from collections.abc import Callable

import paramiko

from pipeline_cluster.deploy.bootstrap import in_parallel, runs_dir
from pipeline_cluster.deploy.config import DeployConfig, NodeSpec
from pipeline_cluster.deploy.errors import HostError
from pipeline_cluster.deploy.remote import Connector, run_hostscript, stream_hostscript, tail

# a command on one node's host: (exit status, its answer or None, stderr), as run_hostscript returns them
Command = Callable[[paramiko.SSHClient, NodeSpec], "tuple[int, Any, str]"]


@dataclasses.dataclass
class HostReply:
    """One node's answer (the hostscript's JSON), or why there is none."""

    node: NodeSpec
    answer: Any = None
    error: str | None = None


def on_each_node(config: DeployConfig, command: Command, only: str | None = None,
                 report: Callable[[HostReply], None] = lambda reply: None) -> list[HostReply]:
    """Run `command` on every node's host (or node `only`), in parallel; one reply per node, also given to
    `report` as soon as it is there."""
    nodes = [config.node(only)] if only else list(config.nodes)
    connector = Connector()

    def ask(spec: NodeSpec) -> HostReply:
        try:
            status, answer, err = command(connector.open(spec), spec)
        except HostError as exc:
            reply = HostReply(spec, error=str(exc))
        except (TimeoutError, paramiko.SSHException, OSError) as exc:
            reply = HostReply(spec, error=f"node {spec.name} ({spec.address}): {exc}")
        else:
            reply = HostReply(spec, answer) if status == 0 and answer is not None else HostReply(
                spec, error=f"node {spec.name} ({spec.address}): python {spec.python!r} failed (exit status "
                            f"{status}): {tail(err, 10)}")
        report(reply)
        return reply

    try:
        return in_parallel(nodes, ask)
    finally:
        connector.close()


def _hostscript(args: Callable[[NodeSpec], list[str]], timeout: float) -> Command:
    """The hostscript command `args(spec)`, run with each node's python within `timeout` s."""
    return lambda client, spec: run_hostscript(client, spec.python, *args(spec), timeout=timeout)


def stop(config: DeployConfig, grace: float = 10.0, only: str | None = None,
         run_id: str | None = None) -> list[HostReply]:
    """Stop every node of the cluster on every host (or node `only` of run `run_id`) (SIGTERM, SIGKILL after
    `grace` s), by pidfile; idempotent."""
    def where(spec: NodeSpec) -> str:
        return runs_dir(spec.workdir, config) + (f"/{run_id}/{spec.name}" if only and run_id else "")

    return on_each_node(config, _hostscript(lambda spec: ["stop", where(spec), str(grace)], timeout=grace + 30),
                        only=only)


def status(config: DeployConfig) -> list[HostReply]:
    """The cluster's nodes on every host: run, node, pid, alive."""
    return on_each_node(config, _hostscript(lambda spec: ["status", runs_dir(spec.workdir, config)], 30))


def logs(config: DeployConfig, node: str | None = None, lines: int = 50, run: str | None = None) -> list[HostReply]:
    """The tail of each node's node.log (its stderr), from run `run` or the latest run."""
    return on_each_node(config, _hostscript(lambda spec: ["logs", runs_dir(spec.workdir, config), spec.name,
                                                          str(lines), *([run] if run else [])], 30), only=node)


def follow(config: DeployConfig, write: Callable[[str, str], None], stop: threading.Event, node: str | None = None,
           lines: int = 10, report: Callable[[HostReply], None] = lambda reply: None) -> list[HostReply]:
    """Each node's log as it grows, line by line to `write(node, line)`: the tail of the latest run's, then what
    is appended, and newer runs' logs as they start; until `stop` is set. A node that cannot be followed is given
    to `report` at once."""
    def stream(client: paramiko.SSHClient, spec: NodeSpec) -> tuple[int, Any, str]:
        pending = ""

        def output(text: str) -> None:
            nonlocal pending
            *complete, pending = (pending + text).split("\n")
            for line in complete:
                write(spec.name, line)

        return stream_hostscript(client, spec.python, "follow", runs_dir(spec.workdir, config), spec.name,
                                 str(lines), timeout=spec.ssh.connect_timeout, output=output, stop=stop)

    return on_each_node(config, stream, only=node, report=report)
