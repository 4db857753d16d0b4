"""The `pipeline-cluster` (alias `pcluster`) command line: demo, run, stats/benchmark, and the server roles."""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import sys
import threading
import time
from typing import Any
from collections.abc import Iterable, Iterator

from tqdm import tqdm

from pipeline_cluster.deploy import commands as deploy_commands


def _progress(iterable: Iterable[Any], total: int | None, desc: str) -> Iterable[Any]:
    """A tqdm bar on a terminal; nothing when output is piped."""
    return tqdm(iterable, total=total, desc=desc, unit="item", disable=not sys.stderr.isatty(), leave=False)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the word-count example on the local cluster and print per-stage stats."""
    import pipeline_cluster as pc
    from pipeline_cluster import demo as wordcount
    from pipeline_cluster.stats import format_table

    started = time.monotonic()
    counts: collections.Counter = collections.Counter()
    with pc.LocalCluster(workers=args.workers) as cluster:
        inputs = _progress(wordcount.sentences(args.count), args.count, "sentences fed")
        for word in cluster.run(wordcount.pipeline, inputs):
            counts[word] += 1
        stats = cluster.stats()
        said = cluster.verdict()
        run_dir = cluster.rundir.path
    elapsed = time.monotonic() - started
    print(f"demo: {args.count} sentences -> {sum(counts.values())} words in {elapsed:.2f} s")
    print("top words:", ", ".join(f"{w} {n}" for w, n in counts.most_common(8)))
    print(format_table(stats))
    print(said)
    print(f"run directory: {run_dir}")
    return 0


def _load_attr(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise SystemExit(f"expected module:attr, got {spec!r}")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _lines(path: str) -> Iterator[str]:
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
    with stream:
        for line in stream:
            yield line.rstrip("\n")


def cmd_run(args: argparse.Namespace) -> int:
    """Run a user's pipeline over the lines of a file, writing outputs as JSON lines. With --output FILE the run
    is durable: its id is printed, and `--resume ID` goes on with it after a crash."""
    import pipeline_cluster as pc
    from pipeline_cluster.journal import IdentityChanged, RunExists, RunLocked
    from pipeline_cluster.rundir import new_run_id, runs_root

    sys.path.insert(0, ".")
    pipeline = _load_attr(args.pipeline)
    if callable(pipeline) and not isinstance(pipeline, (list, pc.Pipeline)):
        pipeline = pipeline()
    if args.cluster and args.workers is not None:
        raise SystemExit("--workers is for the local cluster: with --cluster, set workers in the cluster file")
    if args.cluster and args.connect:
        raise SystemExit("give --cluster or --connect, not both")
    if args.attach and not args.cluster:
        raise SystemExit("--attach goes with --cluster FILE (the file `deploy up --detach` started)")
    run_id = args.resume or args.run_id
    if args.resume and not (runs_root() / args.resume / "journal.sqlite").exists():
        raise SystemExit(f"no run {args.resume!r} to resume in {runs_root()}: start it with --run-id {args.resume}")
    to_file = args.output not in (None, "-")
    if to_file and run_id is None:
        run_id = new_run_id()
    if run_id is not None:
        print(f"run {run_id} (after a crash, go on with --resume {run_id})", file=sys.stderr)
    if args.force and not args.resume:
        raise SystemExit("--force goes with --resume ID")
    options: dict[str, Any] = {"run_id": run_id, "resume": ("force" if args.force else True) if args.resume else False}
    try:
        return _run_and_report(args, pipeline, options, to_file)
    except (RunExists, IdentityChanged, RunLocked) as exc:
        raise SystemExit(f"error: {exc}") from None


def _run_and_report(args: argparse.Namespace, pipeline: Any, options: dict[str, Any], to_file: bool) -> int:
    import pipeline_cluster as pc
    from pipeline_cluster.stats import format_table

    with _cluster(args) as cluster:
        if to_file:
            encode = _line_and_output if args.ordered else _json_or_repr
            sink = pc.sinks.JsonLines(args.output, encode=encode)
            cluster.run(pipeline, _lines(args.input), ordered=args.ordered, keyed=args.ordered, sink=sink,
                        progress=sys.stderr.isatty(), **options)
        else:
            results = cluster.run(pipeline, _lines(args.input), ordered=args.ordered, keyed=args.ordered,
                                  **options)
            for output in _progress(results, None, "outputs"):
                print(_line_and_output(output) if args.ordered else _json_or_repr(output))
        stats = cluster.stats()
        said = cluster.verdict()
        failures = cluster.status()["failures"]
        where = ("the run's journal (pipeline-cluster runs)" if options["run_id"] else
                 "dead_letters.jsonl in the run directory")
    print(format_table(stats), file=sys.stderr)
    print(said, file=sys.stderr)
    if failures:
        print(f"{failures} item(s) failed: see {where}", file=sys.stderr)
    return 1 if failures else 0


def _cluster(args: argparse.Namespace) -> Any:
    """The cluster `run` asked for: SSH nodes from a file, running node servers, or this machine."""
    import pipeline_cluster as pc

    if args.cluster:
        return pc.SSHCluster.attach(args.cluster) if args.attach else pc.SSHCluster.from_config(args.cluster)
    if args.connect:
        return pc.Cluster.connect([_address(text) for text in args.connect])
    return pc.LocalCluster(workers=args.workers)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--connect takes HOST:PORT, got {text!r}")
    return host, int(port)


def _json_or_repr(output: Any) -> str:
    return json.dumps(output, default=repr)


def _line_and_output(pair: tuple[int, Any]) -> str:
    """An ordered run's output with its input line (from 1)."""
    return json.dumps({"line": pair[0] + 1, "output": pair[1]}, default=repr)


