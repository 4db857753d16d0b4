"""TreeLedger: a root item is reported exactly once, only when its whole tree has left the pipeline, with exactly
its outputs and dead letters, however its items are split into batches and interleaved between stages."""
from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest

from pipeline_cluster.actors.ledger import TreeLedger
from pipeline_cluster.messages import DeadLetter, Outputs

STAGES = 3


def _simulate(seed: int, roots: int, fanout: tuple[int, ...], fail_rate: float) -> None:
    """Run random trees through a TreeLedger as stage supervisors would report them, checking every report."""
    rng = random.Random(seed)
    reports: list[tuple] = []
    ledger = TreeLedger("n", reports.append)
    queues: list[list[tuple[int, int]]] = [[(rid, rid) for rid in range(roots)]] + [[] for _ in range(STAGES - 1)]
    live = Counter({rid: 1 for rid in range(roots)})  # the reference count of each root item's live items
    expected_outputs: dict[int, list] = defaultdict(list)
    expected_dead: dict[int, int] = Counter()
    reported: dict[int, tuple[list, int]] = {}
    serial = roots
    while any(queues):
        stage = rng.choice([i for i, queue in enumerate(queues) if queue])
        queue = queues[stage]
        rng.shuffle(queue)
        size = rng.randint(1, len(queue))
        batch, queues[stage] = queue[:size], queue[size:]
        born: list[int] = []
        died: list[int] = []
        out_rids: list[int] = []
        outs: list = []
        dead: list[DeadLetter] = []
        for rid, _ in batch:
            if rng.random() < fail_rate:  # failed for good: it dies, as a dead letter
                died.append(rid)
                dead.append(DeadLetter(None, "s", stage, 1, "exception", rid=rid))
                expected_dead[rid] += 1
                live[rid] -= 1
                continue
            n = rng.choice(fanout)
            if stage == STAGES - 1:  # the last stage: the input leaves, with its outputs
                died.append(rid)
                live[rid] -= 1
                for _ in range(n):
                    serial += 1
                    out_rids.append(rid)
                    outs.append((rid, serial))
                    expected_outputs[rid].append((rid, serial))
            elif n == 0:
                died.append(rid)
                live[rid] -= 1
            else:
                born += [rid] * (n - 1)
                live[rid] += n - 1
                for _ in range(n):
                    serial += 1
                    queues[stage + 1].append((rid, serial))
        ledger.record(0, born, died, Outputs(out_rids, outs) if out_rids else None, dead)
        while reports:
            name, done, outputs, letters, _ = reports.pop()
            assert name == "n"
            by_root: dict[int, list] = defaultdict(list)
            for output in outputs:
                by_root[output[0]].append(output)
            assert set(by_root) <= set(done), "outputs of a root item that is not complete"
            dead_by_root = Counter(letter.rid for letter in letters)
            for rid in done:
                assert rid not in reported, f"root item {rid} reported twice"
                assert live[rid] == 0, f"root item {rid} reported with {live[rid]} live item(s)"
                reported[rid] = (by_root.get(rid, []), dead_by_root.get(rid, 0))
    assert sorted(reported) == list(range(roots))
    for rid, (outputs, dead_count) in reported.items():
        assert sorted(outputs) == sorted(expected_outputs[rid])
        assert dead_count == expected_dead[rid]
    assert not ledger.extra and not ledger.died and not ledger.results and not ledger.held_dead


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(12))
def test_random_trees_are_reported_exactly_once_when_complete(seed):
    _simulate(seed, roots=60, fanout=(0, 1, 1, 2, 3, 5), fail_rate=0.05)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(4))
def test_trees_that_never_grow_are_reported_at_their_only_death(seed):
    _simulate(seed, roots=200, fanout=(0, 1, 1, 1), fail_rate=0.02)
