"""RayCluster on a local Ray: the same pipeline as on any cluster, with Ray placing the node servers.

    pip install "pipeline_cluster[ray]"
    python examples/ray_local.py
"""
import pipeline_cluster as pc


def shout(line: str) -> str:
    return line.upper()


def words(line: str) -> list[str]:
    return line.split()


if __name__ == "__main__":
    lines = ["the quick brown fox", "jumps over", "the lazy dog"] * 1000
    with pc.RayCluster() as cluster:  # no Ray running: starts a local one, and stops it on close()
        counted = sum(1 for _ in cluster.run([shout, pc.Stage(words, generator=True)], lines))
        print(f"{counted} words on {len(cluster.worker_parents)} Ray node(s)")
