"""Ordered and keyed output: items finish out of order (random delays), yet `ordered=True` gives outputs in input
order, a generator stage's outputs in the order it yielded them; `keyed=True` tags each output with its input's index.

    python examples/ordered.py
"""
import random
import time

import pipeline_cluster as pc


def parts(n):  # generator stage: three outputs per input
    for part in "abc":
        yield f"{n}{part}"


def slow_upper(text):  # a random wait: items finish in any order
    time.sleep(random.uniform(0, 0.01))
    return text.upper()


pipeline = pc.Pipeline([pc.Stage(parts, generator=True), slow_upper], name="ordered")

if __name__ == "__main__":
    with pc.LocalCluster() as cluster:
        print(" ".join(cluster.run(pipeline, range(8), ordered=True)))
        fruit = ["pear", "fig", "banana", "kiwi", "plum"]
        for index, out in sorted(cluster.run([slow_upper], fruit, keyed=True)):  # keyed output comes as it finishes
            print(index, fruit[index], "->", out)
