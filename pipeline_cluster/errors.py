"""Exceptions a user of pipeline_cluster can catch."""
from __future__ import annotations


class ClusterError(RuntimeError):
    """The cluster cannot go on (no node left, an internal actor crashed, the cluster was closed)."""


class InputFailed(ClusterError):
    """The input iterable raised. Every item read before that was run to the end (its outputs delivered, its
    failures dead-lettered) before this error reached the caller; `read` says how many there were."""

    def __init__(self, read: int, error: BaseException) -> None:
        self.read, self.error = read, error
        super().__init__(f"the input iterable raised {type(error).__name__}: {error} after {read} item(s); "
                         f"those {read} were run to the end (outputs delivered, failures dead-lettered)")


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
