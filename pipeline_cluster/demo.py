"""The demo pipeline: split sentences into words (generator), normalise them (class with args), drop stop words.

    python -m pipeline_cluster.demo      # or: pipeline-cluster demo
"""
from __future__ import annotations

import collections
import random
from collections.abc import Iterator

import pipeline_cluster as pc
from pipeline_cluster import multiprocess_logging as mpl

STOP_WORDS = frozenset("a an and the of to in is it on for with as at by".split())
VOCABULARY = ("the actor system spreads items over nodes and the supervisor restarts a crashed worker "
              "while the root collects outputs as each item of the stream finishes on a node").split()


def sentences(count: int, seed: int = 7) -> Iterator[str]:
    """A lazy stream of `count` random sentences."""
    rng = random.Random(seed)
    for _ in range(count):
        yield " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(4, 12))) + rng.choice(".!?")


def split_words(sentence: str) -> Iterator[str]:
    """Generator stage: one sentence in, its words out."""
    yield from sentence.split()


class Normalize:
    """Class stage, built once per worker: strip punctuation, lower-case."""

    def __init__(self, punctuation: str, lower: bool = True) -> None:
        self.table = str.maketrans("", "", punctuation)
        self.lower = lower
        mpl.log(f"Normalize worker ready (punctuation={punctuation!r})")

    def __call__(self, word: str) -> str:
        word = word.translate(self.table)
        return word.lower() if self.lower else word


def drop_stop_words(word: str) -> str | None:
    """Returning None drops the item."""
    return None if word in STOP_WORDS or not word else word


pipeline = pc.Pipeline(
    [pc.Stage(split_words, generator=True),
     pc.Stage(Normalize, args=(".,;!?",), kwargs={"lower": True}),
     pc.Stage(drop_stop_words)],
    name="wordcount", version="1.0")


def main(count: int = 3000) -> collections.Counter:
    """Run the pipeline on the local cluster and return word counts."""
    with pc.LocalCluster() as cluster:
        return collections.Counter(cluster.run(pipeline, sentences(count)))


if __name__ == "__main__":
    print(main().most_common(10))
