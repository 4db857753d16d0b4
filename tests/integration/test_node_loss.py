"""Losing nodes mid-run: a SIGKILLed node and a SIGSTOPped one; every output still arrives exactly once."""
from __future__ import annotations

import collections
import os
import signal
import threading
import time

import pytest

import pipeline_cluster as pc
from tests.helpers import returns_within


def tagged(x):
    time.sleep(0.002)
    return (x, os.environ.get("NODE_TAG"))


@pytest.mark.timeout(120)
def test_sigkill_one_node_and_sigstop_another_mid_run(nodes):
    servers = {tag: nodes(f"127.0.0.{20 + i}", env={"NODE_TAG": tag}) for i, tag in enumerate(["a", "b", "c"])}
    seen = collections.Counter()
    with pc.Cluster.connect([s.address for s in servers.values()], credit=64, heartbeat=0.2,
                            dead_after=2.0) as cluster:
        outputs = []
        for x, tag in cluster.run([tagged], range(3000)):
            outputs.append(x)
            seen[tag] += 1
            if len(outputs) == 300:
                servers["a"].proc.send_signal(signal.SIGKILL)
                servers["b"].proc.send_signal(signal.SIGSTOP)
        status = cluster.status()
    assert collections.Counter(outputs) == collections.Counter(range(3000))
    assert seen["c"] > 2000  # the survivor did most of the work
    survivor = servers["c"].address[0] + ":" + str(servers["c"].address[1])
    by_node = {figures["node"]: figures for figures in status["node_figures"]}
    assert by_node[survivor]["state"] == "ready" and by_node[survivor]["credit"] == 64
    lost = [figures for name, figures in by_node.items() if name != survivor]
    assert len(lost) == 2 and all(figures["state"] == "lost" and figures["lost_reason"] for figures in lost)
    assert status["nodes"] == [survivor] and status["ready_nodes"] == [survivor]  # lost nodes leave status()
    log = (cluster.rundir.log_file).read_text()
    for name in ("a", "b"):  # each loss said once, with where its items went
        address = f"{servers[name].address[0]}:{servers[name].address[1]}"
        assert log.count(f"node {address} lost: ") == 1 and f"moved to {survivor}" in log, log[-2000:]


@pytest.mark.timeout(60)
def test_no_node_left_fails_clearly(nodes):
    server = nodes("127.0.0.30")
    with pc.Cluster.connect([server.address], heartbeat=0.2, dead_after=2.0) as cluster:
        results = cluster.run([tagged], iter(int, 1))  # endless
        next(results)
        threading.Timer(0.2, server.proc.send_signal, (signal.SIGKILL,)).start()
        with returns_within("a run that lost its only node"), pytest.raises(pc.ClusterError, match="no node left"):
            for _ in results:
                pass
