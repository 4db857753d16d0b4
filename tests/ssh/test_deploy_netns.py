"""Deployments to hosts that are Linux network namespaces: separate hosts, a partition, a jump host.

Each namespace runs its own sshd on port 22 of its own address. Skipped (with the reason) only where namespaces
cannot be created.
"""
from __future__ import annotations

import collections
import re
import socket

import pytest

import pipeline_cluster as pc
from pipeline_cluster import cli
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
def test_partition_is_detected_by_heartbeat_and_the_cut_off_node_exits(ssh_lab, netlab):
    hosts = {label: netlab.host(label) for label in ("a", "b")}
    servers = {label: ssh_lab.sshd(ip, netns=netlab.namespace(label), port=22) for label, ip in hosts.items()}
    dead_after = 2.0
    path = ssh_lab.config([ssh_lab.node(servers[label], label) for label in hosts], connect="tunnel",
                          heartbeat=0.2, dead_after=dead_after)
    with pc.SSHCluster.from_config(path, credit=16) as cluster:
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
