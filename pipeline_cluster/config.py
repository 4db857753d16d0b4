"""TOML configuration shared by pipelines and clusters: `[stages.NAME]` tables with `workers` and `supervision`.

A file is checked as a whole, so one error names every bad key (with a "did you mean" where a known name is close);
`deploy/config.py` uses the same helpers for cluster.toml.
"""
from __future__ import annotations

import difflib
import logging
import os
import sys
from typing import Any
from collections.abc import Callable, Iterable, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger("pipeline_cluster.config")

Check = Callable[[Any], "str | None"]  # a value checker: a problem text, or None when the value is fine


class Config(dict):
    """A parsed TOML file that remembers where it came from, so later checks can name the file."""

    def __init__(self, values: Mapping[str, Any], source: str) -> None:
        super().__init__(values)
        self.source = source


def load_toml(source: str | os.PathLike | Mapping[str, Any]) -> Config:
    """Read a TOML file (or pass a dict through); a syntax error names the file."""
    if isinstance(source, Mapping):
        return Config(source, getattr(source, "source", "<dict>"))
    try:
        with open(source, "rb") as f:
            return Config(tomllib.load(f), str(source))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: {exc}") from None


def close_match(key: Any, known: Iterable[str]) -> str | None:
    """The known name `key` is most likely a typo of, if any."""
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(key: Any, known: Iterable[str], show: Callable[[str], str] = repr) -> str:
    """` (did you mean 'x'?)` for a near miss, else the known names: a typo gets its fix, not just a rejection."""
    known = list(known)
    close = close_match(key, known)
    return f" (did you mean {show(close)}?)" if close else f"; known: {', '.join(show(k) for k in sorted(known))}"


def positive_int(value: Any) -> str | None:
    """A `Check` for counts such as workers."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return None if ok else f"must be a positive integer, got {value!r}"


def worker_count(value: Any) -> str | None:
    """A `Check` for a stage's workers: a positive integer, "auto", or [min, max]."""
    if value == "auto" or positive_int(value) is None:
        return None
    if (isinstance(value, (list, tuple)) and len(value) == 2 and all(positive_int(v) is None for v in value)
            and value[0] <= value[1]):
        return None
    return f'must be a positive integer, "auto" or [min, max], got {value!r}'


class Problems:
    """Every problem of one file, collected instead of stopping at the first; each is `where: text`."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, text: str) -> None:
        self.items.append(f"{where}: {text}")

    def table(self, where: str, table: Any, keys: Mapping[str, Check]) -> dict[str, Any]:
        """Check a table against its known keys; return its good entries."""
        if not isinstance(table, Mapping):
            self.add(where, f"must be a table, got {type(table).__name__}")
            return {}
        good = {}
        for key, value in table.items():
            if key not in keys:
                self.add(f"{where}.{key}", "unknown key" + did_you_mean(key, keys))
                continue
            problem = keys[key](value)
            if problem:
                self.add(f"{where}.{key}", problem)
            else:
                good[key] = value
        return good

    def top_level(self, config: Mapping[str, Any], known: Iterable[str],
                  show: Callable[[str], str] = lambda name: f"[{name}]") -> None:
        """Unknown top-level keys, each named as written (`[stage.Tagger]`, `foo`) with the closest known table."""
        known = list(known)
        for key, value in config.items():
            if key in known:
                continue
            if isinstance(value, Mapping):
                nested = bool(value) and all(isinstance(v, Mapping) for v in value.values())
                headers = [f"[{key}.{sub}]" for sub in value] if nested else [f"[{key}]"]
                text = f"unknown table {', '.join(headers)}"
            elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
                text = f"unknown table [[{key}]]"
            else:
                text = "unknown key"
            self.add(str(key), text + did_you_mean(key, known, show))

    def stages(self, stages: Any) -> dict[str, dict[str, Any]]:
        """`[stages.NAME]` tables: known keys (`workers`, `supervision` and its fields), valid values."""
        from pipeline_cluster.model import Supervision

        if not isinstance(stages, Mapping):
            self.add("stages", "must hold one table per stage: [stages.NAME] with workers / supervision")
            return {}
        good: dict[str, dict[str, Any]] = {}
        for name, table in stages.items():
            if not isinstance(table, Mapping):
                self.add(f"[stages].{name}", f"must be a table per stage, [stages.NAME], got {table!r}")
                continue
            where = f"[stages.{name}]"
            good[name] = self.table(where, table, {"workers": worker_count, "supervision": lambda _: None})
            supervision = table.get("supervision")
            if supervision is None:
                continue
            if not isinstance(supervision, Mapping):
                self.add(f"{where}.supervision", f"must be a table, got {type(supervision).__name__}")
                continue
            for key, problem in Supervision.check(supervision):  # unknown keys: of the table, as a key of [stages.X]
                self.add(f"{where}.supervision" if key is None else f"[stages.{name}.supervision]", str(problem))
        return good

    def raise_if_any(self, source: str) -> None:
        """One ValueError listing every problem, under the file's name."""
        if self.items:
            raise ValueError(f"{source}: {len(self.items)} problem(s):\n" + "\n".join(f"  {p}" for p in self.items))


def stage_overrides(config: Mapping[str, Any], source: str | None = None) -> Config:
    """The `[stages.NAME]` tables of a pipeline config (its only table), after checking the whole file."""
    source = source if source is not None else str(getattr(config, "source", "<dict>"))
    problems = Problems()
    problems.top_level(config, ("stages",))
    stages = problems.stages(config.get("stages", {}))
    problems.raise_if_any(source)
    return Config(stages, source)
