"""Log records as they travel between processes: plain data, cheap to pickle, formatted as one line."""
from __future__ import annotations

import logging
import time
from typing import NamedTuple


class Record(NamedTuple):
    """One log line as it travels between processes: plain data, cheap to pickle."""

    created: float
    level: int
    logger: str
    message: str
    node: str | None
    pid: int
    stage: str | None

    def format(self) -> str:
        """Render as one line: time, level, node, pid, stage, message."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created))
        millis = int((self.created % 1) * 1000)
        where = f"node={self.node or '-'} pid={self.pid} stage={self.stage or '-'}"
        return f"{stamp}.{millis:03d} {logging.getLevelName(self.level):<7} {where} [{self.logger}] {self.message}"
