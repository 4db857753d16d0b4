"""Nodes joining and leaving a running cluster of real node servers: `add_node` while a pipeline streams gives the
new node work, `remove_node` drains one and stops its workers, and every output still arrives exactly once."""
from __future__ import annotations

import os
import time

import psutil
import pytest

import pipeline_cluster as pc
from tests.helpers import wait_until


def node_tagged(x: int) -> tuple[int, str | None]:
    """The input, with the tag of the node server whose worker ran it."""
    time.sleep(0.002)
    return x, os.environ.get("NODE_TAG")


@pytest.mark.timeout(90)
def test_a_node_added_mid_run_takes_work(nodes):
    first, second = nodes("127.0.0.1", workers=1), nodes("127.0.0.1", workers=1, env={"NODE_TAG": "second"})
    with pc.Cluster.connect([first.address], credit=64) as cluster:  # most inputs still wait when it joins
        outputs = []
        for output in cluster.run([node_tagged], range(3_000)):
            outputs.append(output)
            if len(outputs) == 300:
                name = cluster.add_node(second.address)
        assert sorted(x for x, _ in outputs) == list(range(3_000))
        assert "second" in {tag for _, tag in outputs}, "the node that joined got no work"
        assert {node["node"]: node["state"] for node in cluster.nodes()}[name] == "ready"


@pytest.mark.timeout(90)
def test_a_node_removed_mid_run_finishes_what_it_holds_and_its_workers_stop(nodes):
    first, second = nodes("127.0.0.1", workers=1), nodes("127.0.0.1", workers=1, env={"NODE_TAG": "second"})
    with pc.Cluster.connect([first.address, second.address], credit=64) as cluster:
        leaving = f"{second.address[0]}:{second.address[1]}"
        outputs = []
        for output in cluster.run([node_tagged], range(3_000)):
            outputs.append(output)
            if len(outputs) == 300:
                cluster.remove_node(leaving)
                assert [node["node"] for node in cluster.nodes()] == [f"{first.address[0]}:{first.address[1]}"]
        assert sorted(x for x, _ in outputs) == list(range(3_000))  # its items finished there, none ran twice
        by_second = sum(1 for _, tag in outputs if tag == "second")
        assert 0 < by_second < 1_500, by_second
        assert wait_until(lambda: not psutil.Process(second.proc.pid).children(), timeout=15), "workers outlived it"
        assert second.proc.poll() is None  # the node server itself serves on, for other roots
        with pytest.raises(ValueError, match="no node 'nowhere:1'"):
            cluster.remove_node("nowhere:1")
        with pytest.raises(pc.ClusterError, match="the cluster's last"):
            cluster.remove_node(f"{first.address[0]}:{first.address[1]}")
        assert sorted(cluster.run([abs], [-3, 4])) == [3, 4]  # the cluster goes on with the node it kept
