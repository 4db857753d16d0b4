"""Arrays between the node and its worker processes through the channels' shared rings (memfds): they arrive equal
and of the same kinds, and no ring is left mapped or open after a run, after close(), or after a worker is SIGKILLed
in the middle of a batch."""
from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import pytest

import pipeline_cluster as pc
from pipeline_cluster.transport import wire
from pipeline_cluster.transport.auth import SessionKeys
from tests.helpers import wait_until

np = pytest.importorskip("numpy", reason="arrays through shared memory are about numpy items (the bench extra)")

RING = "memfd:" + wire._MEMFD_NAME  # how a ring shows in /proc/<pid>/maps and as an fd's link


def ring_inodes(pid: int | str = "self") -> set[int]:
    """Inodes of the rings that process `pid` maps or holds an fd of."""
    inodes = {int(line.split()[4]) for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if RING in line}
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            if RING in os.readlink(f"{fd_dir}/{name}"):
                inodes.add(os.stat(f"{fd_dir}/{name}").st_ino)
        except FileNotFoundError:
            pass  # closed meanwhile (e.g. the listing's own fd)
    return inodes


def dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


def sample_arrays() -> list:
    """Arrays of several dtypes, shapes and layouts, big ones (through the rings) and small ones (in-band)."""
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


def test_arrays_arrive_equal_and_no_ring_outlives_the_workers(tmp_path):
    arrays = sample_arrays()
    shm_before, rings_before = dev_shm(), ring_inodes()
    with pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run")) as cluster:
        run = cluster.run([pc.Stage(echo)], arrays * 3, ordered=True)
        outputs = [next(run)]
        assert ring_inodes() - rings_before, "the big arrays go through no ring"
        outputs += run
        assert ring_inodes() == rings_before, "a run's rings outlive it"
        for sent, (got, writable_there, total) in zip(arrays * 3, outputs):
            assert type(got) is np.ndarray and got.dtype == sent.dtype and got.shape == sent.shape
            assert np.array_equal(got, sent)
            assert writable_there == sent.flags.writeable and got.flags.writeable == sent.flags.writeable
            if total is not None:
                assert total == pytest.approx(sent.sum().item())
        assert dev_shm() <= shm_before
    assert ring_inodes() == rings_before == set()
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
def test_worker_sigkilled_mid_batch_leaves_no_ring_behind(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    inputs = [np.full(1 << 17, float(i)) for i in range(40)]  # 1 MiB each
    inputs[25][0] = -1
    shm_before, rings_before = dev_shm(), ring_inodes()
    stage = pc.Stage(hold_when_marked, args=(str(marks),),
                     supervision=pc.Supervision(max_attempts=3, backoff=(0.01, 0.05)))
    with pc.LocalCluster(workers=2, run_dir=str(tmp_path / "run")) as cluster:
        outputs = cluster.run([stage], inputs, ordered=True)
        got = [next(outputs)]
        started = marks / "started"
        assert wait_until(started.exists, timeout=30), "the marked item never started"
        victim = int(started.read_text())
        victims_rings = ring_inodes(victim)
        assert victims_rings, "the worker with the marked item maps no ring"
        assert victims_rings <= ring_inodes()  # the node maps the same ones
        os.kill(victim, signal.SIGKILL)
        got += list(outputs)
        assert not ring_inodes() & victims_rings, "the killed worker's rings are still mapped or open in the node"
        assert len(got) == len(inputs)
        for sent, result in zip(inputs, got):
            assert np.array_equal(result, sent * 2)
        assert cluster.stats()["hold_when_marked"]["restarts"] >= 1
        del got, result
    assert ring_inodes() == rings_before == set()
    assert dev_shm() <= shm_before


# The channel itself, over a socket pair in one process: kinds kept, the ring lapping and full.

def channel_pair(**kwargs) -> tuple[wire.Channel, wire.Channel]:
    left, right = socket.socketpair()
    return wire.Channel(left, **kwargs), wire.Channel(right, **kwargs)


@pytest.mark.timeout(60)
def test_channel_keeps_kinds_and_laps_the_ring():
    sender, receiver = channel_pair(share_memory=True)
    rng = np.random.default_rng(3)
    sizes = [wire._OUT_OF_BAND_MIN, 3 << 20, 100_000, 5 << 20, wire._RING_SIZE, 700_000] * 4
    messages = [rng.integers(0, 255, size, dtype=np.uint8) for size in sizes]
    received: list = []
    reader = threading.Thread(target=lambda: received.extend(receiver.recv() for _ in range(len(messages) + 2)))
    reader.start()
    try:
        for message in messages:  # back to back: the ring fills up and laps; the one over its size takes the socket
            sender.send(message)
        big = bytes(range(256)) * 1000
        sender.send(wire.out_of_band([big, big]))
        sender.send(bytearray(big))
        reader.join(30)
        assert not reader.is_alive()
        assert sender._ring_out is not None and sender._ring_out._head > 4 * wire._RING_SIZE  # lapped
    finally:
        sender.close()
        receiver.close()
        reader.join(5)
    for sent, got in zip(messages, received):
        assert np.array_equal(sent, got) and got.flags.writeable
    assert received[-2] == [big, big] and all(type(item) is bytes for item in received[-2])
    assert type(received[-1]) is bytearray and received[-1] == big
    assert ring_inodes() == set()


@pytest.mark.timeout(30)
def test_share_memory_only_on_trusted_socket_pairs_at_both_ends():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, pytest.raises(ValueError, match="share_memory"):
        wire.Channel(tcp, share_memory=True)
    left, right = socket.socketpair()
    with pytest.raises(ValueError, match="share_memory"):
        wire.Channel(left, keys=SessionKeys(send=b"s" * 32, recv=b"r" * 32), share_memory=True)
    sender, receiver = wire.Channel(left, share_memory=True), wire.Channel(right)
    try:
        sender.send(np.zeros(10_000))  # out-of-band, and the frames that stand for it fit the socket's buffer
        with pytest.raises(ConnectionError, match="corrupt frame header"):  # a peer without rings takes none
            receiver.recv()
        assert receiver.closed
    finally:
        sender.close()
        receiver.close()
    assert ring_inodes() == set()
