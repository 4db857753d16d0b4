"""numpy arrays through two stages: normalise each array, then reduce it to its row norms; the arrays travel as
out-of-band buffers, and the results match numpy run here.

    python examples/arrays.py
"""
import sys

import pipeline_cluster as pc

try:
    import numpy as np
except ImportError:
    sys.exit("examples/arrays.py needs numpy: pip install numpy")


def normalise(a):
    return (a - a.mean()) / a.std()


def row_norms(a):
    return np.linalg.norm(a, axis=1)


pipeline = pc.Pipeline([normalise, row_norms], name="arrays")

if __name__ == "__main__":
    arrays = [np.random.default_rng(seed).random((256, 256)) for seed in range(16)]
    with pc.LocalCluster() as cluster:
        results = list(cluster.run(pipeline, arrays, ordered=True))
    expected = [np.sqrt((((a - a.mean()) / a.std()) ** 2).sum(axis=1)) for a in arrays]  # the same, in one go here
    matching = sum(np.allclose(got, want) for got, want in zip(results, expected))
    mib = sum(a.nbytes for a in arrays) / 2**20
    print(f"{len(arrays)} arrays of {arrays[0].shape} {arrays[0].dtype} in ({mib:.0f} MiB), "
          f"{len(results)} of {results[0].shape} out")
    print(f"{matching} of {len(arrays)} match numpy run here")
