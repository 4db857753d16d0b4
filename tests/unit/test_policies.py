"""The actors' pure decisions (credit, batch size, backpressure) and Chunk's slicing, on their own."""
from __future__ import annotations

import pytest

from pipeline_cluster.actors import policies
from pipeline_cluster.messages import Chunk


def test_credit_keeps_a_nodes_inputs_within_the_byte_budget():
    assert policies.credit_for(1) == policies.MAX_CREDIT  # tiny items: the deepest queue
    assert policies.credit_for(10**9) == policies.MIN_CREDIT  # huge ones: never below the floor
    assert policies.credit_for(policies.BYTE_BUDGET / 100) == 100


def test_a_node_gets_more_only_once_an_eighth_of_its_credit_is_free():
    assert policies.free_credit(800, 701) is None  # 99 free: less than 800 / 8
    assert policies.free_credit(800, 700) == 100
    assert policies.free_credit(800, 0) == 800


def test_capacity_is_every_credit_plus_the_largest_as_backlog():
    assert policies.capacity([100, 300]) == 700
    assert policies.capacity([]) == 0


@pytest.mark.parametrize(("seconds", "queued", "workers", "fanout", "size", "expected"), [
    (None, 10_000, 2, 1.0, None, 1),  # time per item unknown: one item, to measure it
    (0.001, 10_000, 2, 1.0, None, 50),  # 50 ms of work
    (1e-5, 10_000, 2, 1.0, None, 2_500),  # quick items: the queue shared over 2 workers x 2 batches in flight
    (1e-6, 100_000, 2, 1.0, None, policies.MAX_BATCH),
    (1e-6, 100_000, 2, 8.0, None, policies.MAX_BATCH // 8),  # a generator's fan-out shrinks batches
    (1e-6, 100_000, 2, 1.0, 1024 * 1024, 4),  # 1 MB items: 4 MB a batch
    (1e-4, 10, 2, 1.0, None, 50),  # a short queue is not cut below 5 ms of work
])
def test_batch_size(seconds, queued, workers, fanout, size, expected):
    assert policies.batch_size(seconds, queued, workers, fanout, size) == expected


def test_backpressure_holds_back_from_high_water_until_low_water():
    holding = False
    seen = []
    for queued in (policies.HIGH_WATER - 1, policies.HIGH_WATER, policies.LOW_WATER + 1, policies.LOW_WATER, 0):
        holding = policies.hold_back(queued, holding)
        seen.append(holding)
    assert seen == [False, True, True, False, False]


def test_moving_average_starts_with_the_first_value():
    assert policies.moving_average(None, 5.0) == 5.0
    assert policies.moving_average(10.0, 0.0) == pytest.approx(7.0)


def test_chunks_split_select_and_join_keep_items_attempts_and_paths_together():
    chunk = Chunk([1, 2, 3], ["a", "b", "c"], [0, 2, 0], [(), (1,), (2, 0)])
    head, rest = chunk.split(1)
    assert head == Chunk([1], ["a"], [0], [()]) and rest == Chunk([2, 3], ["b", "c"], [2, 0], [(1,), (2, 0)])
    assert chunk.select([2, 0]) == Chunk([3, 1], ["c", "a"], [0, 0], [(2, 0), ()])
    plain = Chunk([4], ["d"])
    assert Chunk.join([plain, head]) == Chunk([4, 1], ["d", "a"], [0, 0], [(), ()])
    assert Chunk.join([plain, plain]) == Chunk([4, 4], ["d", "d"], None, None)  # nothing to carry: stays None
