"""The older project's interface, kept working (not deprecated): `Root(*node_addrs)` and the single-machine
`pipeline.Pipeline`.

Its module paths stay too: `pipeline_cluster.root`, `pipeline_cluster.node` and
`pipeline_cluster.multiprocess_logging` re-export from here and from the modules that do the work.
"""
from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pipeline_cluster.cluster import Cluster
from pipeline_cluster.errors import ClusterError


def Root(*node_addrs: tuple[str, int], **options: Any) -> Cluster:
    """Connect to node servers; the result has setup/boot/feed/wait_input/wait_empty/sleep/wakeup/status/reset."""
    return Cluster.connect(node_addrs, **options)


class SeedPipeline:
    """The older project's single-machine pipeline (`pipeline_cluster.pipeline.Pipeline`), on a LocalCluster.

    Tasks are added one by one, `boot(n_worker)` starts `n_worker` workers per task, outputs collect until
    `get_output()` takes them. `log_addr` is the log server that the cluster's log (task logs included) is also
    sent to; `benchmark_folder` is accepted for old scripts and means nothing here (stats go to the run directory).
    """

    def __init__(self, log_addr: tuple[str, int] | None = None, version: Any = 1.0, name: str = "pipeline",
                 benchmark_folder: str | None = None) -> None:
        self.log_addr = log_addr
        self.version = version
        self.name = name
        self.tasks: list[dict[str, Any]] = []
        self.cluster: Cluster | None = None
        self._outputs: collections.deque[Any] = collections.deque()
        self._arrived = threading.Condition()
        self._asleep = threading.Event()

    def add_task(self, task: Callable[..., Any], args: Sequence[Any] = (), is_generator: bool = False) -> None:
        """Append a task: a function (called as `task(item, *args)`) or a class (built with `args`)."""
        self.tasks.append({"function": task, "args": tuple(args), "is_generator": is_generator})

    def boot(self, n_worker: int | None = None) -> None:
        """Start `n_worker` worker processes per task (default: the CPUs this process may use)."""
        from pipeline_cluster.cluster import LocalCluster

        if self.cluster is None:
            self.cluster = LocalCluster(workers=n_worker, log_server=self.log_addr)
        self.cluster.setup(self.name, self.version, self.tasks)
        self._asleep.clear()
        self.cluster.boot(output_handler=self._collect)

    def _collect(self, output: Any) -> None:
        with self._arrived:
            self._outputs.append(output)
            self._arrived.notify_all()

    def _running(self) -> Cluster:
        if self.cluster is None or self.cluster.status()["phase"] not in ("running", "sleeping"):
            raise ClusterError("the pipeline is not booted: call boot() first")
        return self.cluster

    def feed(self, *items: Any) -> None:
        """Give items to the pipeline (blocks while it holds as many unfinished items as it may)."""
        self._running().feed(*items)

    def get_output(self) -> list[Any]:
        """Every output that has arrived and not been taken yet (possibly none), taken now."""
        with self._arrived:
            taken = list(self._outputs)
            self._outputs.clear()
        return taken

    def wait_output(self, timeout: float | None = None) -> None:
        """Block until at least one output is waiting to be taken by get_output()."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: bool(self._outputs), timeout):
                raise TimeoutError(f"no output within {timeout} s")

    def wait_idle(self, timeout: float | None = None) -> None:
        """Block until every fed item is processed (its outputs wait in get_output())."""
        self._running().wait_empty(timeout)

    def wait_empty(self, timeout: float | None = None) -> None:
        """Block until every fed item is processed (the same as wait_idle)."""
        self.wait_idle(timeout)

    def is_empty(self) -> bool:
        """Every fed item is processed."""
        return self.cluster is not None and self.cluster.status()["unfinished"] == 0

    def sleep(self) -> None:
        """Pause: workers finish the items they run, nothing new starts."""
        self._running().sleep()
        self._asleep.set()

    def wait_asleep(self, timeout: float | None = None) -> None:
        """Block until sleep() has taken effect."""
        if not self._asleep.wait(timeout):
            raise TimeoutError(f"not asleep within {timeout} s")

    def wakeup(self) -> None:
        """Resume after sleep()."""
        self._running().wakeup()
        self._asleep.clear()

    def is_awake(self) -> bool:
        """Booted and not asleep."""
        return self.is_running() and not self._asleep.is_set()

    def is_asleep(self) -> bool:
        """Booted and asleep."""
        return self.is_running() and self._asleep.is_set()

    def is_running(self) -> bool:
        """Booted (awake or asleep) and not reset."""
        return self.cluster is not None and self.cluster.status()["phase"] in ("running", "sleeping")

    def is_reset(self) -> bool:
        """Not booted, or reset since."""
        return not self.is_running()

    def reset(self) -> dict[str, Any]:
        """Stop at once (unfinished items are dropped) and forget the tasks' workers; boot() starts them again."""
        self._asleep.clear()
        return self.cluster.reset() if self.cluster is not None else {"unfinished": 0}

    def close(self) -> None:
        """Stop every worker (also done at exit when forgotten)."""
        if self.cluster is not None:
            self.cluster.close(drain=False)
            self.cluster = None
