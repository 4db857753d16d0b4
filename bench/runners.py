"""One runner per system: LocalCluster, one node server over loopback TCP, multiprocessing.Pool, a plain loop.

Every runner offers the same two measurements, so the trial code treats systems alike:
`stream(workload, inputs, expected)` pushes a lazy input iterator through the workload and times it, and
`latency(workload, count)` sends one item at a time and times each round trip.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import select
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Iterator

import pipeline_cluster as pc
from .workloads import Workload

REPO = Path(__file__).resolve().parent.parent
OUTPUT_TIMEOUT = 60.0  # seconds one W4 item may take before the run is declared stuck
DASHBOARD_POLL_SECONDS = 1.0  # how often the dashboard's page fetches its figures
READY_TIMEOUT = 60.0  # seconds a node server may take to print its PCREADY line
STOP_TIMEOUT = 15.0  # seconds a node server gets to stop after SIGTERM before SIGKILL
SETTLE_SECONDS = 0.25  # Pool's workers stay up this long after a run, longer than the harness's RSS sampling gap


@dataclass
class StreamTiming:
    """perf_counter() marks of one streaming run, and how many outputs came back."""

    created: float  # just before the cluster or pool was created
    first_input: float = 0.0  # when the system pulled its first input (its workers are up by then)
    first_output: float = 0.0
    last_output: float = 0.0
    outputs: int = 0
    total: float = 0.0  # sum of the outputs, for workloads whose outputs are numbers to add up
    cpu_at_first_input: float = 0.0  # this process's CPU seconds (time.process_time()) at those two marks
    cpu_at_last_output: float = 0.0

    @property
    def elapsed(self) -> float:
        """Seconds from the first input pulled to the last output: throughput time, start-up excluded."""
        return self.last_output - self.first_input

    @property
    def run_cpu(self) -> float:
        """This process's CPU seconds over the same span as `elapsed` (all its threads)."""
        return self.cpu_at_last_output - self.cpu_at_first_input

    @property
    def startup(self) -> float:
        """Seconds from creating the cluster (or pool) to its first output."""
        return self.first_output - self.created


@dataclass
class LatencyTiming:
    """Round-trip seconds of each item sent one at a time, and the start-up to the first output."""

    created: float
    first_output: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def startup(self) -> float:
        """Seconds from creating the cluster (or pool) to the first item's output."""
        return self.first_output - self.created


def _tapped(inputs: Iterable[Any], timing: StreamTiming) -> Iterator[Any]:
    """Yield `inputs` unchanged, stamping when the first one is pulled."""
    it = iter(inputs)
    for item in it:
        timing.first_input = time.perf_counter()
        timing.cpu_at_first_input = time.process_time()
        yield item
        break
    yield from it


def _drain(outputs: Iterable[Any], timing: StreamTiming, tally: bool, expected: int) -> None:
    """Consume every output, counting them (and adding them up if `tally`); stamp the first and the `expected`-th.

    The last output is stamped when it arrives, not when the iterator ends: ending a run includes stopping the
    workers (pipeline_cluster) or nothing (Pool's iterator), and that shutdown is not throughput.
    """
    it = iter(outputs)
    count, total = 0, 0.0
    for first in it:
        timing.first_output = timing.last_output = time.perf_counter()
        count, total = 1, (first if tally else 0.0)
        break
    if tally:
        for output in it:
            count += 1
            total += output
            if count == expected:
                _stamp_last(timing)
    else:
        for _ in it:
            count += 1
            if count == expected:
                _stamp_last(timing)
    if count != expected:  # the trial reports the wrong count; stamp the end so the timing stays defined
        _stamp_last(timing)
    timing.outputs, timing.total = count, total


def _drain_to_file(outputs: Iterable[Any], file: Any, timing: StreamTiming, expected: int) -> None:
    """Write every output to `file` as a JSON line, as a caller without a sink would; stamp as `_drain` does."""
    count = 0
    for output in outputs:
        file.write(json.dumps(output) + "\n")
        count += 1
        if count == 1:
            timing.first_output = time.perf_counter()
        if count == expected:
            _stamp_last(timing)
    if count != expected:
        _stamp_last(timing)
    timing.outputs = count


class _TimedJsonLines(pc.sinks.JsonLines):
    """The JSON-lines sink, stamping the first and the `expected`-th output as `_drain` does."""

    def __init__(self, path: str, timing: StreamTiming, expected: int) -> None:
        super().__init__(path)
        self.timing, self.expected, self.count = timing, expected, 0

    def write(self, outputs: list) -> None:
        super().write(outputs)
        if outputs and not self.count:
            self.timing.first_output = time.perf_counter()
        self.count += len(outputs)
        if self.count >= self.expected and not self.timing.last_output:
            _stamp_last(self.timing)


