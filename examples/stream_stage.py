"""A generator stage that yields millions of outputs for one input: they stream on in parts as they are yielded,
so memory stays flat however many there are.

    python examples/stream_stage.py
"""
import resource

import pipeline_cluster as pc


def rows(n):
    """Stands for reading a big file or a table: one input, n outputs."""
    for i in range(n):
        yield (i, i % 7)


def weekday(row):
    return row[1]


pipeline = pc.Pipeline([pc.Stage(rows, generator=True), weekday], name="stream")

if __name__ == "__main__":
    with pc.LocalCluster() as cluster:
        counts = [0] * 7
        for day in cluster.run(pipeline, [2_000_000]):
            counts[day] += 1
    assert counts == [len(range(day, 2_000_000, 7)) for day in range(7)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"2000000 outputs from 1 input, counted by weekday: {counts[0]} on day 0; this process peaked at {peak} MB")
