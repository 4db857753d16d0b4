"""Dead letters: items that failed for good, with everything needed to understand and re-feed them."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class DeadLetter:
    """One failed item: where it failed, how often, and why (exception, crash, timeout or node_lost)."""

    item: Any
    stage: str
    stage_index: int
    attempts: int
    cause: str
    error_type: str | None = None
    message: str = ""
    traceback: str = ""
    node: str | None = None
    pid: int | None = None
    exit_code: int | None = None
    signal: str | None = None
    time: float = field(default_factory=time.time)
    rid: int | None = None
    refeedable: bool = True  # False when `item` is only a repr (the item itself could not be pickled)

    def to_json(self) -> str:
        """One JSON line for the run directory's dead-letter file (the item as its repr when not JSON)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}  # not asdict: it deep-copies the item
        try:
            json.dumps(data["item"])
        except (TypeError, ValueError):
            data["item"] = repr(self.item)
        return json.dumps(data)
