"""What a deployment can fail with: a bad config file, or one host failing in a named phase."""
from __future__ import annotations

from pipeline_cluster.errors import ClusterError

PHASES = ("connect", "host key", "auth", "ship", "start", "ready", "handshake")


class ConfigError(ValueError):
    """A cluster.toml with problems; `problems` lists every one, each naming its key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems))


class HostError(ClusterError):
    """One host failed: which node and host, in which phase, the exit status and the tail of its remote stderr."""

    def __init__(self, node: str, host: str, phase: str, detail: str, exit_status: int | None = None,
                 stderr_tail: str = "") -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        self.node, self.host, self.phase, self.detail = node, host, phase, detail
        self.exit_status, self.stderr_tail = exit_status, stderr_tail
        text = f"node {node} ({host}): {phase} failed: {detail}"
        if exit_status is not None:
            text += f" (exit status {exit_status})"
        if stderr_tail.strip():
            text += "\n    remote stderr:\n" + "\n".join("    | " + line for line in stderr_tail.rstrip().splitlines())
        super().__init__(text)

    def __reduce__(self) -> tuple[type, tuple]:  # keep the fields when the error is pickled
        return (HostError, (self.node, self.host, self.phase, self.detail, self.exit_status, self.stderr_tail))


def _failed(errors: list[HostError], total: int, outcome: str) -> str:
    return f"{len(errors)} of {total} node(s) failed to start{outcome}:\n" + "\n".join(str(e) for e in errors)


class DeployError(ClusterError):
    """Fewer hosts than needed (min_nodes, default all) came up; `errors` holds one HostError per failed host (the
    others were stopped)."""

    def __init__(self, errors: list[HostError], total: int, needed: int | None = None) -> None:
        self.errors = errors
        need = f" ({total - len(errors)} up, min_nodes = {needed})" if needed not in (None, total) else ""
        super().__init__(_failed(errors, total, need))


class NodesMissing(RuntimeWarning):
    """At least min_nodes came up and the cluster goes on without the others; `errors`: one HostError each."""

    def __init__(self, errors: list[HostError], total: int) -> None:
        self.errors = errors
        super().__init__(_failed(errors, total, f"; going on with the other {total - len(errors)}"))
