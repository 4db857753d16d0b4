"""An I/O-bound stage: each item waits 20 ms (a web request, say); 64 at a time per worker, on threads and on an
event loop, with each output matched to its input.

    python examples/io_stage.py
"""
import asyncio
import time

import pipeline_cluster as pc


def fetch(n):
    time.sleep(0.02)  # stands for a request that waits on the network
    return n * n


async def lookup(n):
    await asyncio.sleep(0.02)  # the same with an async client
    return n + 1


pipeline = pc.Pipeline([pc.Stage(fetch, concurrency=64), pc.Stage(lookup, concurrency=64)], name="io")

if __name__ == "__main__":
    started = time.monotonic()
    with pc.LocalCluster() as cluster:
        results = dict(cluster.run(pipeline, range(1000), keyed=True))
    assert results == {n: n * n + 1 for n in range(1000)}
    print(f"1000 items, 40 ms of waiting each, in {time.monotonic() - started:.1f} s")
