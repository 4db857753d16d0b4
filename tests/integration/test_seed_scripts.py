"""Scripts written against the older project's code run unchanged, and end quietly: its log server and node server
options, `log(msg, addr)`, node servers started in multiprocessing.Processes with `Root(*addrs)` called at once,
its single-machine `pipeline.Pipeline`, and a script that never calls close() (or is stopped with Ctrl-C)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import REPO, live_children, live_workers


def _run_script(tmp_path, source: str, timeout: float = 90) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})


SEED_CLUSTER_SCRIPT = """
    import multiprocessing
    import time

    import pipeline_cluster.multiprocess_logging as mpl
    import pipeline_cluster.node
    import pipeline_cluster.root


    def serve_node(address, log_address):
        pipeline_cluster.node.Server(address, log_address, conn_buffer_size=2, benchmark_folder="bench").serve()


    def wait(item):
        mpl.log(item)
        return (item, item)


    def wait_more(item):
        mpl.log(item)
        return item + "!"


    if __name__ == "__main__":
        log_address = ("127.0.0.1", {log_port})
        mpl.serve(log_address, "{log_file}", conn_buffer_size=4, detach=True)
        mpl.configure(log_address)
        node_address = ("127.0.0.1", {node_port})
        node = multiprocessing.Process(target=serve_node, args=(node_address, log_address), daemon=True)
        node.start()
        cluster = pipeline_cluster.root.Root(node_address)  # at once: the node may still be starting
        cluster.setup("example pipeline", 1.0, [{{"function": wait, "is_generator": True}},
                                                {{"function": wait_more, "is_generator": False}}])
        outputs = []
        cluster.boot(outputs.append)
        cluster.feed("hello world", "hello again")
        cluster.wait_empty()
        mpl.log("seed script done", log_address)
        print(sorted(outputs))
        cluster.reset()
        node.terminate()
        node.join()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(120)
def test_a_seed_cluster_script_runs_unchanged_and_ends_quietly(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_CLUSTER_AUTHKEY", "seed-test-key")
    log_file = tmp_path / "log.txt"
    done = _run_script(tmp_path, SEED_CLUSTER_SCRIPT.format(log_port=_free_port(), node_port=_free_port(),
                                                            log_file=log_file))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(["hello again!", "hello again!", "hello world!", "hello world!"])
    assert "Traceback" not in done.stderr and "Exception in thread" not in done.stderr, done.stderr
    text = log_file.read_text()
    assert text.count("] hello world") == 3 and "seed script done" in text, text  # wait logs it once, wait_more twice
    assert os.stat(log_file).st_mode & 0o777 == 0o600


SEED_PIPELINE_SCRIPT = """
    import pipeline_cluster.multiprocess_logging as mpl
    from pipeline_cluster.pipeline import Pipeline


    def split(item):
        mpl.log("split " + item)
        return item.split()


    class Suffix:
        def __init__(self, suffix):
            self.suffix = suffix

        def __call__(self, word):
            return word + self.suffix


    if __name__ == "__main__":
        server = mpl.serve(("127.0.0.1", 0), "{log_file}", detach=True)
        pipeline = Pipeline(server.address, version=1.0, name="words", benchmark_folder="bench")
        pipeline.add_task(split, is_generator=True)
        pipeline.add_task(Suffix, args=("!",))
        assert pipeline.is_reset() and not pipeline.is_running()
        pipeline.boot(n_worker=2)
        assert pipeline.is_running() and pipeline.is_awake()
        pipeline.feed("a b", "c d e")
        pipeline.wait_output()
        pipeline.wait_idle()
        pipeline.wait_empty()
        assert pipeline.is_empty()
        first = pipeline.get_output()
        assert pipeline.get_output() == []
        pipeline.sleep()
        pipeline.wait_asleep()
        assert pipeline.is_asleep() and not pipeline.is_awake()
        pipeline.wakeup()
        pipeline.feed("f")
        pipeline.wait_empty()
        print(sorted(first + pipeline.get_output()))
        pipeline.reset()
        assert pipeline.is_reset()
"""


@pytest.mark.timeout(120)
def test_the_seed_single_machine_pipeline_runs_unchanged(tmp_path):
    log_file = tmp_path / "log.txt"
    done = _run_script(tmp_path, SEED_PIPELINE_SCRIPT.format(log_file=log_file))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(["a!", "b!", "c!", "d!", "e!", "f!"])
    assert "Traceback" not in done.stderr, done.stderr
    assert log_file.read_text().count("] split ") == 3


NO_CLOSE_SCRIPT = """
    import pipeline_cluster as pc


    def double(x):
        return x * 2


    cluster = pc.LocalCluster(workers=4)
    cluster.setup("no close", 1, [double, double])
    cluster.boot()
    cluster.feed(*range(2000))
    cluster.wait_empty()
    print(len(cluster.outputs))
"""


@pytest.mark.timeout(120)
def test_a_script_that_never_closes_exits_silently_and_leaves_no_process(tmp_path):
    for _ in range(3):  # the noise it once made came from a race at exit: look more than once
        done = _run_script(tmp_path, NO_CLOSE_SCRIPT)
        assert done.returncode == 0 and done.stdout.strip() == "2000", done.stderr
        assert done.stderr == ""
    assert live_children() == []


CTRL_C_SCRIPT = """
    import time
    import pipeline_cluster as pc


    def slow(x):
        time.sleep(60)
        return x


    cluster = pc.LocalCluster(workers=2)
    cluster.setup("ctrl-c", 1, [slow])
    cluster.boot()
    cluster.feed(1, 2, 3)
    print("waiting", flush=True)
    cluster.wait_empty()
"""


@pytest.mark.timeout(60)
def test_ctrl_c_in_wait_empty_stops_at_once_and_leaves_no_process(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(CTRL_C_SCRIPT))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "waiting"
    workers = [p for p in live_workers() if p.pid != proc.pid]
    assert len(workers) == 2, workers  # the two workers run an item each, for a minute
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 20  # not the minute the items would take
    assert err.rstrip().endswith("KeyboardInterrupt"), err  # the caller's own interrupt, and nothing else
    assert "Exception in thread" not in err and err.count("Traceback") == 1, err
    assert live_children() == []
