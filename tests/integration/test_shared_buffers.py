"""numpy arrays between the node and its worker processes: they arrive equal and of the same kinds, and no shared
memory of ours (a memfd, mapped or open, or an entry in /dev/shm) is left after a run, after close(), or after a
worker is SIGKILLed in the middle of a batch."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

import pipeline_cluster as pc
from tests.helpers import wait_until

np = pytest.importorskip("numpy", reason="numpy items need numpy (the test extra installs it)")

OURS = "memfd:pipeline-cluster"  # how a memfd of ours shows in /proc/<pid>/maps and as an fd's link


def memfd_inodes(pid: int | str = "self") -> set[int]:
    """Inodes of the memfds of ours that process `pid` maps or holds an fd of."""
    inodes = {int(line.split()[4]) for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if OURS in line}
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            if OURS in os.readlink(f"{fd_dir}/{name}"):
                inodes.add(os.stat(f"{fd_dir}/{name}").st_ino)
        except FileNotFoundError:
            pass  # closed meanwhile (e.g. the listing's own fd)
    return inodes


def dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


def sample_arrays() -> list:
    """Arrays of several dtypes, shapes and layouts: big ones (out-of-band buffers) and small ones (in-band)."""
    rng = np.random.default_rng(7)
    frozen = rng.random(70_000)
    frozen.flags.writeable = False
    return [
        rng.random((512, 256)),  # 1 MiB float64
        np.arange(3 * 40 * 1000, dtype=np.int32).reshape(3, 40, 1000),
        (rng.random(20_000) + 1j * rng.random(20_000)).astype(np.complex128),
        rng.random(300_000) > 0.5,  # bool
        np.asfortranarray(rng.random((300, 400)).astype(np.float32)),
        rng.random((1000, 200))[:, ::3],  # not contiguous
        frozen,  # read-only
        np.array(3.25),  # 0-d
        np.zeros(10, dtype=[("a", "i4"), ("b", "f8")]),  # structured, small
        rng.integers(0, 255, 3 << 20, dtype=np.uint8),  # 3 MiB
    ]


def echo(a):
    """The array back, with whether the worker got it writable, and its sum (the data as the worker saw it)."""
    return a, a.flags.writeable, a.sum().item() if a.dtype.names is None else None


@pytest.mark.timeout(120)
def test_arrays_arrive_equal_and_no_shared_memory_outlives_a_run(tmp_path):
    arrays = sample_arrays()
    shm_before, ours_before = dev_shm(), memfd_inodes()
    with pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run")) as cluster:
        run = cluster.run([pc.Stage(echo)], arrays * 3, ordered=True)
        outputs = [next(run)]
        assert memfd_inodes() - ours_before, "no memfd of ours seen while workers run: the check itself is broken"
        outputs += run
        assert memfd_inodes() == ours_before, "a run's memfds outlive it"
        assert dev_shm() <= shm_before
        for sent, (got, writable_there, total) in zip(arrays * 3, outputs):
            assert type(got) is np.ndarray and got.dtype == sent.dtype and got.shape == sent.shape
            assert np.array_equal(got, sent)
            assert writable_there == sent.flags.writeable and got.flags.writeable == sent.flags.writeable
            if total is not None:
                assert total == pytest.approx(sent.sum().item())
    assert memfd_inodes() == ours_before == set()
    assert dev_shm() <= shm_before


def hold_when_marked(a, marks):
    """Say 'running' through a file and wait (up to 60 s) for the test to kill this worker, on the first attempt
    at the item marked by a[0] == -1 only."""
    if a[0] == -1:
        started = os.path.join(marks, "started")
        if not os.path.exists(started):
            with open(started + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(started + ".tmp", started)
            threading.Event().wait(60)
    return a * 2


@pytest.mark.timeout(120)
def test_worker_sigkilled_mid_batch_leaves_no_shared_memory_behind(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    inputs = [np.full(1 << 17, float(i)) for i in range(40)]  # 1 MiB each
    inputs[25][0] = -1
    shm_before, ours_before = dev_shm(), memfd_inodes()
    stage = pc.Stage(hold_when_marked, args=(str(marks),),
                     supervision=pc.Supervision(max_attempts=3, backoff=(0.01, 0.05)))
    with pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run")) as cluster:
        outputs = cluster.run([stage], inputs, ordered=True)
        got = [next(outputs)]
        started = marks / "started"
        assert wait_until(started.exists, timeout=30), "the marked item never started"
        victim = int(started.read_text())
        victims = memfd_inodes(victim)
        assert victims, "the worker with the marked item maps no memfd of ours: the check itself is broken"
        assert victims <= memfd_inodes()  # the node maps the same ones
        os.kill(victim, signal.SIGKILL)
        got += outputs
        assert not memfd_inodes() & victims, "the killed worker's memfds are still mapped or open in the node"
        assert len(got) == len(inputs)
        for sent, result in zip(inputs, got):
            assert np.array_equal(result, sent * 2)
        assert cluster.stats()["hold_when_marked"]["restarts"] >= 1
    assert memfd_inodes() == ours_before == set()
    assert dev_shm() <= shm_before
