"""Node servers as real processes on loopback addresses: the seed's flow, many nodes, flow control, auth, logs."""
from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import pipeline_cluster as pc
import pipeline_cluster.node
import pipeline_cluster.root
from pipeline_cluster import multiprocess_logging as mpl
from pipeline_cluster.logs import route
from tests.helpers import KEY, NO_HANG, NodeProcess, returns_within, wait_until


def wait(item):
    mpl.log(f"wait {item}")
    time.sleep(0.02)
    return (item, item)


def wait_more(item):
    mpl.log(f"wait_more {item}")
    time.sleep(0.04)
    return item


@pytest.mark.timeout(90)
def test_seed_usage_flow(nodes, tmp_path):
    log_file = tmp_path / "log.txt"
    log_server = mpl.serve(("127.127.127.127", 0), str(log_file), detach=True)
    node = nodes("127.127.127.127", log_addr=log_server.address)
    mpl.configure(log_server.address)
    mpl.log("hello world!")
    cluster = pipeline_cluster.root.Root(node.address)
    try:
        taskchain = [{"function": wait, "is_generator": True}, {"function": wait_more, "is_generator": False}]
        cluster.setup("example pipeline", 1.0, taskchain)
        received = []
        cluster.boot(output_handler=received.append)
        cluster.feed("hello world!", "hello world!")
        cluster.wait_input()
        cluster.wait_empty()
        assert received == ["hello world!"] * 4
        assert cluster.status()["unfinished"] == 0
        cluster.reset()
        cluster.setup("again", 2, [str.upper])
        cluster.boot(output_handler=received.append)
        cluster.feed("x")
        cluster.wait_empty()
        assert received[-1] == "X"
    finally:
        cluster.close()
        route.attach_local(None)
    assert wait_until(lambda: log_file.read_text().count("] wait_more hello world!") == 4, 10), log_file.read_text()
    text = log_file.read_text()
    assert "hello world!" in text and text.count("] wait hello world!") == 2
    assert "node=127.127.127.127:" in text
    log_server.stop()


def tag(x):
    return (x, os.environ.get("NODE_TAG"), os.getpid())


@pytest.mark.timeout(120)
def test_three_nodes_every_output_exactly_once(nodes):
    servers = [nodes(f"127.0.0.{i}", env={"NODE_TAG": str(i)}) for i in (2, 3, 4)]
    with pc.Cluster.connect([s.address for s in servers], credit=128) as cluster:
        outputs = list(cluster.run([tag], range(5000)))
    values = collections.Counter(x for x, _, _ in outputs)
    assert values == collections.Counter(range(5000))
    per_node = collections.Counter(node for _, node, _ in outputs)
    assert set(per_node) == {"2", "3", "4"}, per_node


def stalls_on_slow(x):
    """A stage: the node's tag; on the node tagged "slow" only once the file $GATE exists (60 s at most)."""
    if os.environ.get("NODE_TAG") == "slow":
        gate = os.environ["GATE"]
        wait_until(lambda: os.path.exists(gate), 60, 0.005)
    return os.environ.get("NODE_TAG")


@pytest.mark.timeout(120)
def test_a_stalled_node_holds_only_its_credit_and_the_others_do_the_rest(nodes, tmp_path):
    gate = tmp_path / "gate"
    fast = [nodes(f"127.0.0.{i}", env={"NODE_TAG": f"fast{i}"}) for i in (5, 6)]
    slow = nodes("127.0.0.7", env={"NODE_TAG": "slow", "GATE": str(gate)})
    credit, total = 16, 1500
    outputs: list[str] = []
    reached: list[bool] = []

    def open_gate() -> None:  # all but one credit's worth came out while the slow node could finish nothing
        reached.append(wait_until(lambda: len(outputs) >= total - credit, NO_HANG))
        gate.touch()

    opener = threading.Thread(target=open_gate)
    opener.start()
    try:
        with pc.Cluster.connect([slow.address] + [f.address for f in fast], credit=credit) as cluster:
            for tag in cluster.run([stalls_on_slow], range(total)):
                outputs.append(tag)
    finally:
        gate.touch()
        opener.join(NO_HANG + 5)
    counts = collections.Counter(outputs)
    assert reached == [True], f"the fast nodes stopped at {counts} while the slow node stalled"
    assert sum(counts.values()) == total
    assert 1 <= counts["slow"] <= credit, counts  # it had work, and never more than its credit


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer closes or resets the connection within `timeout` s (anything it sent before is skipped)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def _node_log(node: NodeProcess, text: str) -> bool:
    return text in node.log.read_text()


