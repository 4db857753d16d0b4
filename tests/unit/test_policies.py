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


class _Stage:
    def __init__(self, workers):
        self.workers = workers

    @property
    def autoscaled(self):
        if self.workers == "auto":
            return (1, None)
        return self.workers if isinstance(self.workers, tuple) else None


class _Stats:
    def __init__(self, busy_seconds, worker_seconds, queued=0):
        self.busy_seconds, self.worker_seconds, self.queued = busy_seconds, worker_seconds, queued


def test_autoscaler_shares_the_cpus_then_moves_one_worker_at_a_time_to_the_busy_stage():
    scaler = policies.Autoscaler.for_stages([_Stage("auto"), _Stage(3), _Stage((1, 3))], budget=4)
    assert [scaler.initial(i) for i in range(3)] == [2, 3, 2]  # an even share of the 4 CPUs each; the fixed one as is
    # round 1: stage 0 busy 20%, stage 2 busy 100%
    moves = scaler.moves([_Stats(0.4, 2.0), _Stats(0, 0), _Stats(2.0, 2.0)])
    assert moves == [(0, 1, "busy 20%: gives a worker up"), (2, 3, "busy 100%: takes a worker")]
    # the next COOLDOWN rounds: nothing, whatever the figures say
    for round_no in range(policies.COOLDOWN):
        assert scaler.moves([_Stats(0.4, 3.0 + round_no), _Stats(0, 0), _Stats(5.0 + round_no, 5.0 + round_no)]) == []
    # stage 2 is at its max (3), stage 0 at its min (1): no further move
    assert scaler.moves([_Stats(0.4, 9.0), _Stats(0, 0), _Stats(20.0, 20.0)]) == []


def test_autoscaler_takes_from_a_busy_stage_that_runs_ahead_of_a_piled_up_one():
    scaler = policies.Autoscaler.for_stages([_Stage("auto"), _Stage("auto")], budget=4)
    # both busy, but stage 1's queue is short: nothing to take from stage 0, and no CPU to spare
    assert scaler.moves([_Stats(1.8, 2.0), _Stats(2.0, 2.0, queued=10)]) == []
    # stage 1's queue has piled up: stage 0 runs ahead of it and gives a worker
    moves = scaler.moves([_Stats(3.6, 4.0), _Stats(4.0, 4.0, queued=policies.PILED_UP)])
    assert moves == [(0, 1, "busy 90%: runs ahead of stage 1: gives a worker up"), (1, 3, "busy 100%: takes a worker")]
    # a later stage never gives to an earlier one for this reason
    scaler = policies.Autoscaler.for_stages([_Stage("auto"), _Stage("auto")], budget=4)
    assert scaler.moves([_Stats(2.0, 2.0, queued=policies.PILED_UP), _Stats(1.8, 2.0)]) == []


def test_autoscaler_leaves_stages_alone_when_none_is_busy():
    scaler = policies.Autoscaler.for_stages([_Stage("auto"), _Stage("auto")], budget=2)
    assert scaler.moves([_Stats(0.5, 1.0), _Stats(0.6, 1.0)]) == []
    assert policies.Autoscaler.for_stages([_Stage(2), _Stage(None)], budget=2) is None


def test_failed_items_weigh_in_the_reply_as_fanning_out_ones_do():
    assert policies.reply_weight(outputs=100, errors=0, items=100) == 1.0
    assert policies.reply_weight(outputs=0, errors=100, items=100) == policies.ERROR_WEIGHT
    all_failing = policies.batch_size(1e-5, 100_000, 2, policies.reply_weight(0, 100, 100), None)
    assert all_failing == policies.MAX_BATCH // policies.ERROR_WEIGHT  # few tracebacks in flight at once
    assert policies.batch_size(1e-5, 100_000, 2, policies.reply_weight(100, 0, 100), None) == policies.MAX_BATCH
