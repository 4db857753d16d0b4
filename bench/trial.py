"""One measured trial: one workload on one system, in a fresh process (`python -m bench.trial SPEC_JSON`).

A fresh process per trial keeps one run's memory high-water mark and threads out of the next run's figures; the
harness samples this process tree's RSS from outside. The result is printed as the last stdout line,
`BENCHRESULT {json}`.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any
from collections.abc import Iterator

from . import runners
from .workloads import (ARRAY_BYTES, DURABLE_SYSTEMS, NAP_SECONDS, PAYLOAD_BYTES, W6_NODES, W6_WORKERS_PER_NODE,
                        W10_SMALL_FAILURES, WORKLOADS, Workload, arrays, burn_inputs, calibrate_burn, fail_every, ints,
                        payloads, time_burn)

RESULT_PREFIX = "BENCHRESULT "
NODE_HOST = "127.0.0.2"


@contextlib.contextmanager
def runner_for(system: str, workload: Workload, tmp: str, placement: bool) -> Iterator[Any]:
    """The runner of `system`; for "node", one node server on loopback that is stopped afterwards."""
    cores = os.cpu_count() or 1
    if system in ("local", "localev", "localw64", "localdash") + DURABLE_SYSTEMS:
        yield runners.LocalRunner(tmp, own_event=system == "localev", placement=placement,
                                  workers=64 if system == "localw64" else None, dashboard=system == "localdash",
                                  output=system[len("local"):] if system in DURABLE_SYSTEMS else None)
    elif system == "node":
        with runners.node_servers([NODE_HOST], cores, tmp, placement) as addresses:
            yield runners.NodeRunner(tmp, addresses, placement)
    elif system == "mpire":
        yield runners.MpireRunner(workload.tuned_chunksize)
    elif system == "pypeln":
        yield runners.PypelnRunner()
    elif system == "ray":
        yield runners.RayRunner(tmp, placement=placement)
    elif system == "raydata":
        yield runners.RayDataRunner()
    elif system == "pool1":
        yield runners.PoolRunner(1)
    elif system == "pooltuned":
        yield runners.PoolRunner(workload.tuned_chunksize)
    elif system == "loop":
        yield runners.LoopRunner()
    else:
        raise ValueError(f"unknown system {system!r}")


def _inputs(workload: Workload, count: int, iterations: int) -> Iterator[Any]:
    if workload.name == "W2":
        return burn_inputs(count, iterations)
    if workload.name == "W3":
        return payloads(count)
    if workload.name == "W7":
        return arrays(count)
    return ints(count)


def _stream_result(workload: Workload, timing: runners.StreamTiming, count: int) -> dict[str, Any]:
    expected = workload.outputs_for(count)
    if timing.outputs != expected:
        raise AssertionError(f"{workload.name}: {timing.outputs} outputs, expected {expected}")
    return {"outputs": timing.outputs, "elapsed_s": timing.elapsed, "startup_s": timing.startup,
            "items_per_s": timing.outputs / timing.elapsed}


def stream_trial(workload: Workload, system: str, count: int, tmp: str, placement: bool) -> dict[str, Any]:
    """W1, W2, W3, W5: stream `count` lazily generated inputs through the workload and compute its figure.

    For W2 the burn loop is calibrated to ~10 ms in this process first; the efficiency takes as time per item
    the CPU seconds each item reported spending in its worker during the run (`efficiency_calibrated` takes the
    wall time measured at calibration instead, which the machine's drift can push above 1).
    """
    cores = os.cpu_count() or 1
    iterations, time_per_item = 0, 0.0
    if workload.name == "W2":  # calibrated here and now: the machine's speed drifts between trials
        iterations = calibrate_burn()
        time_per_item = time_burn(iterations)
    with runner_for(system, workload, tmp, placement) as runner:
        timing = runner.stream(workload, _inputs(workload, count, iterations), workload.outputs_for(count))
    result = _stream_result(workload, timing, count)
    if workload.name == "W2":
        result["burn_iterations"] = iterations
        result["calibrated_time_per_item_s"] = time_per_item
        result["efficiency_calibrated"] = count * time_per_item / cores / timing.elapsed
        result["time_per_item_s"] = timing.total / count
        result["efficiency"] = timing.total / cores / timing.elapsed
        result["figure"] = result["efficiency"]
    elif workload.name == "W3":
        result["mb_per_s"] = timing.outputs * PAYLOAD_BYTES / 1e6 / timing.elapsed
        result["figure"] = result["mb_per_s"]
    elif workload.name == "W7":
        result["mb_per_s"] = count * ARRAY_BYTES / 1e6 / timing.elapsed
        expected_total = 2 * (ARRAY_BYTES // 8) * count * (count - 1) / 2
        if abs(timing.total - expected_total) > 1e-6 * expected_total:
            raise AssertionError(f"W7: outputs sum to {timing.total}, expected {expected_total}")
        result["figure"] = result["mb_per_s"]
    else:
        result["figure"] = result["items_per_s"]
    return result


def latency_trial(workload: Workload, system: str, count: int, tmp: str, placement: bool) -> dict[str, Any]:
    """W4: one item at a time through the two stages; p50 and p99 of the round trips."""
    with runner_for(system, workload, tmp, placement) as runner:
        timing = runner.latency(workload, count)
    cuts = statistics.quantiles(timing.latencies, n=100, method="inclusive")
    p50, p99 = statistics.median(timing.latencies) * 1e3, cuts[98] * 1e3
    return {"outputs": len(timing.latencies), "startup_s": timing.startup, "p50_ms": p50, "p99_ms": p99,
            "figure": p50}


def autoscale_trial(workload: Workload, count: int, tmp: str, placement: bool) -> dict[str, Any]:
    """W9: the same two stages with workers="auto" (a budget of 4 per node) and with a fixed even split (2 + 2);
    the figure is the first's throughput over the second's."""
    import pipeline_cluster as pc

    rates, first = {}, 0.0
    for mode, workers in (("auto", "auto"), ("fixed", 2)):
        started = time.perf_counter()
        with pc.LocalCluster(workers=4, run_dir=os.path.join(tmp, mode), placement=placement) as cluster:
            stages = [pc.Stage(fn, workers=workers) for fn, _ in workload.stages]
            outputs = 0
            for _ in cluster.run(stages, ints(count)):
                outputs += 1
                if outputs == 1 and mode == "auto":
                    first = time.perf_counter() - started
            rates[mode] = outputs / (time.perf_counter() - started)
            if mode == "auto":
                light, heavy = (figures["workers"] for figures in cluster.stats().values())
        if outputs != count:
            raise AssertionError(f"W9 {mode}: {outputs} outputs, expected {count}")
    return {"outputs": count, "startup_s": first, "items_per_s": rates["auto"], "fixed_items_per_s": rates["fixed"],
            "auto_light_workers": light, "auto_heavy_workers": heavy, "figure": rates["auto"] / rates["fixed"]}


def scale_out_trial(workload: Workload, count: int, tmp: str, placement: bool) -> dict[str, Any]:
    """W6: 8 node servers x 4 workers on 127.0.0.2..9, a 20 ms sleep per item; then 1 of them for the root's CPU.

    The 1-node comparison runs count/8 inputs so it lasts as long as the 8-node run. The root's CPU per input is
    this process's CPU seconds while the run streams (first input pulled to last output: its scheduling), and, as
    a second figure, from connect to close (which adds connecting to, booting and stopping every node).
    """
    hosts = [f"127.0.0.{2 + i}" for i in range(W6_NODES)]
    ideal = W6_NODES * W6_WORKERS_PER_NODE / NAP_SECONDS
    small = max(2, count // W6_NODES)
    with runners.node_servers(hosts, W6_WORKERS_PER_NODE, tmp, placement) as addresses:
        cpu = time.process_time()
        many = runners.NodeRunner(os.path.join(tmp, "nodes8"), addresses, placement).stream(workload, ints(count),
                                                                                             count)
        cpu_many = (time.process_time() - cpu) / count
        cpu = time.process_time()
        one = runners.NodeRunner(os.path.join(tmp, "nodes1"), addresses[:1], placement).stream(workload, ints(small),
                                                                                                small)
        cpu_one = (time.process_time() - cpu) / small
    result = _stream_result(workload, many, count)
    _stream_result(workload, one, small)
    run_many, run_one = many.run_cpu / count, one.run_cpu / small
    result.update(efficiency=result["items_per_s"] / ideal,
                  efficiency_1node=one.outputs / one.elapsed / (W6_WORKERS_PER_NODE / NAP_SECONDS),
                  root_cpu_us_per_item_8=run_many * 1e6, root_cpu_us_per_item_1=run_one * 1e6,
                  root_cpu_ratio_8_to_1=run_many / run_one,
                  root_cpu_with_connect_us_per_item_8=cpu_many * 1e6, root_cpu_with_connect_us_per_item_1=cpu_one * 1e6,
                  root_cpu_with_connect_ratio_8_to_1=cpu_many / cpu_one, figure=result["items_per_s"] / ideal)
    return result


def dead_letter_trial(count: int, failures: int, tmp: str, placement: bool) -> dict[str, Any]:
    """W10: a durable run of `count` inputs of which `failures` fail (every one is tried once): dead letters go to
    the journal, so peak RSS (measured by the harness) should not grow with their number."""
    import pipeline_cluster as pc

    step = max(1, count // failures)
    stage = pc.Stage(fail_every, supervision={"max_attempts": 1})
    started = time.perf_counter()
    with pc.LocalCluster(placement=placement) as cluster:
        results = cluster.run([stage], ((n, step) for n in range(count)), run_id="w10")
        startup = time.perf_counter() - started  # the workers are up
        outputs = sum(1 for _ in results)
        letters = cluster.status()["failures"]  # counted in the journal: failures() would load them all
    elapsed = time.perf_counter() - started
    if outputs + letters != count:
        raise AssertionError(f"W10: {outputs} outputs and {letters} dead letters for {count} inputs")
    return {"outputs": outputs, "dead_letters": letters, "startup_s": startup, "elapsed_s": elapsed,
            "items_per_s": count / elapsed, "figure": count / elapsed}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the trial that `spec` names (workload, system, inputs) with a private temp run dir."""
    workload = WORKLOADS[spec["workload"]]
    system = spec["system"]
    count = int(spec["inputs"])
    placement = bool(spec.get("placement", False))
    with tempfile.TemporaryDirectory(prefix="pcbench-") as tmp:
        os.environ["XDG_CACHE_HOME"] = tmp  # durable runs' journals go under the trial's temp dir, not ~/.cache
        # Ray on one machine over loopback (as Ray's own tests do): no service listens on the host's address
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if workload.name == "W6":
            return scale_out_trial(workload, count, tmp, placement)
        if workload.name == "W9":
            return autoscale_trial(workload, count, tmp, placement)
        if workload.name == "W4":
            return latency_trial(workload, system, count, tmp, placement)
        if workload.name == "W10":
            return dead_letter_trial(count, W10_SMALL_FAILURES if spec["variant"] == "small" else count, tmp,
                                     placement)
        return stream_trial(workload, system, count, tmp, placement)


def main(argv: list[str]) -> int:
    """Entry point: run the trial described by the JSON in argv[0] and print its result line."""
    result = run(json.loads(argv[0]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