def cmd_runs(args: argparse.Namespace) -> int:
    """List runs, or remove some (`runs rm ID...`, `runs prune --keep N --older-than AGE`)."""
    from pipeline_cluster import runs

    if args.action == "rm":
        if not args.ids:
            raise SystemExit("runs rm needs the id of the run(s) to remove")
        for run_id in args.ids:
            try:
                print(f"removed {runs.remove_run(run_id)}")
            except (FileNotFoundError, RuntimeError) as exc:
                raise SystemExit(str(exc)) from None
        return 0
    if args.action == "prune":
        try:
            older = runs.parse_age(args.older_than) if args.older_than else None
            removed = runs.prune_runs(args.keep, older)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        print(f"removed {len(removed)} run(s)" + (": " + ", ".join(removed) if removed else ""))
        return 0
    if args.action is not None:
        raise SystemExit(f"unknown runs action {args.action!r}: use rm or prune (or nothing, to list)")
    listed = runs.list_runs()
    print(runs.format_runs(listed) if listed else f"no runs in {runs.runs_root()}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Print the per-stage stats summary of a run (the latest by default)."""
    from pipeline_cluster.rundir import find_run

    path = find_run(args.run)
    snapshot = json.loads((path / "stats.json").read_text())
    if args.json:
        print(json.dumps(snapshot, indent=2))
        return 0
    print(_summary(path.name, snapshot))
    return 0


def _summary(name: str, snapshot: dict[str, Any]) -> str:
    """A run's stats snapshot as text: a heading, the per-stage table and the verdict."""
    from pipeline_cluster.stats import format_table

    state = "running" if snapshot.get("running") else "finished"
    done = snapshot.get("inputs_complete")
    total = snapshot.get("inputs_total")
    inputs = "" if done is None else f", {done}/{'?' if total is None else total} input(s) complete"
    lines = [f"run {name} ({state}): pipeline {snapshot.get('pipeline')}, {snapshot.get('failures', 0)} failure(s)"
             + inputs,
             format_table(snapshot["stages"])]
    if snapshot.get("verdict"):
        lines.append(snapshot["verdict"])
    return "\n".join(lines)


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Serve the dashboard of a run in another process, from the stats.json it rewrites every 2 s (Ctrl-C stops)."""
    from pipeline_cluster.dashboard import Dashboard
    from pipeline_cluster.rundir import find_run

    path = find_run(args.run)

    def figures() -> dict[str, Any]:
        snapshot = json.loads((path / "stats.json").read_text())
        nodes = snapshot.get("node_figures", [])
        return {"run_id": snapshot.get("run_id", path.name), "pipeline": snapshot.get("pipeline"),
                "phase": "running" if snapshot.get("running") else "finished", "stages": snapshot["stages"],
                "verdict": snapshot.get("verdict"), "node_figures": nodes,
                "nodes": [node["node"] for node in nodes if node["state"] != "lost"],
                "ready_nodes": [node["node"] for node in nodes if node["state"] == "ready"]}

    dashboard = Dashboard(figures, args.address)
    print(f"dashboard of run {path.name}: {dashboard.url}", flush=True)
    try:
        threading.Event().wait()
    finally:
        dashboard.close()
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    """Redraw a run's per-stage table and verdict every second until the run ends (or Ctrl-C)."""
    from pipeline_cluster.rundir import find_run

    path = find_run(args.run)
    while True:
        try:
            snapshot = json.loads((path / "stats.json").read_text())
            text = _summary(path.name, snapshot)
        except (FileNotFoundError, json.JSONDecodeError):
            snapshot, text = {"running": True}, f"run {path.name}: no stats yet"
        if sys.stdout.isatty():
            print("\x1b[H\x1b[2J", end="")  # redraw in place
        print(time.strftime("%H:%M:%S"), text, sep="  ", flush=True)
        if args.once or not snapshot.get("running"):
            return 0
        time.sleep(args.interval)


def cmd_node(args: argparse.Namespace) -> int:
    """Serve as a node: host stages for roots that connect with the shared authkey."""
    from pipeline_cluster.transport import server

    log_addr = (args.log_host, args.log_port) if args.log_port else None
    return server.main(args.host, args.port, log_addr, args.authkey_file, args.workers, args.stdin_config,
                       args.placement)


def cmd_log(args: argparse.Namespace) -> int:
    """Serve as the log server, appending every record to a file."""
    from pipeline_cluster.logs.server import LogServer

    from pipeline_cluster.transport.auth import read_authkey_file

    key = read_authkey_file(args.authkey_file) if args.authkey_file else None
    server = LogServer((args.host, args.port), args.outfile, key)
    print(f"PCREADY {json.dumps({'host': server.address[0], 'port': server.address[1]})}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
    return 0


def cmd_bench(argv: list[str]) -> int:
    """Run the benchmark harness (the repo's bench/ folder: run it from a checkout) with its own options."""
    sys.path.insert(0, os.getcwd())
    try:
        from bench.harness import main as bench_main
    except ImportError:
        print("error: the benchmark lives in the repository's bench/ folder, not in the installed package; "
              "run `pipeline-cluster bench` (or `python -m bench`) from a checkout", file=sys.stderr)
        return 2
    return bench_main(argv)


WORKERS_HELP = "worker processes per stage (default: the CPUs this process may use)"


def build_parser() -> argparse.ArgumentParser:
    """All subcommands and their options."""
    parser = argparse.ArgumentParser(prog="pipeline-cluster",
                                     description="Run pipelines of Python functions over streams of items.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the word-count example on this machine and print per-stage stats",
                          description="Split sentences into words (generator stage), normalise them (class stage "
                                      "with args), drop stop words (a stage returning None), on the local cluster.")
    demo.add_argument("--count", type=int, default=3000, help="number of input sentences (default 3000)")
    demo.add_argument("--workers", type=int, default=None, help=WORKERS_HELP)
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="run module:attr over the lines of a file, outputs as JSON lines",
                         description="module:attr names a pc.Pipeline, a list of stages, or a function returning "
                                     "one. Each input line (without its newline) is one item.")
    run.add_argument("pipeline", metavar="module:attr")
    run.add_argument("--input", required=True, help="input file, one item per line ('-' for stdin)")
    run.add_argument("--output", default=None, help="output file for JSON lines (default stdout)")
    run.add_argument("--workers", type=int, default=None, help=WORKERS_HELP)
    run.add_argument("--ordered", action="store_true",
                     help='outputs in input order, each as {"line": N, "output": ...} (N: its input line, from 1)')
    run.add_argument("--cluster", default=None, metavar="FILE",
                     help="run on the nodes of this cluster.toml, started over SSH (default: this machine)")
    run.add_argument("--attach", action="store_true",
                     help="with --cluster: use the nodes `deploy up --detach FILE` started (they keep running)")
    run.add_argument("--connect", action="append", default=[], metavar="HOST:PORT",
                     help="run on this running node server (`pipeline-cluster node`); repeat for more")
    durable = run.add_mutually_exclusive_group()
    durable.add_argument("--run-id", default=None, metavar="ID",
                         help="name the run (a journal in its run directory records what is done; with --output "
                              "FILE every run has one)")
    durable.add_argument("--resume", default=None, metavar="ID",
                         help="go on with run ID after a crash: complete inputs are skipped and --output is cut "
                              "back to its last commit, so it holds each output exactly once")
    run.add_argument("--force", action="store_true",
                     help="with --resume: go on even though the pipeline's code or settings changed")
    run.set_defaults(func=cmd_run)

    runs = sub.add_parser("runs", help="list runs (state, inputs done, dead letters), or remove them",
                          description="`runs` lists the runs under the runs directory, newest first; `runs rm ID` "
                                      "removes one; `runs prune --keep N --older-than 7d` removes runs that are "
                                      "neither among the newest N nor changed within 7 days. Running runs stay.")
    runs.add_argument("action", nargs="?", choices=["rm", "prune"], default=None)
    runs.add_argument("ids", nargs="*", help="run ids (for rm)")
    runs.add_argument("--keep", type=int, default=None, help="prune: keep the newest N runs")
    runs.add_argument("--older-than", default=None, metavar="AGE",
                      help="prune: remove runs not changed for AGE (90s, 30m, 12h, 7d, 2w)")
    runs.set_defaults(func=cmd_runs)

    node = sub.add_parser("node", help="run a node server that roots connect to",
                          description="Host the stages of a pipeline for a root (pc.Cluster.connect or "
                                      "pipeline_cluster.root.Root). Connections must prove the shared authkey: "
                                      "--authkey-file, else $PIPELINE_CLUSTER_AUTHKEY, else "
                                      "~/.config/pipeline_cluster/authkey. Prints 'PCREADY {json}' when listening.")
    node.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    node.add_argument("--port", type=int, default=5600, help="port (0: any free port; default 5600)")
    node.add_argument("--log-host", default="127.0.0.1", help="log server address")
    node.add_argument("--log-port", type=int, default=None, help="log server port (default: logs go to the root)")
    node.add_argument("--authkey-file", default=None, help="file holding the shared authkey")
    node.add_argument("--workers", type=int, default=None, help=WORKERS_HELP)
    node.add_argument("--placement", action="store_true",
                      help="run the node's own threads on one CPU, beside lone short batches (see the README)")
    node.add_argument("--stdin-config", action="store_true",
                      help='read {"authkey": HEX, "run_dir": PATH} as one JSON line from stdin; serve one root and '
                           "exit when it is gone or stdin closes (how `deploy` starts nodes)")
    node.set_defaults(func=cmd_node)

    logp = sub.add_parser("log", help="run a log server writing every process's records to a file",
                          description="The seed's log server: authenticated connections, one line per record.")
    logp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    logp.add_argument("--port", type=int, default=5555, help="port (default 5555)")
    logp.add_argument("--outfile", required=True, help="file to append log lines to")
    logp.add_argument("--authkey-file", default=None, help="file holding the shared authkey")
    logp.set_defaults(func=cmd_log)

    deploy_commands.add_parser(sub)

    bench = sub.add_parser("bench", help="benchmark against multiprocessing.Pool and a plain loop (W1-W6)",
                           description="Runs bench/ (python -m bench); every argument after 'bench' goes to it, "
                                       "e.g. pipeline-cluster bench --workloads W1,W4 --rounds 3 --json out.json. "
                                       "Needs psutil (pip install 'pipeline_cluster[bench]').", add_help=False)
    bench.add_argument("options", nargs=argparse.REMAINDER, help="options of the harness (see bench --help)")

    for name in ("stats", "benchmark"):
        stats = sub.add_parser(name, help="per-stage stats of a run (the latest by default)",
                               description="Read stats.json from a run directory and print the per-stage summary.")
        stats.add_argument("run", nargs="?", default=None, help="run id or run directory (default: latest)")
        stats.add_argument("--json", action="store_true", help="print the raw JSON")
        stats.set_defaults(func=cmd_stats)

    dash = sub.add_parser("dashboard", help="serve the live dashboard of a run in another process",
                          description="Serve the dashboard page, /api/stats and /metrics of a run (the latest by "
                                      "default) from the stats.json its cluster rewrites every 2 s.")
    dash.add_argument("run", nargs="?", default=None, help="run id or run directory (default: latest)")
    dash.add_argument("--address", default="127.0.0.1:8787",
                      help="host:port to serve on (default 127.0.0.1:8787; port 0 picks a free one; any other host "
                           "than loopback needs the printed token)")
    dash.set_defaults(func=cmd_dashboard)

    top = sub.add_parser("top", help="watch a run's per-stage table and verdict, redrawn every second",
                         description="Read stats.json of a run (the latest by default), which a running cluster "
                                     "rewrites every 2 s, and redraw it until the run ends; works over SSH and in "
                                     "tmux.")
    top.add_argument("run", nargs="?", default=None, help="run id or run directory (default: latest)")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between redraws (default 1)")
    top.add_argument("--once", action="store_true", help="print once and exit")
    top.set_defaults(func=cmd_top)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `pipeline-cluster` and `pcluster`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the harness parses its own options, --help included
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
