"""The bottleneck verdict on its own: which stage, the input, the root, or the consumer."""
from __future__ import annotations

from pipeline_cluster.verdict import verdict


def _stage(busy: float | None, workers: int = 2, starved: float = 0.0, items: int = 100) -> dict:
    return {"busy": busy, "workers": workers, "starved": starved, "items_in": items}


def test_the_busiest_stage_is_named_with_its_feeder_and_what_to_do():
    line = verdict({"fetch": _stage(0.39), "parse": _stage(0.97), "store": _stage(0.2)})
    assert line.startswith("stage parse limits throughput: 2 worker(s) busy 97%; fetch is idle 61% and feeds it")
    assert "give parse more workers (cluster.resize('parse', 4)) or fewer to fetch" in line


def test_the_input_or_the_consumer_when_no_stage_is_busy():
    idle = {"a": _stage(0.1, starved=0.9), "b": _stage(0.05, starved=0.95)}
    assert verdict(idle).startswith("the input limits throughput: every stage waits for items at least 90%")
    assert verdict(idle, outputs_waiting=True).startswith("the consumer limits throughput")
    assert verdict({"a": _stage(0.5, starved=0.2)}) == "no single bottleneck: the busiest stage, a, is busy 50%"


def test_the_root_when_stages_starve_while_the_input_is_quick_and_the_driver_busy():
    idle = {"a": _stage(0.2, starved=0.8)}
    root = verdict(idle, root={"cpu": 0.76, "reading_input": 0.1})
    assert root.startswith("the root limits throughput: the driver process is busy 76% of a CPU while every stage "
                           "waits for items at least 80% of the time; send fewer, bigger items"), root
    slow_input = verdict(idle, root={"cpu": 0.9, "reading_input": 0.95})
    assert slow_input.startswith("the input limits throughput") and "reading them takes 95% of the run" in slow_input
    assert verdict(idle, root={"cpu": 0.2, "reading_input": 0.1}).startswith("the input limits throughput")


def test_no_verdict_before_any_item():
    assert verdict({"a": _stage(None, items=0)}) == "no verdict yet: no stage has run an item"
