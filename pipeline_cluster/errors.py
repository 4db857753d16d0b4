"""Exceptions a user of pipeline_cluster can catch."""
from __future__ import annotations


class ClusterError(RuntimeError):
    """The cluster cannot go on (no node left, an internal actor crashed, the cluster was closed)."""


class StageFailed(ClusterError):
    """A stage ran out of its restart budget (or cannot start at all); the run ends with this error."""

    def __init__(self, stage: str, cause: str, item: object = None, detail: str = "") -> None:
        self.stage, self.cause, self.item, self.detail = stage, cause, item, detail
        text = f"stage {stage!r} failed: {cause}"
        if item is not None:
            text += f" (last item: {item!r:.200})"
        if detail:
            text += f"\n{detail}"
        super().__init__(text)

    def __reduce__(self) -> tuple[type, tuple]:  # keep the fields when the error crosses a process boundary
        return (StageFailed, (self.stage, self.cause, self.item, self.detail))
