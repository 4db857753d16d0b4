"""The run directory: one per cluster run, holding its log, stats snapshot and dead letters."""
from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from pipeline_cluster.messages import DeadLetter


def runs_root() -> Path:
    """Where runs live by default: $XDG_CACHE_HOME or ~/.cache, then pipeline_cluster/runs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pipeline_cluster" / "runs"


def new_run_id() -> str:
    """A sortable, unique run id: date, time and a random suffix."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class RunDir:
    """Files of one run: log.txt, stats.json, dead_letters.jsonl."""

    def __init__(self, path: str | os.PathLike | None = None, run_id: str | None = None) -> None:
        self.run_id = run_id or new_run_id()
        if path is None:
            root = runs_root()
            self.path = root / self.run_id
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            latest = root / "latest"
            try:
                tmp = root / f".latest-{self.run_id}"
                tmp.symlink_to(self.run_id)
                os.replace(tmp, latest)
            except OSError:
                pass
        else:  # the user's own directory: made private if we create it, left as it is otherwise
            self.path = Path(path)
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)

    @property
    def log_file(self) -> Path:
        """The cluster log."""
        return self.path / "log.txt"

    @property
    def stats_file(self) -> Path:
        """The stats snapshot."""
        return self.path / "stats.json"

    @property
    def dead_letter_file(self) -> Path:
        """Dead letters, one JSON object a line."""
        return self.path / "dead_letters.jsonl"

    def write_stats(self, snapshot: dict[str, Any]) -> None:
        """Replace stats.json atomically, so a reader never sees half a file."""
        tmp = self.stats_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(snapshot, indent=2, default=str))
        os.replace(tmp, self.stats_file)

    def append_dead_letters(self, letters: Iterable[DeadLetter]) -> None:
        """Add dead letters to the run's file."""
        with open(self.dead_letter_file, "a", encoding="utf-8") as f:
            for letter in letters:
                f.write(letter.to_json() + "\n")


def find_run(run: str | None = None) -> Path:
    """A run directory by id or path; the latest run when `run` is None."""
    if run and Path(run).is_dir():
        return Path(run)
    path = runs_root() / (run or "latest")
    if not path.exists():
        raise FileNotFoundError(f"no run directory {path}" + ("" if run else " (no run yet)"))
    return path.resolve()
