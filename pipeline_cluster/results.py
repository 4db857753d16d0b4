"""Results: the streaming iterator that `cluster.run(...)` returns."""
from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING, Any, Iterator

from pipeline_cluster.runstate import RunState

if TYPE_CHECKING:
    from pipeline_cluster.cluster import Cluster


class Results:
    """The outputs of `cluster.run(...)`, in completion order; leaving the loop early (or `close()`) stops the run."""

    def __init__(self, cluster: "Cluster", state: RunState) -> None:
        self._current: list[list] = [[]]  # the batch being handed out, so close() can cut it short
        self._batches = _batches(cluster, state, self._current)
        self._outputs = chain.from_iterable(self._batches)  # C-level per output: Python runs once per batch

    def __iter__(self) -> Iterator[Any]:
        return self._outputs  # a for loop drives the iterator itself: no wrapper call per output

    def __next__(self) -> Any:
        return next(self._outputs)

    def close(self) -> None:
        """Stop the run now (unfinished items are dropped) and stop its workers; iteration ends at once."""
        self._current[0].clear()  # the batch's list iterator inside chain stops at its next step
        self._batches.close()


def _batches(cluster: "Cluster", state: RunState, current: list[list]) -> Iterator[list]:
    """Yield lists of outputs until every input is done; a root item's outputs count as consumed once the caller
    asks for what follows them. A module-level generator, so nothing refers back to it: when the caller's loop lets
    go of it (break, an exception), CPython closes it at once and its finally stops the run."""
    finished = False
    try:
        while True:
            with state.cond:
                if state.error is not None:
                    raise state.error
                if state.inputs_done and state.all_consumed():
                    finished = True
                    return
            message = state.next_output()
            if message[0] == "out":
                current[0] = message[1]
                yield message[1]
                state.change(consumed=message[2])
    finally:
        if cluster._phase == "running" and cluster.state is state:
            cluster._finish_run(graceful=finished)
