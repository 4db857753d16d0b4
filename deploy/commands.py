"""`pipeline-cluster deploy check|up|down|status|logs FILE`.

Importing this module is cheap (no paramiko): the CLI builds its parser in every node process too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline_cluster.deploy.config import DeployConfig, NodeSpec


def _config(path: str) -> DeployConfig:
    """The validated config (ConfigError lists every problem)."""
    from pipeline_cluster.deploy.config import load_config

    return load_config(path)


def run_action(args: argparse.Namespace) -> int:
    """Run a deploy subcommand; a bad file exits 2, a failed deployment 1, each with its message on stderr."""
    from pipeline_cluster.deploy.errors import ConfigError, DeployError

    try:
        return args.action_func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _explain(spec: NodeSpec) -> None:
    """Each SSH setting of a node and where it came from (cluster.toml, the ssh_config file, a default)."""
    values = {"host": spec.host, **{f.name: getattr(spec.ssh, f.name) for f in dataclasses.fields(spec.ssh)}}
    for name, value in values.items():
        shown = (", ".join(map(str, value)) or "none") if isinstance(value, tuple) else value
        print(f"      {name:<16} {str(shown):<40} {spec.sources.get(name, 'default')}")


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a cluster.toml without connecting anywhere; --explain shows each node's resolved SSH settings."""
    config = _config(args.file)
    print(f"{args.file}: ok: cluster {config.name!r}, connect = {config.connect!r}, {len(config.nodes)} node(s)")
    for spec in config.nodes:
        jump = f" via {', '.join(map(str, spec.ssh.jump))}" if spec.ssh.jump else ""
        print(f"  {spec.name}: {spec.address}{jump}, python {spec.python}, ship {spec.ship}, "
              f"host keys {spec.ssh.host_key_policy} ({spec.ssh.known_hosts})")
        if args.explain:
            _explain(spec)
    if config.stages:
        print(f"  stage settings for {', '.join(config.stages)}: used by pipelines with those stages, skipped "
              f"(with a warning) by the others")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Start every node, print a line per host, and keep them up until Ctrl-C, SIGTERM or a node is lost (or, with
    --detach, leave them running with a lease and return)."""
    from pipeline_cluster.deploy.cluster import SSHCluster

    config = _config(args.file)
    started = time.monotonic()
    if args.detach:
        return _up_detached(config, args, started)
    cluster = SSHCluster(config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    lost: list = []
    try:
        up = _print_hosts(cluster.hosts, args.json)
        print(f"{up} node(s) up in {time.monotonic() - started:.2f} s (run {cluster.rundir.run_id}, "
              f"connect = {config.connect}); they stop when this command does: Ctrl-C, SIGTERM, or "
              f"`pipeline-cluster deploy down {args.file}`", flush=True)
        while not stop.wait(0.5):
            lost = [link for link in cluster.links if not link.alive]
            if lost:
                break
    finally:
        cluster.close(drain=False)
    for link in lost:
        print(f"node {link.name} lost: {link.lost_reason}", file=sys.stderr)
    return 1 if lost else 0


def _print_hosts(results: list, as_json: bool) -> int:
    """A line per host (or all of them as one JSON line); returns how many came up."""
    if as_json:
        print(json.dumps([{**vars(r), "error": r.error and str(r.error)} for r in results]))
    else:
        for r in results:
            print(f"{r.node}: up on {r.address}, pid {r.pid}, port {r.port}, code {r.ship}, {r.seconds:.2f} s"
                  if r.ok else f"{r.node}: not up ({r.error and r.error.phase} failed), going on without it")
    return sum(r.ok for r in results)


def _up_detached(config: DeployConfig, args: argparse.Namespace, started: float) -> int:
    """`deploy up --detach`: nodes that outlive this command; roots attach with `SSHCluster.attach(FILE)` or
    `pipeline-cluster run --cluster FILE --attach`."""
    from pipeline_cluster.deploy.bootstrap import Deployment
    from pipeline_cluster.rundir import new_run_id

    deployment = Deployment(config, new_run_id())
    deployment.detach()
    up = _print_hosts(deployment.results, args.json)
    print(f"{up} node(s) up, detached, in {time.monotonic() - started:.2f} s (run {deployment.run_id}); each stops "
          f"after {config.idle_timeout:.0f} s with no root, or with `pipeline-cluster deploy down {args.file}`. "
          f"Attach with pc.SSHCluster.attach({args.file!r}) or `pipeline-cluster run ... --cluster {args.file} "
          "--attach`", flush=True)
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    """Start one more node of the file, detached, into a running detached cluster; attached roots take it in."""
    from pipeline_cluster.deploy.bootstrap import RemoteNode, changing_state, read_state
    from pipeline_cluster.deploy.remote import Connector

    config = _config(args.file)
    spec = config.node(args.node)
    state = read_state(config)
    if args.node in state["nodes"]:
        raise SystemExit(f"node {args.node} is in the detached cluster already")
    run_id, authkey = state["run_id"], bytes.fromhex(state["authkey"])
    remote = RemoteNode(spec, config, run_id)
    remote.detach(Connector(), authkey)
    with changing_state(config) as state:
        state["nodes"][args.node] = {"port": remote.result.port, "pid": remote.result.pid, "released": []}
    print(f"{args.node}: up on {spec.address}, pid {remote.result.pid}, port {remote.result.port}; attached roots "
          "take it in within a second")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    """Take a node out of a running detached cluster: every attached root first drains it, then it is stopped."""
    from pipeline_cluster.deploy import hostops
    from pipeline_cluster.deploy.bootstrap import changing_state, read_state

    config = _config(args.file)
    with changing_state(config) as state:
        if args.node not in state["nodes"]:
            raise SystemExit(f"no node {args.node} in the detached cluster; its nodes: {sorted(state['nodes'])}")
        state["nodes"][args.node]["leaving"] = True
        run_id = state["run_id"]
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        state = read_state(config)
        waiting = [pid for pid in state["roots"] if pid not in state["nodes"][args.node]["released"]
                   and _alive(int(pid))]
        if not waiting:
            break
        time.sleep(0.2)
    else:
        print(f"roots {', '.join(waiting)} did not let go of {args.node} within {args.timeout:.0f} s: stopping it "
              "anyway (they move its unfinished items to other nodes)", file=sys.stderr)
    replies = hostops.stop(config, grace=args.grace, only=args.node, run_id=run_id)
    with changing_state(config) as state:
        del state["nodes"][args.node]
    print(f"{args.node}: removed")
    return _print_errors(replies)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _print_errors(replies: list) -> int:
    for reply in replies:
        if reply.error:
            print(f"error: {reply.error}", file=sys.stderr)
    return 1 if any(reply.error for reply in replies) else 0


def cmd_down(args: argparse.Namespace) -> int:
    """Stop every node of the cluster on every host, by pidfile; running it again is harmless."""
    from pipeline_cluster.deploy import hostops
    from pipeline_cluster.deploy.bootstrap import state_file

    config = _config(args.file)
    replies = hostops.stop(config, grace=args.grace)
    state_file(config).unlink(missing_ok=True)  # a detached cluster's key and ports: nothing to attach to now
    for reply in replies:
        for entry in reply.answer or []:
            print(f"{reply.node.name}: pid {entry['pid']} {entry['result']} ({entry['pidfile']})")
    stopped = sum(1 for r in replies for e in r.answer or [] if e["result"] != "not running")
    print(f"{stopped} node process(es) stopped" if stopped else "no node was running")
    return _print_errors(replies)


def cmd_status(args: argparse.Namespace) -> int:
    """Show which nodes of the cluster run on which host."""
    from pipeline_cluster.deploy import hostops

    replies = hostops.status(_config(args.file))
    for reply in replies:
        entries = [e for e in reply.answer or [] if e["node"] == reply.node.name]
        if reply.answer is not None and not entries:
            print(f"{reply.node.name}: not running ({reply.node.address})")
        for entry in entries:
            state = "running" if entry["alive"] else "gone (stale pidfile)"
            print(f"{reply.node.name}: {state}, pid {entry['pid']}, run {entry['run']} ({reply.node.address})")
    return _print_errors(replies)


def cmd_logs(args: argparse.Namespace) -> int:
    """Print the tail of each node's log (its stderr) from the latest run, or from --run."""
    from pipeline_cluster.deploy import hostops

    config = _config(args.file)
    try:
        if args.follow:
            return _follow(config, args)
        replies = hostops.logs(config, args.node, args.lines, args.run)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    for reply in replies:
        if reply.answer is not None:
            where = f"run {reply.answer['run']}" if reply.answer["run"] else "no log yet"
            print(f"==> {reply.node.name} ({reply.node.address}), {where} <==")
            print(reply.answer["text"], end="" if reply.answer["text"].endswith("\n") else "\n")
    return _print_errors(replies)


