"""The benchmark's workloads (issue 6): task functions, lazy input generators and each workload's fixed facts.

Task functions live here, in an importable module, so worker processes and node servers started with the repo as
their working directory import them by name instead of receiving pickled code.
"""
from __future__ import annotations

import importlib.util
import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Iterator

PAYLOAD_BYTES = 100_000
ARRAY_BYTES = 1 << 20  # W7: one numpy array of float64, 1 MiB
BURN_SECONDS = 0.010
NAP_SECONDS = 0.020
IO_SECONDS = 0.010
IO_WAYS = 64  # W8: items in flight at once (concurrency per worker, Pool's processes)
W6_NODES = 8
W6_WORKERS_PER_NODE = 4


def pair(x: Any) -> tuple[Any, Any]:
    """W1 stage 1 (a generator stage): one input becomes two outputs."""
    return (x, x)


def identity(x: Any) -> Any:
    """W1 stage 2, W3 and W4: return the item unchanged, so only the framework's cost is measured."""
    return x


def pair_identity(x: Any) -> list[Any]:
    """W1 for multiprocessing.Pool: both stages in one call per input, so Pool pays one round trip, not two."""
    return [identity(y) for y in pair(x)]


def io_wait(x: Any) -> Any:
    """W8: wait 10 ms as a network call would (the CPU is free meanwhile) and return the item."""
    time.sleep(IO_SECONDS)
    return x


def fail_every(x: tuple[int, int]) -> int:
    """W10: raise for every input whose number is a multiple of its step (the input is (number, step))."""
    number, step = x
    if number % step == 0:
        raise ValueError(f"input {number} fails on purpose")
    return number


def doubled(a: Any) -> Any:
    """W7 stage 1: a new array, every element times two (numpy)."""
    return a * 2


def total(a: Any) -> float:
    """W7 stage 2: the array's sum, a float."""
    return float(a.sum())


def doubled_total(a: Any) -> float:
    """W7 for Pool and mpire: both stages in one call per input."""
    return total(doubled(a))


def light_wait(x: Any) -> Any:
    """W9 stage 1: 1 ms of waiting."""
    time.sleep(IO_SECONDS / 10)
    return x


def heavy_wait(x: Any) -> Any:
    """W9 stage 2: 4 ms of waiting, 4x the first stage."""
    time.sleep(IO_SECONDS * 4 / 10)
    return x


def burn(iterations: int) -> float:
    """W2: spin a pure-Python loop `iterations` times (the item is the count); returns the CPU seconds it took.

    Returning its own CPU time lets the efficiency use the time items really cost during the run, which the
    machine's drift would otherwise blur.
    """
    started = time.thread_time()
    total = 0
    for i in range(iterations):
        total += i
    return time.thread_time() - started


def nap(x: Any) -> Any:
    """W6: sleep 20 ms and return the item, so the root's scheduling, not CPU, limits throughput."""
    time.sleep(NAP_SECONDS)
    return x


def calibrate_burn(target: float = BURN_SECONDS) -> int:
    """How many `burn` iterations cost `target` seconds of CPU in this process, found by doubling then scaling."""
    iterations = 1000
    while True:
        started = time.process_time()
        burn(iterations)
        spent = time.process_time() - started
        if spent >= 0.05:
            return max(1, round(iterations * target / spent))
        iterations *= 2


