"""The run directories under the runs root, as `pipeline-cluster runs` lists, removes and prunes them."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline_cluster.journal import describe, is_locked
from pipeline_cluster.rundir import runs_root

AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """'90s', '30m', '12h', '7d', '2w' as seconds."""
    match = AGE.match(text.strip())
    if not match:
        raise ValueError(f"an age is a number and a unit (s, m, h, d or w), like 7d; got {text!r}")
    return float(match.group(1)) * SECONDS[match.group(2)]


def list_runs(root: Path | None = None) -> list[dict[str, Any]]:
    """Every run directory, newest first: a durable run as its journal describes it, any other from its stats."""
    root = runs_root() if root is None else root
    if not root.is_dir():
        return []
    runs = []
    for path in root.iterdir():
        if path.is_symlink() or not path.is_dir():
            continue
        info = describe(path) or _plain(path)
        info["changed"] = info.get("updated") or max([entry.stat().st_mtime for entry in path.iterdir()]
                                                     + [path.stat().st_mtime])
        runs.append(info)
    return sorted(runs, key=lambda run: run["started"] or run["changed"], reverse=True)


def _plain(path: Path) -> dict[str, Any]:
    """A run without a journal: what its stats.json says (it cannot be resumed)."""
    try:
        stats = json.loads((path / "stats.json").read_text())
    except (OSError, ValueError):
        stats = {}
    state = "running" if stats.get("running") else "ended" if stats else "-"
    return {"run_id": path.name, "pipeline": stats.get("pipeline"), "started": None, "state": state,
            "complete": None, "total": None, "dead_letters": stats.get("failures"), "path": str(path)}


def format_runs(runs: list[dict[str, Any]]) -> str:
    """The runs as a table."""
    rows = [("RUN", "PIPELINE", "STARTED", "STATE", "INPUTS DONE", "DEAD LETTERS")]
    for run in runs:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(run["started"] or run["changed"]))
        total = "?" if run["total"] is None else run["total"]
        done = "-" if run["complete"] is None else f"{run['complete']}/{total}"
        letters = "-" if run["dead_letters"] is None else str(run["dead_letters"])
        rows.append((run["run_id"], str(run["pipeline"] or "-"), started, run["state"], done, letters))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def remove_run(run_id: str, root: Path | None = None) -> Path:
    """Delete one run directory; a run a driver is running now is refused."""
    root = runs_root() if root is None else root
    path = root / run_id
    if run_id in ("", ".", "..", "latest") or "/" in run_id or not path.is_dir() or path.is_symlink():
        raise FileNotFoundError(f"no run {run_id!r} in {root}")
    if is_locked(path):
        raise RuntimeError(f"run {run_id!r} is running now: stop it first")
    shutil.rmtree(path)
    latest = root / "latest"
    if latest.is_symlink() and not latest.exists():
        latest.unlink()
    return path


def prune_runs(keep: int | None, older_than: float | None, root: Path | None = None) -> list[str]:
    """Remove runs that are neither among the newest `keep` nor changed within `older_than` seconds (either rule
    alone when only one is given); running runs stay. Returns the ids removed."""
    if keep is None and older_than is None:
        raise ValueError("say what to prune: --keep N, --older-than AGE, or both")
    now = time.time()
    removed = []
    for index, run in enumerate(list_runs(root)):
        if keep is not None and index < keep or run["state"] == "running":
            continue
        if older_than is not None and now - run["changed"] < older_than:
            continue
        try:
            remove_run(run["run_id"], root)
        except RuntimeError:  # it started running meanwhile
            continue
        removed.append(run["run_id"])
    return removed
