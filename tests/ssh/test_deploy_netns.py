"""Deployments to hosts that are Linux network namespaces: separate hosts, a partition, a jump host.

Each namespace runs its own sshd on port 22 of its own address. Skipped (with the reason) only where namespaces
cannot be created.
"""
from __future__ import annotations

import collections
import re
import socket
import time

import pytest

import pipeline_cluster as pc
from pipeline_cluster import cli
from pipeline_cluster.deploy.errors import DeployError, NodesMissing
from tests.helpers import NO_HANG, wait_until
from tests.sshd import NetLab, alive, tagger

pytestmark = [pytest.mark.ssh, pytest.mark.netns]


@pytest.fixture
def netlab():
    """A NetLab, deleted after the test; skip where namespaces cannot be made."""
    reason = NetLab.available()
    if reason:
        pytest.skip(reason)
    lab = NetLab()
    yield lab
    lab.close()


@pytest.mark.timeout(90)
def test_two_hosts_run_exactly_once_and_down_leaves_nothing(ssh_lab, netlab, capsys):
    hosts = {label: netlab.host(label) for label in ("a", "b")}
    servers = {label: ssh_lab.sshd(ip, netns=netlab.namespace(label), port=22) for label, ip in hosts.items()}
    path = ssh_lab.config([ssh_lab.node(servers[label], label) for label in hosts], connect="direct")
    with pc.SSHCluster.from_config(path, credit=64) as cluster:
        outputs = list(cluster.run([tagger()], range(3000)))
    assert collections.Counter(x for x, _ in outputs) == collections.Counter(range(3000))
    assert {tag for _, tag in outputs} == {"a", "b"}
    assert cli.main(["deploy", "down", str(path)]) == 0
    assert "no node was running" in capsys.readouterr().out
    for label, server in servers.items():
        assert wait_until(lambda server=server: server.sessions() == [], 10), (label, server.sessions())


@pytest.mark.timeout(90)
def test_partition_is_detected_by_heartbeat_and_the_cut_off_node_exits(ssh_lab, netlab, tmp_path):
    hosts = {label: netlab.host(label) for label in ("a", "b")}
    servers = {label: ssh_lab.sshd(ip, netns=netlab.namespace(label), port=22) for label, ip in hosts.items()}
    dead_after = 2.0
    path = ssh_lab.config([ssh_lab.node(servers[label], label) for label in hosts], connect="tunnel",
                          heartbeat=0.2, dead_after=dead_after)
    root_log = tmp_path / "root.log"
    with pc.SSHCluster.from_config(path, credit=16, log_file=str(root_log)) as cluster:
        node_a = cluster.hosts[0].pid
        outputs = []
        for x, tag in cluster.run([tagger(0.005)], range(1500)):
            outputs.append((x, tag))
            if len(outputs) == 200:
                netlab.set_link("a", up=False)  # no FIN, no RST: only heartbeats can tell
        link_a = cluster.links[0]
        assert not link_a.alive and "no heartbeat" in link_a.lost_reason, link_a.lost_reason
        # the node on the far side noticed too: it ended its session and exited by itself
        assert wait_until(lambda: not alive(node_a), NO_HANG), "the partitioned node is still running"
        netlab.set_link("a", up=True)
    assert collections.Counter(x for x, _ in outputs) == collections.Counter(range(1500))
    assert collections.Counter(tag for _, tag in outputs)["b"] > 1300 - 200
    assert "node a lost: no heartbeat" in root_log.read_text()  # the root's log says so
    for server in servers.values():
        assert wait_until(lambda server=server: server.sessions() == [], 15), server.sessions()


@pytest.mark.timeout(90)
def test_jump_host_reaches_a_host_the_root_cannot(ssh_lab, netlab):
    bastion = netlab.host("j")
    netlab.host("x", to_root=False)
    _, inner = netlab.link("j", "x")
    jump_server = ssh_lab.sshd(bastion, netns=netlab.namespace("j"), port=22)
    inner_server = ssh_lab.sshd(inner, netns=netlab.namespace("x"), port=22)
    with pytest.raises(OSError):  # no route from the root to the inner address
        socket.create_connection((inner, 22), timeout=2).close()
    node = ssh_lab.node(inner_server, "inner", jump=f"root@{bastion}")
    path = ssh_lab.config([node], connect="tunnel")
    with pc.SSHCluster.from_config(path) as cluster:
        assert sorted(x for x, tag in cluster.run([tagger()], range(200)) if tag == "inner") == list(range(200))
    assert wait_until(lambda: inner_server.sessions() == [] and jump_server.sessions() == [], 10)


