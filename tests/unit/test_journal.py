"""The journal's pieces on their own: spans of input positions, the root item -> input map, the file sink's commit
points, and `runs prune` ages."""
from __future__ import annotations

import pytest

from pipeline_cluster.durable import InputIds
from pipeline_cluster.journal import Spans
from pipeline_cluster.messages import DeadLetter
from pipeline_cluster.runs import parse_age
from pipeline_cluster.sinks import JsonLines


def test_spans_merge_neighbours_and_overlaps():
    spans = Spans()
    for start, end in [(10, 20), (30, 40), (20, 25), (0, 5), (24, 31), (50, 50)]:
        spans.add(start, end)
    assert list(spans) == [(0, 5), (10, 40)]
    assert len(spans) == 35
    assert 4 in spans and 5 not in spans and 39 in spans and 40 not in spans
    assert list(spans.gaps()) == [(5, 10), (40, None)]
    assert list(Spans().gaps()) == [(0, None)]


def test_input_ids_number_the_inputs_left_after_a_resume():
    ids = InputIds(Spans([(0, 3), (5, 8)]))  # positions 3, 4, 8, 9, ... are still to run
    ids.add_positions(100, 3)  # the feeder's first three: positions 3, 4, 8
    ids.refeeds[103] = DeadLetter("x", "stage", 0, 1, "exception", input_id=1)
    ids.add_positions(104, 2)  # positions 9, 10
    assert [ids.position(rid) for rid in range(100, 106)] == [3, 4, 8, None, 9, 10]
    assert list(ids.position_spans(100, 6)) == [(3, 5), (8, 9), (9, 11)]
    assert ids.input_id(103) == 1  # a refeed is the input its letter came from


def test_json_lines_cut_back_to_the_last_commit(tmp_path):
    path = tmp_path / "out.jsonl"
    sink = JsonLines(path)
    sink.open(None)
    sink.write([{"a": 1}, 2])
    marker = sink.commit()
    sink.write(["not committed"])
    sink.close()
    again = JsonLines(path)
    again.open(marker)
    again.write([3])
    again.close()
    assert path.read_text() == '{"a": 1}\n2\n3\n'
    path.write_text("")
    with pytest.raises(ValueError, match="changed outside the run"):
        JsonLines(path).open(marker)


def test_ages_for_prune():
    assert parse_age("90s") == 90 and parse_age("7d") == 7 * 86400 and parse_age("1.5h") == 5400
    with pytest.raises(ValueError, match="like 7d"):
        parse_age("7 days")
