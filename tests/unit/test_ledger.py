"""TreeLedger: a root item is reported exactly once, only when its whole tree has left the pipeline, with exactly
its outputs and dead letters, however its items are split into batches and interleaved between stages; a root item
whose generator streams has its outputs sent on as they come, each exactly once."""
from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest

from pipeline_cluster.actors.ledger import TreeLedger
from pipeline_cluster.messages import DeadLetter, Outputs

STAGES = 3


def _simulate(seed: int, roots: int, fanout: tuple[int, ...], fail_rate: float, stream_rate: float = 0.0) -> None:
    """Run random trees through a TreeLedger as stage supervisors would report them, checking every report."""
    rng = random.Random(seed)
    reports: list[tuple] = []
    ledger = TreeLedger("n", reports.append)
    queues: list[list[tuple[int, int]]] = [[(rid, rid) for rid in range(roots)]] + [[] for _ in range(STAGES - 1)]
    live = Counter({rid: 1 for rid in range(roots)})  # the reference count of each root item's live items
    expected_outputs: dict[int, list] = defaultdict(list)
    expected_dead: dict[int, int] = Counter()
    reported: dict[int, tuple[list, int]] = {}
    streamed: dict[int, list] = defaultdict(list)  # outputs sent on before their root item was done
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
            if n > 1 and rng.random() < stream_rate:  # a generator item streaming its outputs in parts, then ending
                parts = sorted(rng.sample(range(1, n), rng.randint(0, n - 1)))
                for first, end in zip([0, *parts], [*parts, n]):
                    items = []
                    for _ in range(end - first):
                        serial += 1
                        items.append((rid, serial))
                    if stage == STAGES - 1:
                        expected_outputs[rid].extend(items)
                        ledger.record_part(0, rid, 0, Outputs([rid] * len(items), items))
                    else:
                        live[rid] += len(items)
                        ledger.record_part(0, rid, len(items), None)
                        queues[stage + 1].extend(items)
                died.append(rid)
                live[rid] -= 1
            elif stage == STAGES - 1:  # the last stage: the input leaves, with its outputs
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
        for name, done, outputs, letters, _, streamed_rids in reports:
            assert name == "n"
            if streamed_rids is not None:
                assert not done and not letters and len(streamed_rids) == len(outputs)
                for rid, output in zip(streamed_rids, outputs):
                    assert rid not in reported, f"an output of root item {rid} streamed after it was done"
                    assert output[0] == rid
                    streamed[rid].append(output)
                continue
            by_root: dict[int, list] = defaultdict(list)
            for output in outputs:
                by_root[output[0]].append(output)
            assert set(by_root) <= set(done), "outputs of a root item that is not complete"
            dead_by_root = Counter(letter.rid for letter in letters)
            for rid in done:
                assert rid not in reported, f"root item {rid} reported twice"
                assert live[rid] == 0, f"root item {rid} reported with {live[rid]} live item(s)"
                reported[rid] = (by_root.get(rid, []), dead_by_root.get(rid, 0))
        reports.clear()
    assert sorted(reported) == list(range(roots))
    for rid, (outputs, dead_count) in reported.items():
        assert sorted(outputs + streamed[rid]) == sorted(expected_outputs[rid])
        assert dead_count == expected_dead[rid]
    assert not ledger.extra and not ledger.died and not ledger.results and not ledger.held_dead
    assert not ledger.streaming
    if stream_rate:
        assert streamed, "no output was streamed: the test did not test streaming"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(12))
def test_random_trees_are_reported_exactly_once_when_complete(seed):
    _simulate(seed, roots=60, fanout=(0, 1, 1, 2, 3, 5), fail_rate=0.05)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(4))
def test_trees_that_never_grow_are_reported_at_their_only_death(seed):
    _simulate(seed, roots=200, fanout=(0, 1, 1, 1), fail_rate=0.02)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(8))
def test_streaming_trees_send_every_output_once(seed):
    _simulate(seed, roots=60, fanout=(0, 1, 2, 3, 5, 9), fail_rate=0.05, stream_rate=0.3)