def _stamp_last(timing: StreamTiming) -> None:
    """Mark the last output's arrival: the wall clock, and this process's CPU time for W6's root figure."""
    timing.last_output = time.perf_counter()
    timing.cpu_at_last_output = time.process_time()


def pipeline_of(workload: Workload, workers: int | None = None) -> pc.Pipeline:
    """The workload's stages as a pipeline_cluster Pipeline (`workers` per stage, one item at a time each, instead
    of the workload's concurrency)."""
    concurrency = 1 if workers else workload.concurrency
    return pc.Pipeline([pc.Stage(fn, generator=gen, workers=workers, concurrency=concurrency)
                        for fn, gen in workload.stages], name=f"bench-{workload.name}")


@contextlib.contextmanager
def _watched(url: str | None) -> Iterator[None]:
    """While the block runs, fetch the dashboard's /api/stats once a second, as its open page does (no-op for None)."""
    if url is None:
        yield
        return
    stop = threading.Event()
    base, _, query = url.partition("?")
    stats_url = base.rstrip("/") + "/api/stats" + ("?" + query if query else "")

    def watch() -> None:
        while True:
            with urllib.request.urlopen(stats_url, timeout=OUTPUT_TIMEOUT) as response:
                json.load(response)
            if stop.wait(DASHBOARD_POLL_SECONDS):
                return

    watcher = threading.Thread(target=watch, name="bench-dashboard-watcher", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join(OUTPUT_TIMEOUT)


class ClusterRunner:
    """Runs workloads on a pipeline_cluster cluster made by `make_cluster()` (LocalCluster or connected nodes).

    W4 awaits each item with `cluster.wait_empty()`, or (`own_event`) on the caller's own Event that the output
    handler sets. `placement=True` makes clusters with `placement=True` (node servers are started with
    `--placement` by the trial).
    """

    def __init__(self, run_dir: str, own_event: bool = False, placement: bool = False,
                 workers: int | None = None, dashboard: bool = False, output: str | None = None) -> None:
        self.run_dir = run_dir
        self.output = output  # None, or a durable run's outputs: "journal", "file" (no journal), "sink"
        self.own_event = own_event
        self.placement = placement
        self.workers = workers  # per stage, overriding the workload's concurrency
        self.dashboard = dashboard  # serve the dashboard, and fetch its figures as an open page does
        self._runs = itertools.count()

    def make_cluster(self) -> pc.Cluster:
        """A fresh cluster for one run; subclasses say where its nodes are."""
        raise NotImplementedError

    def _next_run_dir(self) -> str:
        return os.path.join(self.run_dir, f"run-{next(self._runs)}")

    def stream(self, workload: Workload, inputs: Iterable[Any], expected: int) -> StreamTiming:
        """`cluster.run(pipeline, inputs)`, consumed to the end (`expected` outputs)."""
        timing = StreamTiming(time.perf_counter())
        with self.make_cluster() as cluster, _watched(cluster.dashboard_url):
            pipeline, tapped = pipeline_of(workload, self.workers), _tapped(inputs, timing)
            path = os.path.join(self.run_dir, f"outputs-{next(self._runs)}.jsonl")
            if self.output == "sink":
                sink = _TimedJsonLines(path, timing, expected)
                cluster.run(pipeline, tapped, run_id=f"bench-{os.path.basename(path)}", sink=sink)
                timing.outputs = sink.count
            elif self.output == "file":
                with open(path, "w") as file:
                    _drain_to_file(cluster.run(pipeline, tapped), file, timing, expected)
            elif self.output == "journal":
                _drain(cluster.run(pipeline, tapped, run_id=f"bench-{os.path.basename(path)}"), timing,
                       workload.tally, expected)
            else:
                _drain(cluster.run(pipeline, tapped), timing, workload.tally, expected)
        return timing

    def latency(self, workload: Workload, count: int) -> LatencyTiming:
        """The step-by-step API: setup, boot with an output handler, then feed one item and await it, `count` times."""
        arrived = threading.Event()
        got: list[Any] = []

        def on_output(output: Any) -> None:
            got.append(output)
            arrived.set()

        timing = LatencyTiming(time.perf_counter())
        with self.make_cluster() as cluster:
            cluster.setup(f"bench-{workload.name}", "1", pipeline_of(workload))
            cluster.boot(output_handler=on_output if self.own_event else got.append)
            for item in range(count):
                arrived.clear()
                sent = time.perf_counter()
                cluster.feed(item)
                if self.own_event:
                    if not arrived.wait(OUTPUT_TIMEOUT):
                        raise TimeoutError(f"{workload.name}: no output for item {item} after {OUTPUT_TIMEOUT} s")
                else:
                    cluster.wait_empty(OUTPUT_TIMEOUT)
                done = time.perf_counter()
                if item == 0:
                    timing.first_output = done
                timing.latencies.append(done - sent)
            if got != list(range(count)):
                raise AssertionError(f"{workload.name}: outputs differ from inputs")
        return timing


class LocalRunner(ClusterRunner):
    """`pc.LocalCluster()` with its default workers per stage (one per CPU)."""

    def make_cluster(self) -> pc.Cluster:
        """A LocalCluster whose run directory sits under this trial's temp dir."""
        return pc.LocalCluster(run_dir=self._next_run_dir(), placement=self.placement, dashboard=self.dashboard)


class NodeRunner(ClusterRunner):
    """`pc.Cluster.connect(addresses)` to node servers that are already running."""

    def __init__(self, run_dir: str, addresses: list[tuple[str, int]], placement: bool = False) -> None:
        super().__init__(run_dir, placement=placement)
        self.addresses = addresses

    def make_cluster(self) -> pc.Cluster:
        """A root connected to every node address (the authkey comes from PIPELINE_CLUSTER_AUTHKEY)."""
        return pc.Cluster.connect(self.addresses, run_dir=self._next_run_dir(), placement=self.placement)


class RayRunner(ClusterRunner):
    """`pc.RayCluster()` on a local Ray it starts (one Ray node with this machine's CPUs)."""

    def make_cluster(self) -> pc.Cluster:
        """A RayCluster whose run directory sits under this trial's temp dir."""
        return pc.RayCluster(run_dir=self._next_run_dir(), placement=self.placement)


class RayDataRunner:
    """Ray Data doing the same work with its defaults: a dataset of the inputs, one `map` (or `flat_map` for a
    generator stage) per stage, rows iterated on the driver. Rows are dicts, so each task takes and gives
    `{"item": value}`."""

    def stream(self, workload: Workload, inputs: Iterable[Any], expected: int) -> StreamTiming:
        """Build the dataset from the inputs, run it, and consume every row (`expected` of them)."""
        import ray

        timing = StreamTiming(time.perf_counter())
        ray.init(logging_level="WARNING")
        try:
            dataset = ray.data.from_items(list(_tapped(inputs, timing)))
            for fn, generator in workload.stages:
                if generator:
                    dataset = dataset.flat_map(_row_flat(fn))
                else:
                    dataset = dataset.map(_row_map(fn))
            _drain((row["item"] for row in dataset.iter_rows()), timing, workload.tally, expected)
        finally:
            ray.shutdown()
        return timing


def _row_map(fn: Any) -> Any:
    def apply(row: dict[str, Any]) -> dict[str, Any]:
        return {"item": fn(row["item"])}
    return apply


def _row_flat(fn: Any) -> Any:
    def apply(row: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"item": output} for output in fn(row["item"])]
    return apply


