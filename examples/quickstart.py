"""The README's tour: a generator stage, a class stage with args, a stage that drops, on this machine.

    python examples/quickstart.py
"""
import pipeline_cluster as pc


def split(line):
    yield from line.split()


class Tagger:
    def __init__(self, tag):
        self.tag = tag

    def __call__(self, word):
        return self.tag + word


def no_short(word):
    return word if len(word) > 3 else None


pipeline = pc.Pipeline([pc.Stage(split, generator=True), pc.Stage(Tagger, args=("#",)), no_short], name="tags")

if __name__ == "__main__":
    with pc.LocalCluster() as cluster:
        for out in cluster.run(pipeline, ["a quick brown fox", "jumps over the lazy dog"], ordered=True):
            print(out)
        print(cluster.stats()["Tagger"]["items_out"], "words tagged;", len(cluster.failures()), "failures")