@pytest.mark.timeout(90)
def test_an_ssh_config_alias_with_proxyjump_reaches_a_host_behind_a_bastion(ssh_lab, netlab, capsys):
    bastion = netlab.host("j")
    netlab.host("x", to_root=False)
    _, inner = netlab.link("j", "x")
    jump_server = ssh_lab.sshd(bastion, netns=netlab.namespace("j"), port=22)
    inner_server = ssh_lab.sshd(inner, netns=netlab.namespace("x"), port=22)
    ssh_lab.ssh_config.write_text(f"""
Host inner-*
    HostName {inner}
    ProxyJump bastion
    ConnectTimeout 4
    ServerAliveInterval 7

Host bastion
    HostName {bastion}

Host *
    User root
    IdentityFile {ssh_lab.user_key}
    IdentitiesOnly yes
    UserKnownHostsFile {ssh_lab.known_hosts}
""")
    node = {**ssh_lab.node(inner_server, "inner"), "host": "inner-x"}
    del node["port"]
    path = ssh_lab.config([node], {"user": None, "identity_file": None, "known_hosts": None,
                                   "connect_timeout": None}, connect="tunnel")
    assert cli.main(["deploy", "check", "--explain", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"inner: root@{inner}:22 via root@{bastion}" in out and "(HostName of 'inner-x')" in out
    assert re.search(r"connect_timeout +4\.0 +ssh_config ", out) and re.search(r"keepalive +7\.0 +ssh_config", out)
    with pc.SSHCluster.from_config(path) as cluster:
        assert sorted(x for x, tag in cluster.run([tagger()], range(200)) if tag == "inner") == list(range(200))
    assert wait_until(lambda: inner_server.sessions() == [] and jump_server.sessions() == [], 10)


@pytest.mark.timeout(120)
def test_min_nodes_goes_on_without_a_blackholed_host_within_one_connect_timeout(ssh_lab, netlab, capsys):
    hosts = {label: netlab.host(label) for label in ("a", "b", "c")}
    servers = {label: ssh_lab.sshd(ip, netns=netlab.namespace(label), port=22) for label, ip in hosts.items()}
    netlab.blackhole("c")  # up, but nothing it sends reaches us: every connect runs into its timeout
    timeout = 4.0
    path = ssh_lab.config([ssh_lab.node(servers[label], label) for label in hosts], {"connect_timeout": timeout},
                          connect="tunnel", min_nodes=2)
    started = time.monotonic()
    with pytest.warns(NodesMissing) as warned:
        cluster = pc.SSHCluster.from_config(path, credit=64)
    elapsed = time.monotonic() - started
    with cluster:
        assert timeout <= elapsed < 2 * timeout, elapsed  # the hosts were contacted concurrently
        (error,) = warned[0].message.errors
        assert (error.node, error.phase) == ("c", "connect") and "timed out" in str(error), error
        assert [(h.node, h.ok) for h in cluster.hosts] == [("a", True), ("b", True), ("c", False)]
        assert cluster.hosts[2].error is error
        outputs = list(cluster.run([tagger()], range(3000)))
    assert collections.Counter(x for x, _ in outputs) == collections.Counter(range(3000))
    assert {tag for _, tag in outputs} == {"a", "b"}

    for action in (["status"], ["down", "--grace", "5"]):
        started = time.monotonic()
        assert cli.main(["deploy", *action, str(path)]) == 1  # c could not be asked
        elapsed = time.monotonic() - started
        assert elapsed < 2 * timeout, (action, elapsed)
        err = capsys.readouterr().err
        assert err.count("error: ") == 1 and "node c (" in err and "connect failed" in err, err
    for label, server in servers.items():
        assert wait_until(lambda server=server: server.sessions() == [], 10), (label, server.sessions())


@pytest.mark.timeout(60)
def test_fewer_than_min_nodes_up_fails_the_deploy_and_stops_the_rest(ssh_lab, netlab):
    hosts = {label: netlab.host(label) for label in ("a", "b")}
    servers = {label: ssh_lab.sshd(ip, netns=netlab.namespace(label), port=22) for label, ip in hosts.items()}
    netlab.blackhole("b")
    path = ssh_lab.config([ssh_lab.node(servers[label], label) for label in hosts], {"connect_timeout": 2.0},
                          min_nodes=2)
    with pytest.raises(DeployError, match=r"1 of 2 node\(s\) failed to start:\nnode b .*connect failed") as caught:
        pc.SSHCluster.from_config(path)
    assert [e.node for e in caught.value.errors] == ["b"]
    assert wait_until(lambda: servers["a"].sessions() == [], 10)


@pytest.mark.timeout(60)
def test_nodes_behind_an_unreachable_jump_host_share_its_one_connect_timeout(ssh_lab, netlab, capsys):
    bastion = netlab.host("j")
    server = ssh_lab.sshd(bastion, netns=netlab.namespace("j"), port=22)
    netlab.blackhole("j")
    timeout = 3.0
    nodes = [{**ssh_lab.node(server, name), "jump": f"root@{bastion}"} for name in ("x", "y", "z")]
    path = ssh_lab.config(nodes, {"connect_timeout": timeout})
    started = time.monotonic()
    assert cli.main(["deploy", "status", str(path)]) == 1
    elapsed = time.monotonic() - started
    assert elapsed < 2 * timeout, elapsed  # one attempt at the jump host, not one per node
    err = capsys.readouterr().err
    assert err.count(f"jump host root@{bastion}") == 3 and err.count("connect failed") == 3, err