class PoolRunner:
    """`multiprocessing.Pool(os.cpu_count())` (the platform's default start method) with a fixed chunksize.

    Pool runs one function per input: for W1 and W5 that is `pair_identity`, both stages in one call, with the
    outputs flattened in the parent (the cheapest way to write it with Pool: one pass, one round trip per chunk).
    """

    def __init__(self, chunksize: int) -> None:
        self.chunksize = chunksize

    def stream(self, workload: Workload, inputs: Iterable[Any], expected: int) -> StreamTiming:
        """`pool.imap_unordered(function, inputs, chunksize)`, consumed to the end (`expected` outputs)."""
        timing = StreamTiming(time.perf_counter())
        with multiprocessing.Pool(workload.pool_processes or os.cpu_count()) as pool:
            results = pool.imap_unordered(workload.pool_function, _tapped(inputs, timing), self.chunksize)
            _drain(itertools.chain.from_iterable(results) if workload.pool_returns_many else results, timing,
                   workload.tally, expected)
            time.sleep(SETTLE_SECONDS)  # untimed: lets the RSS sampler see the workers of a run of a few ms
            pool.close()
            pool.join()
        return timing

    def latency(self, workload: Workload, count: int) -> LatencyTiming:
        """Two `pool.apply` calls per item, one per stage (chunksize has no say here)."""
        timing = LatencyTiming(time.perf_counter())
        with multiprocessing.Pool(os.cpu_count()) as pool:
            for item in range(count):
                sent = time.perf_counter()
                output = item
                for fn, _ in workload.stages:
                    output = pool.apply(fn, (output,))
                done = time.perf_counter()
                if output != item:
                    raise AssertionError(f"{workload.name}: output {output!r} for input {item!r}")
                if item == 0:
                    timing.first_output = done
                timing.latencies.append(done - sent)
            pool.close()
            pool.join()
        return timing