def _follow(config: DeployConfig, args: argparse.Namespace) -> int:
    """Print each node's log lines as they come, prefixed with its name, until Ctrl-C or SIGTERM."""
    from pipeline_cluster.deploy import hostops

    if args.run:
        raise SystemExit("--follow follows the latest run, and newer ones as they start: drop --run")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    lock = threading.Lock()

    def write(node: str, line: str) -> None:
        with lock:
            print(f"{node} | {line}", flush=True)

    def report(reply: hostops.HostReply) -> None:  # a node that cannot be followed is said at once
        if reply.error:
            print(f"error: {reply.error}", file=sys.stderr, flush=True)

    replies = hostops.follow(config, write, stop, args.node, args.lines, report=report)
    return 1 if any(reply.error for reply in replies) else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `deploy` and its subcommands to the CLI."""
    deploy = sub.add_parser("deploy", help="start nodes over SSH from a cluster.toml, stop them, inspect them",
                            description="Bring up, stop and inspect the nodes listed in a cluster.toml over SSH. "
                                        "Programs use pc.SSHCluster.from_config(FILE) or `pipeline-cluster run "
                                        "--cluster FILE`; nodes never outlive the process that started them.")
    actions = deploy.add_subparsers(dest="action", required=True)
    check = actions.add_parser("check", help="validate the file without connecting; names every bad key")
    check.add_argument("--explain", action="store_true",
                       help="show each node's SSH settings and where each came from (cluster.toml, ssh_config)")
    up = actions.add_parser("up", help="start every node and keep them up until Ctrl-C or SIGTERM")
    up.add_argument("--json", action="store_true", help="print the per-host results as one JSON line")
    up.add_argument("--detach", action="store_true",
                    help="leave the nodes running after this command, each until [cluster].idle_timeout passes "
                         "with no root (default 30 min); roots attach with `run --cluster FILE --attach`")
    add = actions.add_parser("add", help="start NODE (a [[node]] of FILE) in a running detached cluster")
    add.add_argument("file", metavar="FILE", help="the cluster.toml")
    add.add_argument("node", help="the node's name in FILE")
    remove = actions.add_parser("remove", help="take NODE out of a running detached cluster, drained first")
    remove.add_argument("file", metavar="FILE", help="the cluster.toml")
    remove.add_argument("node", help="the node's name")
    remove.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for attached roots to drain it (default 120)")
    remove.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL (default 10)")
    down = actions.add_parser("down", help="stop the cluster's nodes on every host, by pidfile (idempotent)")
    down.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL (default 10)")
    status = actions.add_parser("status", help="which nodes run on which host")
    logs = actions.add_parser("logs", help="the tail of each node's log from the latest run")
    logs.add_argument("--node", default=None, help="only this node")
    logs.add_argument("--lines", type=int, default=50, help="lines per node (default 50)")
    logs.add_argument("--run", default=None, help="a run id (default: the latest run)")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="go on printing what the nodes log, and newer runs' logs as they start, until Ctrl-C")
    for parser, func in ((check, cmd_check), (up, cmd_up), (down, cmd_down), (status, cmd_status),
                         (logs, cmd_logs)):
        parser.add_argument("file", metavar="FILE", help="the cluster.toml")
        parser.set_defaults(func=run_action, action_func=func)
    add.set_defaults(func=run_action, action_func=cmd_add)
    remove.set_defaults(func=run_action, action_func=cmd_remove)