@pytest.mark.timeout(60)
def test_bad_clients_are_refused_and_the_node_keeps_serving(nodes):
    node = nodes("127.0.0.8")
    # wrong key
    with pytest.raises(pc.ClusterError, match="cannot connect"):
        pc.Cluster.connect([node.address], authkey="wrong key")
    assert wait_until(lambda: _node_log(node, "wrong authkey"), 10), node.log.read_text()
    # garbage bytes
    with socket.create_connection(node.address, timeout=5) as garbage:
        garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
        assert closed_by_peer(garbage, timeout=NO_HANG)
    assert wait_until(lambda: _node_log(node, "bad magic"), 10), node.log.read_text()
    # a silent client holds no one up: a correct root connects and runs meanwhile
    silent = socket.create_connection(node.address, timeout=5)
    with pc.Cluster.connect([node.address]) as cluster:
        assert sorted(cluster.run([str.upper], ["a", "b"])) == ["A", "B"]
    assert closed_by_peer(silent, timeout=NO_HANG)  # the node drops it after its handshake timeout (5 s)
    silent.close()
    assert wait_until(lambda: _node_log(node, "silent"), 10), node.log.read_text()
    assert node.proc.poll() is None


def logs_from_node(x):
    mpl.log(f"task log {x} from {os.environ.get('NODE_TAG')}")
    return x


@pytest.mark.timeout(90)
def test_task_logs_on_every_node_reach_the_log_server(nodes, tmp_path):
    log_file = tmp_path / "central.log"
    log_server = mpl.serve(("127.0.0.1", 0), str(log_file), detach=True)
    servers = [nodes(f"127.0.0.{i}", env={"NODE_TAG": f"n{i}"}, log_addr=log_server.address) for i in (9, 10)]
    with pc.Cluster.connect([s.address for s in servers], credit=4) as cluster:
        assert sorted(cluster.run([logs_from_node], range(40))) == list(range(40))
    assert wait_until(lambda: log_file.read_text().count("task log") == 40, 10), log_file.read_text()
    text = log_file.read_text()
    assert "from n9" in text and "from n10" in text
    log_server.stop()


@pytest.mark.timeout(60)
def test_log_without_server_falls_back_to_stderr_once(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    mpl.configure(("127.0.0.1", port), authkey="k")
    try:
        with returns_within("log() with the log server unreachable"):
            mpl.log("first")
            mpl.log("second")
    finally:
        route.attach_local(None)
    err = capsys.readouterr().err
    assert err.count("unreachable") == 1 and "first" in err and "second" in err


@pytest.mark.timeout(60)
def test_seed_node_server_class_in_process(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_CLUSTER_AUTHKEY", KEY)
    server = pipeline_cluster.node.Server(("127.0.0.11", 0))
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        with pc.Cluster.connect([server.address]) as cluster:
            assert sorted(cluster.run([abs], [-1, -2])) == [1, 2]
    finally:
        server.stop()
        thread.join(10)
    assert not thread.is_alive()


@pytest.mark.timeout(60)
def test_pipeline_a_node_cannot_import_is_a_clear_error(nodes, tmp_path, monkeypatch):
    module = tmp_path / "only_on_root.py"
    module.write_text("def f(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_on_root
    server = nodes("127.0.0.12")
    with pc.Cluster.connect([server.address]) as cluster:
        with pytest.raises(pc.ClusterError, match="cannot load the pipeline: ModuleNotFoundError"):
            cluster.setup("x", 1, [only_on_root.f])
        assert sorted(cluster.run([abs], [-3])) == [3]  # the node is still fine


MAIN_CLASS_SCRIPT = textwrap.dedent("""
    import sys, threading
    from dataclasses import dataclass
    import pipeline_cluster as pc

    @dataclass
    class Point:              # defined in __main__: travels by value, comes back as this very class
        x: int

    def shift(p):
        return Point(p.x + 1)

    def run(cluster):
        items = [Point(1), threading.Lock(), Point(2)]   # the lock cannot be pickled: a dead letter, not a crash
        outs = list(cluster.run([shift], items))
        assert sorted(o.x for o in outs) == [2, 3] and all(type(o) is Point for o in outs), outs
        [letter] = cluster.failures()
        assert letter.error_type == "PicklingError" and not letter.refeedable, letter
        assert letter.stage == "shift", letter

    with pc.LocalCluster(workers=1, run_dir=sys.argv[1]) as cluster:
        run(cluster)
    with pc.Cluster.connect([(sys.argv[2], int(sys.argv[3]))], run_dir=sys.argv[1]) as cluster:
        run(cluster)
    print("OK")
""")


@pytest.mark.timeout(90)
def test_main_module_items_and_unpicklable_items_locally_and_remotely(nodes, tmp_path):
    node = nodes("127.0.0.13")
    script = tmp_path / "points.py"
    script.write_text(MAIN_CLASS_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), *map(str, node.address)],
                            capture_output=True, text=True, timeout=80)
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stderr[-3000:]
    assert node.proc.poll() is None
