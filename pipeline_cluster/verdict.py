"""The bottleneck verdict: from the per-stage figures, one line saying what limits a run's throughput and what to do
about it: a stage, the input, the root (the driver process), or the consumer of the outputs."""
from __future__ import annotations

from typing import Any

BUSY = 0.75  # a stage whose workers are busy this share of the time limits throughput
IDLE = 0.5  # every stage starved this share of the time: the work comes too slowly, or its outputs go too slowly
ROOT_BUSY = 0.5  # the driver process uses this share of a CPU while the stages starve and the input is quick:
# its threads (one at a time: they share the GIL) are what limits


def verdict(stages: dict[str, dict[str, Any]], outputs_waiting: bool = False,
            root: dict[str, float | None] | None = None) -> str:
    """One line a person can act on. `stages` is `cluster.stats()`; `outputs_waiting`: the run holds all the
    inputs it may while finished outputs wait for the caller to take them; `root`: the driver process's share of a
    CPU (`cpu`) and of the run's time spent reading the caller's inputs (`reading_input`), when known."""
    known = {name: s for name, s in stages.items() if s.get("busy") is not None and s.get("items_in")}
    if not known:
        return "no verdict yet: no stage has run an item"
    names = list(known)
    slowest = max(names, key=lambda name: known[name]["busy"])
    busy = known[slowest]["busy"]
    if busy >= BUSY:
        s = known[slowest]
        line = f"stage {slowest} limits throughput: {s['workers']} worker(s) busy {busy:.0%}"
        index = names.index(slowest)
        feeder = names[index - 1] if index else None
        if feeder is not None and known[feeder]["busy"] < IDLE:
            line += f"; {feeder} is idle {1 - known[feeder]['busy']:.0%} and feeds it"
        more = max(s["workers"] * 2, s["workers"] + 1)
        line += f"; give {slowest} more workers (cluster.resize({slowest!r}, {more}))"
        if feeder is not None and known[feeder]["busy"] < IDLE and known[feeder]["workers"] > 1:
            line += f" or fewer to {feeder}"
        return line
    starved = min(s.get("starved") or 0.0 for s in known.values())
    if outputs_waiting:
        return (f"the consumer limits throughput: outputs wait for your loop (or output handler) to take them while "
                f"the stages are busy at most {busy:.0%}; take them faster, or do that work in a stage")
    if starved >= IDLE:
        reading, cpu = (root or {}).get("reading_input"), (root or {}).get("cpu")
        if (reading is None or reading < IDLE) and cpu is not None and cpu >= ROOT_BUSY:
            return (f"the root limits throughput: the driver process is busy {cpu:.0%} of a CPU while every stage "
                    f"waits for items at least {starved:.0%} of the time; send fewer, bigger items (several inputs "
                    "in one), or run the stages on node servers so this process only routes them")
        read = f"; reading them takes {reading:.0%} of the run" if reading is not None else ""
        return (f"the input limits throughput: every stage waits for items at least {starved:.0%} of the time "
                f"(busiest: {slowest}, {busy:.0%}){read}; read the inputs faster, or feed from several sources")
    return f"no single bottleneck: the busiest stage, {slowest}, is busy {busy:.0%}"
