"""TOML configuration shared by pipelines and clusters: `[stages.NAME]` tables with `workers` and `supervision`."""
from __future__ import annotations

import os
import sys
from typing import Any
from collections.abc import Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def load_toml(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read a TOML file (or pass a dict through); a syntax error names the file."""
    if isinstance(source, Mapping):
        return dict(source)
    try:
        with open(source, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: {exc}") from None


def stage_overrides(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The `[stages.NAME]` tables of a config, checked to be tables."""
    stages = config.get("stages", {})
    if not isinstance(stages, Mapping) or not all(isinstance(t, Mapping) for t in stages.values()):
        raise ValueError("[stages] must hold one table per stage: [stages.NAME] with workers / supervision")
    return {name: dict(table) for name, table in stages.items()}
