"""The benchmark run: parse the command line, run every workload on every system for N interleaved rounds, report.

    python -m bench [--workloads W1,W2,...] [--rounds N] [--scale F] [--json FILE] [--systems local,node,...]

Each trial runs in a fresh process (see bench.trial); within a round every workload runs on every system, with
the systems' order rotated from round to round so machine drift does not always favour the same system.
"""
from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from typing import Any

from . import measure, report
from .workloads import ALL_SYSTEMS, W5_SMALL_INPUTS, WORKLOADS, available_systems, available_workloads, scaled


def _names(text: str, known: list[str] | tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {','.join(known)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The harness's options."""
    epilog = "workloads:\n" + "\n".join(f"  {w.name}  {w.title} ({w.inputs:,} inputs; figure: {w.metric})"
                                        for w in WORKLOADS.values())
    parser = argparse.ArgumentParser(prog="python -m bench", description="Benchmark pipeline_cluster against "
                                     "multiprocessing.Pool and a single-process loop (issue 6's workloads).",
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=None, type=lambda s: _names(s, list(available_workloads()), "workload"),
                        help="comma-separated workloads (default: all whose inputs can be made here; W7 needs numpy, "
                             "from the bench extra)")
    parser.add_argument("--systems", default=None, type=lambda s: _names(s, available_systems(), "system"),
                        help=f"comma-separated systems (default: those installed of {','.join(ALL_SYSTEMS)}; "
                             "ray and raydata need the bench extra)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per workload and system; medians are shown")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every input count (0.01 for a smoke run)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write machine, rows and trials as JSON")
    parser.add_argument("--placement", action="store_true",
                        help="run pipeline_cluster's clusters and node servers with placement=True (the opt-in)")
    return parser


def plan(workloads: list[str], systems: list[str], round_no: int, scale: float,
         placement: bool = False) -> list[dict[str, Any]]:
    """The trial specs of one round: each workload on each applicable system, systems rotated by the round."""
    specs = []
    for name in workloads:
        workload = WORKLOADS[name]
        mine = [s for s in systems if s in workload.systems]
        shift = round_no % len(mine) if mine else 0
        for system in mine[shift:] + mine[:shift]:
            base = {"workload": name, "system": system, "round": round_no, "placement": placement}
            specs.append({**base, "variant": "main", "inputs": scaled(workload.inputs, scale)})
            if name == "W5":
                specs.append({**base, "variant": "small", "inputs": scaled(W5_SMALL_INPUTS, scale)})
            if name == "W10":  # as many inputs, far fewer of them failing
                specs.append({**base, "variant": "small", "inputs": scaled(workload.inputs, scale)})
    return specs


def _progress(trial: dict[str, Any]) -> str:
    where = f"round {trial['round'] + 1} {trial['workload']} {trial['system']} {trial['variant']}"
    if "error" in trial:
        return f"{where}: FAILED {trial['error'].splitlines()[0]}"
    return f"{where}: figure {trial['figure']:.4g}, peak RSS {trial['peak_rss_mb']:.0f} MB, " \
           f"start-up {trial['startup_s']:.3f} s, steal {trial['steal_pct']:.0f}%"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table (Markdown), optionally write JSON; exit 1 if any trial failed."""
    args = build_parser().parse_args(argv)
    args.systems = args.systems or list(available_systems())
    args.workloads = args.workloads or list(available_workloads())
    if args.rounds < 1 or args.scale <= 0:
        raise SystemExit("--rounds must be >= 1 and --scale > 0")
    env = {**os.environ, "PIPELINE_CLUSTER_AUTHKEY": secrets.token_hex(16)}
    machine = measure.machine_facts()
    started = time.monotonic()
    trials: list[dict[str, Any]] = []
    for round_no in range(args.rounds):
        for spec in plan(args.workloads, args.systems, round_no, args.scale, args.placement):
            try:
                result = measure.run_trial(spec, env)
            except RuntimeError as exc:
                result = {"error": str(exc)}
            trials.append({**spec, **result})
            print(_progress(trials[-1]), file=sys.stderr, flush=True)
    rows = report.summarise(trials)
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"{machine['nproc']} CPUs ({machine['cpu']}), Python {machine['python']}, source {machine['source']}, "
          f"{machine['date']}; load average {machine['load_average'][0]} at start, "
          f"{machine['load_average_at_end'][0]} at end; {args.rounds} round(s), scale {args.scale}, "
          f"{time.monotonic() - started:.0f} s")
    print(report.format_table(rows))
    if args.json:
        measure.write_json(args.json, {"machine": machine, "argv": sys.argv if argv is None else argv,
                                       "args": vars(args), "rows": rows, "trials": trials})
    return 1 if any("error" in t for t in trials) else 0