def time_burn(iterations: int, repeats: int = 15) -> float:
    """Median wall seconds of one `burn(iterations)` call here and now (the machine's speed drifts)."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        burn(iterations)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def ints(count: int) -> Iterator[int]:
    """Lazily generated integer inputs 0..count-1 (W1, W4, W5, W6)."""
    return iter(range(count))


def payloads(count: int, size: int = PAYLOAD_BYTES) -> Iterator[bytes]:
    """Lazily generated, distinct `bytes` items of `size` bytes (W3); distinct so pickle cannot share one copy."""
    base = bytes(range(256)) * (size // 256 + 1)
    for i in range(count):
        yield i.to_bytes(8, "little") + base[:size - 8]


def arrays(count: int) -> Iterator[Any]:
    """W7 inputs: `count` distinct float64 arrays of ARRAY_BYTES each, made lazily (numpy is a bench extra)."""
    import numpy

    for i in range(count):
        yield numpy.full(ARRAY_BYTES // 8, float(i))


def burn_inputs(count: int, iterations: int) -> Iterator[int]:
    """W2 inputs: each item is the burn iteration count."""
    return itertools.repeat(iterations, count)


@dataclass(frozen=True)
class Workload:
    """One workload's fixed facts: default input count, its stages, Pool's combined function and tuned chunksize."""

    name: str
    title: str
    inputs: int
    stages: tuple[tuple[Callable[[Any], Any], bool], ...]  # (function, is_generator) per stage
    pool_function: Callable[[Any], Any] | None  # one call per input for Pool; None where Pool does not apply
    pool_returns_many: bool  # pool_function returns a list of outputs
    tuned_chunksize: int
    systems: tuple[str, ...]
    metric: str  # what the table shows: items/s, MB/s, efficiency, p50/p99 ms, RSS ratio
    tally: bool = False  # outputs are numbers to add up (W2's CPU seconds per item)
    concurrency: int = 1  # pipeline_cluster's stages run this many items at once per worker
    pool_processes: int | None = None  # Pool's size (None: the CPU count)

    def outputs_for(self, count: int) -> int:
        """How many outputs `count` inputs give (two each when the first stage is W1's generator)."""
        return count * 2 if self.stages[0][1] else count


STANDARD_SYSTEMS = ("local", "node", "pool1", "pooltuned", "loop")
# W8 only: "localw64" runs the stage with workers=64, one item at a time each, instead of concurrency=64
# W4 only: "localev" awaits each item on the caller's own Event (set by the output handler) rather than in
# cluster.wait_empty()
LATENCY_SYSTEMS = ("local", "localev", "localw64", "node", "pool1", "pooltuned", "loop")
# W1 only: "localdash" serves the dashboard, its figures fetched once a second as an open page does; durable runs:
# "localjournal" with a journal (outputs iterated), "localfile" iterating and writing JSON lines to a file itself
# (no journal), "localsink" with a journal and the JSON-lines file sink
DURABLE_SYSTEMS = ("localjournal", "localfile", "localsink")
# W1, W2, W8: "ray" is pc.RayCluster on a local Ray it starts; "raydata" is Ray Data doing the same work (the
# `bench` extra installs it)
RAY_SYSTEMS = ("ray", "raydata")
# W1, W3, W7, W8: the peers mpire (WorkerPool.imap_unordered, both stages in one call as for Pool) and pypeln (one
# process stage per stage; a thread stage for W8); pypeln skips W1, which takes it minutes
PEERS = ("mpire", "pypeln")
ALL_SYSTEMS = LATENCY_SYSTEMS + ("localdash",) + DURABLE_SYSTEMS + RAY_SYSTEMS + PEERS
NEEDS = {"ray": ("ray",), "raydata": ("ray", "pyarrow", "pandas"), "mpire": ("mpire",),
         "pypeln": ("pypeln",)}  # systems that need optional packages (the bench extra): which
WORKLOAD_NEEDS = {"W7": ("numpy",)}


def _installed(names: tuple[str, ...]) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in names)


def available_systems() -> tuple[str, ...]:
    """The systems whose optional packages are installed here (Ray, Ray Data, mpire, pypeln: the `bench` extra)."""
    return tuple(system for system in ALL_SYSTEMS if _installed(NEEDS.get(system, ())))


def available_workloads() -> tuple[str, ...]:
    """The workloads whose inputs can be made here (W7 needs numpy)."""
    return tuple(name for name in WORKLOADS if _installed(WORKLOAD_NEEDS.get(name, ())))

WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("W1", "tiny: generator x -> (x, x), then identity", 200_000,
             ((pair, True), (identity, False)), pair_identity, True, 500,
             STANDARD_SYSTEMS + ("localdash", "mpire") + DURABLE_SYSTEMS + RAY_SYSTEMS, "outputs/s"),
    Workload("W2", "cpu: ~10 ms pure-Python CPU per item", 400,
             ((burn, False),), burn, False, 10, STANDARD_SYSTEMS + RAY_SYSTEMS, "efficiency", tally=True),
    Workload("W3", "payload: identity on 100 KB bytes", 2_000,
             ((identity, False),), identity, False, 4, STANDARD_SYSTEMS + PEERS, "MB/s"),
    Workload("W4", "latency: one item at a time through 2 identity stages", 2_000,
             ((identity, False), (identity, False)), identity, False, 1, LATENCY_SYSTEMS, "p50/p99 ms"),
    Workload("W5", "memory: W1's pipeline on 1,000,000 lazy inputs vs 10,000", 1_000_000,
             ((pair, True), (identity, False)), pair_identity, True, 500, STANDARD_SYSTEMS, "RSS ratio"),
    Workload("W6", "scale-out: 8 node servers x 4 workers, 20 ms sleep per item; node only", 4_000,
             ((nap, False),), None, False, 1, ("node",), "efficiency"),
    Workload("W9", "autoscaling: a stage 4x slower than the one before it, 4 workers per node to share", 8_000,
             ((light_wait, False), (heavy_wait, False)), None, False, 1, ("local",), "speed-up"),
    Workload("W8", "I/O: 10 ms of waiting per item, 64 at a time", 2_000,
             ((io_wait, False),), io_wait, False, 1, ("local", "localw64", "node", "pooltuned") + RAY_SYSTEMS + PEERS,
             "items/s",
             concurrency=IO_WAYS, pool_processes=IO_WAYS),
    Workload("W7", "arrays: 400 numpy arrays of 1 MiB, a*2 then a.sum()", 400,
             ((doubled, False), (total, False)), doubled_total, False, 4, ("local", "node", "pooltuned") + PEERS,
             "MB/s", tally=True),
    Workload("W10", "dead letters: a durable run of 100,000 inputs that all fail vs one where 100 do", 100_000,
             ((fail_every, False),), None, False, 1, ("local",), "RSS ratio"),
)}

W5_SMALL_INPUTS = 10_000
W10_SMALL_FAILURES = 100


def scaled(count: int, scale: float) -> int:
    """An input count shrunk by `scale` for smoke runs, never below 2 (so a rate has an interval)."""
    return max(2, round(count * scale))