class MpireRunner:
    """mpire's `WorkerPool(n_jobs).imap_unordered(function, inputs, chunk_size)`, as Pool with the same function and
    chunksize (both stages in one call per input; W8 with 64 jobs, as Pool(64))."""

    def __init__(self, chunksize: int) -> None:
        self.chunksize = chunksize

    def stream(self, workload: Workload, inputs: Iterable[Any], expected: int) -> StreamTiming:
        """Consume every output (`expected` of them)."""
        from mpire import WorkerPool

        timing = StreamTiming(time.perf_counter())
        with WorkerPool(n_jobs=workload.pool_processes or os.cpu_count()) as pool:
            results = pool.imap_unordered(workload.pool_function, _tapped(inputs, timing), chunk_size=self.chunksize)
            _drain(itertools.chain.from_iterable(results) if workload.pool_returns_many else results, timing,
                   workload.tally, expected)
        return timing


class PypelnRunner:
    """pypeln: one stage per workload stage, each with a worker per CPU (`pl.process`), or for W8's waiting stage
    `pl.thread` with 64 workers, as its docs advise for I/O."""

    def stream(self, workload: Workload, inputs: Iterable[Any], expected: int) -> StreamTiming:
        """Chain the stages and consume every output (`expected` of them)."""
        import pypeln as pl

        timing = StreamTiming(time.perf_counter())
        outputs: Any = _tapped(inputs, timing)
        for fn, generator in workload.stages:
            if workload.concurrency > 1:
                outputs = pl.thread.map(fn, outputs, workers=workload.concurrency)
            elif generator:
                outputs = pl.process.flat_map(fn, outputs, workers=os.cpu_count() or 1)
            else:
                outputs = pl.process.map(fn, outputs, workers=os.cpu_count() or 1)
        _drain(outputs, timing, workload.tally, expected)
        return timing


class LoopRunner:
    """The floor: the stages chained lazily in this one process, no pickling, no other process."""

    def stream(self, workload: Workload, inputs: Iterable[Any], expected: int) -> StreamTiming:
        """Chain the stages with map (and chain.from_iterable for generator stages) and consume the result."""
        timing = StreamTiming(time.perf_counter())
        outputs: Iterable[Any] = _tapped(inputs, timing)
        for fn, generator in workload.stages:
            outputs = itertools.chain.from_iterable(map(fn, outputs)) if generator else map(fn, outputs)
        _drain(outputs, timing, workload.tally, expected)
        return timing

    def latency(self, workload: Workload, count: int) -> LatencyTiming:
        """Call the stages in turn on each item."""
        timing = LatencyTiming(time.perf_counter())
        for item in range(count):
            sent = time.perf_counter()
            output = item
            for fn, _ in workload.stages:
                output = fn(output)
            done = time.perf_counter()
            if item == 0:
                timing.first_output = done
            timing.latencies.append(done - sent)
        return timing


def _read_ready(proc: subprocess.Popen, log_path: Path) -> tuple[str, int]:
    """The (host, port) from a node server's `PCREADY {json}` line, or an error with its log's tail."""
    ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("PCREADY "):
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        raise RuntimeError(f"node server gave no PCREADY line (got {line!r}); its log ends:\n{tail}")
    info = json.loads(line.split(" ", 1)[1])
    return info["host"], int(info["port"])


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM a node server, then SIGKILL it if it has not exited in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def node_servers(hosts: list[str], workers: int, log_dir: str,
                 placement: bool = False) -> Iterator[list[tuple[str, int]]]:
    """Start `python -m pipeline_cluster.cli node` on each loopback host (port 0); yield their addresses; stop them.

    The servers inherit PIPELINE_CLUSTER_AUTHKEY from this process and run with the repo as working directory,
    so they import the task functions from `bench.workloads`. They are stopped even when the run fails.
    """
    procs: list[subprocess.Popen] = []
    try:
        logs = []
        for host in hosts:
            log_path = Path(log_dir) / f"node-{host}.log"
            with open(log_path, "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "pipeline_cluster.cli", "node", "--host", host, "--port", "0",
                     "--workers", str(workers)] + (["--placement"] if placement else []),
                    stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, cwd=REPO))
            logs.append(log_path)
        yield [_read_ready(proc, log) for proc, log in zip(procs, logs)]
    finally:
        for proc in procs:
            _stop(proc)
