"""Deployments against real OpenSSH servers on 127.0.0.N: both connect modes, host keys, failures, orphans."""
from __future__ import annotations

import collections
import fcntl
import io
import json
import logging
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
import zipfile

import paramiko
import psutil
import pytest

import pipeline_cluster as pc
from pipeline_cluster import cli
from pipeline_cluster.deploy.errors import DeployError
from pipeline_cluster.deploy.wheel import build_wheel
from pipeline_cluster.rundir import new_run_id
from tests.helpers import NO_HANG, read_line, returns_within, wait_until
from tests.sshd import SshAgent, alive, keygen, tagger

pytestmark = pytest.mark.ssh


def deploy_error(path) -> DeployError:
    with pytest.raises(DeployError) as caught:
        pc.SSHCluster.from_config(path)
    return caught.value


@pytest.mark.timeout(90)
@pytest.mark.parametrize("connect", ["tunnel", "direct"])
def test_two_nodes_carry_a_pipeline_exactly_once_then_nothing_is_left(ssh_lab, connect, capsys):
    a, b = ssh_lab.sshd("127.0.0.2"), ssh_lab.sshd("127.0.0.3")
    path = ssh_lab.config([ssh_lab.node(a, "a", listen="127.0.0.2"), ssh_lab.node(b, "b")], connect=connect)
    with pc.SSHCluster.from_config(path, credit=64) as cluster:
        assert [(h.node, h.ok, h.ship) for h in cluster.hosts] == [("a", True, "existing"), ("b", True, "existing")]
        outputs = list(cluster.run([tagger()], range(4000)))
        assert collections.Counter(x for x, _ in outputs) == collections.Counter(range(4000))
        assert {node for _, node in outputs} == {"a", "b"}  # each node's env (NODE_TAG) reached its workers...
        for host in cluster.hosts:  # ...through the node's stdin, not its command line
            assert not any("NODE_TAG" in arg for arg in psutil.Process(host.pid).cmdline())
        # the seed's step-by-step interface works the same way
        cluster.setup("steps", 1, [{"function": tagger(), "is_generator": False}])
        cluster.boot()
        cluster.feed(*range(100))
        cluster.wait_empty(timeout=30)
        assert sorted(x for x, _ in cluster.outputs) == list(range(100))
        pids = [h.pid for h in cluster.hosts]
    assert not any(alive(pid) for pid in pids)
    assert cli.main(["deploy", "down", str(path)]) == 0
    assert "no node was running" in capsys.readouterr().out
    assert wait_until(lambda: ssh_lab.sessions() == [], 10), ssh_lab.sessions()


@pytest.mark.timeout(60)
def test_host_keys_unknown_pinned_changed_and_wrong_user_key(ssh_lab, capsys):
    server = ssh_lab.sshd("127.0.0.4", trust=False)
    name = f"[127.0.0.4]:{server.port}"
    node = ssh_lab.node(server, "n")

    error = deploy_error(ssh_lab.config([node])).errors[0]  # strict is the default
    assert (error.phase, error.node) == ("host key", "n") and name in str(error) and "not in" in str(error)
    assert ssh_lab.known_hosts.read_text() == ""

    assert cli.main(["deploy", "status", str(ssh_lab.config([node], {"host_key_policy": "accept-new"}))]) == 0
    assert "n: not running" in capsys.readouterr().out
    assert ssh_lab.known_hosts.read_text() == server.known_hosts_line()  # pinned
    assert cli.main(["deploy", "status", str(ssh_lab.config([node]))]) == 0  # now strict accepts it

    other = keygen(ssh_lab.tmp / "other_host_key")
    ssh_lab.known_hosts.write_text(server.known_hosts_line(other))  # the server's key "changed"
    for policy in ("strict", "accept-new", "insecure"):
        error = deploy_error(ssh_lab.config([node], {"host_key_policy": policy})).errors[0]
        assert error.phase == "host key" and "CHANGED" in str(error) and name in str(error), policy
    assert ssh_lab.known_hosts.read_text() == server.known_hosts_line(other)  # nothing re-pinned

    ssh_lab.known_hosts.write_text("")
    with pytest.warns(RuntimeWarning, match="insecure"):
        assert cli.main(["deploy", "status", str(ssh_lab.config([node], {"host_key_policy": "insecure"}))]) == 0
    assert ssh_lab.known_hosts.read_text() == ""  # insecure never pins

    ssh_lab.known_hosts.write_text(server.known_hosts_line())
    stranger = keygen(ssh_lab.tmp / "id_stranger")
    error = deploy_error(ssh_lab.config([node], {"identity_file": str(stranger)})).errors[0]
    assert (error.phase, error.node) == ("auth", "n") and "127.0.0.4" in str(error) and "'root'" in str(error)
    assert f"tried {stranger} (ssh-ed25519 SHA256:" in str(error) and ") refused" in str(error), error


@pytest.mark.timeout(60)
def test_missing_python_and_a_node_dying_before_ready_are_named(ssh_lab):
    a, b = ssh_lab.sshd("127.0.0.5"), ssh_lab.sshd("127.0.0.6")
    error = deploy_error(ssh_lab.config([ssh_lab.node(a, "good"),
                                         ssh_lab.node(b, "nopy", python="/nonexistent/bin/python3")]))
    assert len(error.errors) == 1
    failed = error.errors[0]
    assert (failed.node, failed.phase, failed.exit_status) == ("nopy", "ship", 127)
    assert "/nonexistent/bin/python3" in failed.stderr_tail and f"127.0.0.6:{b.port}" in str(failed)
    assert wait_until(lambda: ssh_lab.sessions() == [], 10)  # the good node was stopped too

    # the node cannot bind (sshd holds that port): it exits before PCREADY, and its stderr says why
    node = ssh_lab.node(a, "nobind", listen=a.address, node_port=a.port)
    failed = deploy_error(ssh_lab.config([node], connect="direct")).errors[0]
    assert (failed.node, failed.phase, failed.exit_status) == ("nobind", "start", 1)
    assert "Address already in use" in failed.stderr_tail, failed


ROOT_SCRIPT = """
import json, sys, time
import pipeline_cluster as pc

def slow(x):
    time.sleep(0.05)
    return x

cluster = pc.SSHCluster.from_config(sys.argv[1])
results = cluster.run([slow], range(100000))
next(results)
print(json.dumps([h.pid for h in cluster.hosts]), flush=True)
for _ in results:
    pass
"""


@pytest.mark.timeout(120)
def test_kill_9_of_the_root_takes_nodes_and_workers_down(ssh_lab, tmp_path):
    a, b = ssh_lab.sshd("127.0.0.7"), ssh_lab.sshd("127.0.0.8")
    # heartbeats would notice the root gone only after `dead_after`, longer than the wait below: the nodes must go
    # because the root's connection and SSH session ended
    dead_after = 3 * NO_HANG
    path = ssh_lab.config([ssh_lab.node(a, "a"), ssh_lab.node(b, "b")], connect="direct", dead_after=dead_after)
    script = tmp_path / "root.py"
    script.write_text(ROOT_SCRIPT)
    root = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        node_pids = json.loads(read_line(root, 60))
        nodes = [psutil.Process(pid) for pid in node_pids]
        workers = [w for node in nodes for w in node.children(recursive=True)]
        assert len(workers) >= 4, workers  # 2 workers per node, started when the run began
        root.send_signal(signal.SIGKILL)
        gone, alive = psutil.wait_procs(nodes + workers, timeout=NO_HANG)
        assert not alive, f"still running {NO_HANG} s after kill -9 of the root (dead_after {dead_after} s): {alive}"
    finally:
        root.kill()
        root.wait()
    assert wait_until(lambda: ssh_lab.sessions() == [], 10)


@pytest.mark.timeout(120)
def test_wheel_shipped_into_a_venv_then_reused_from_cache(ssh_lab):
    server = ssh_lab.sshd("127.0.0.9")
    path = ssh_lab.config([ssh_lab.node(server, "w", ship="always")])
    for expected in ("shipped", "cached"):
        with pc.SSHCluster.from_config(path) as cluster:
            host = cluster.hosts[0]
            assert host.ship == expected
            exe = psutil.Process(host.pid).cmdline()[0]
            assert exe.startswith(str(ssh_lab.tmp / "work-w" / "venvs")), exe
            assert sorted(x for x, _ in cluster.run([tagger()], range(50))) == list(range(50))
    wheels = list((ssh_lab.tmp / "work-w" / "wheels").glob("pipeline_cluster-*+g*-py3-none-any.whl"))
    assert len(wheels) == 1


@pytest.mark.timeout(90)
def test_cli_up_status_logs_down(ssh_lab, capsys):
    a, b = ssh_lab.sshd("127.0.0.10"), ssh_lab.sshd("127.0.0.11")
    path = ssh_lab.config([ssh_lab.node(a, "a"), ssh_lab.node(b, "b")])
    up = subprocess.Popen([sys.executable, "-m", "pipeline_cluster.cli", "deploy", "up", str(path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        lines = [read_line(up, 60) for _ in range(3)]
        assert "2 node(s) up in" in lines[2], lines
        assert cli.main(["deploy", "status", str(path)]) == 0
        out = capsys.readouterr().out
        assert "a: running, pid" in out and "b: running, pid" in out
        pids = [int(line.split("pid ")[1].split(",")[0]) for line in out.splitlines()]
        assert cli.main(["deploy", "logs", str(path), "--node", "b"]) == 0
        out = capsys.readouterr().out
        assert "==> b (" in out and "node server listening on 127.0.0.1" in out and "==> a" not in out
        with returns_within("deploy down --grace 5"):
            assert cli.main(["deploy", "down", str(path), "--grace", "5"]) == 0
        out = capsys.readouterr().out
        # SIGTERM by pidfile; a node may also go first because `up` closes the cluster once it lost the other
        assert " terminated " in out and "node process(es) stopped" in out
        assert wait_until(lambda: not any(alive(pid) for pid in pids), 10)
        assert up.wait(20) == 1  # `up` saw its nodes go
        assert "lost" in up.stderr.read()
        assert cli.main(["deploy", "down", str(path)]) == 0  # idempotent
        assert "no node was running" in capsys.readouterr().out
    finally:
        up.kill()
        up.wait()
    assert wait_until(lambda: ssh_lab.sessions() == [], 10)


@pytest.mark.timeout(60)
def test_cli_run_on_a_cluster_file(ssh_lab, tmp_path, monkeypatch):
    server = ssh_lab.sshd("127.0.0.12")
    path = ssh_lab.config([ssh_lab.node(server, "n")])
    (tmp_path / "upper.py").write_text("def pipeline():\n    return [str.upper]\n")
    (tmp_path / "in.txt").write_text("".join(f"line {i}\n" for i in range(300)))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "upper:pipeline", "--input", "in.txt", "--output", "out.jsonl", "--cluster",
                     str(path)]) == 0
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert sorted(lines) == sorted(f'"LINE {i}"' for i in range(300))
    assert wait_until(lambda: ssh_lab.sessions() == [], 10)


@pytest.mark.timeout(60)
def test_stage_tables_apply_to_pipelines_with_the_stage_and_are_skipped_by_others(ssh_lab, caplog):
    server = ssh_lab.sshd("127.0.0.13")
    path = ssh_lab.config([ssh_lab.node(server, "n")], stages={"split": {"workers": 1}})  # the README's example
    with pc.SSHCluster.from_config(path) as cluster:
        with caplog.at_level(logging.WARNING, logger="pipeline_cluster.config"):
            assert sorted(x for x, _ in cluster.run([tagger()], range(50))) == list(range(50))
        (note,) = caplog.records
        assert f"{path}: [stages.split] skipped" in note.getMessage() and "no stage 'split'" in note.getMessage()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline_cluster.config"):
            assert sorted(x for x, _ in cluster.run([pc.Stage(tagger(), name="split")], range(50))) == list(range(50))
        assert cluster.pipeline.stages[0].workers == 1 and caplog.records == []
    assert wait_until(lambda: ssh_lab.sessions() == [], 10)


PASSPHRASE = "correct horse"


@pytest.mark.timeout(60)
def test_an_encrypted_identity_file_authenticates_through_the_agent_key_that_matches_it(ssh_lab, monkeypatch):
    encrypted = keygen(ssh_lab.tmp / "id_encrypted", PASSPHRASE)
    server = ssh_lab.sshd("127.0.0.14", keys=(encrypted,))
    path = ssh_lab.config([ssh_lab.node(server, "n")], {"identity_file": str(encrypted)})
    agent = SshAgent(ssh_lab.tmp)
    try:
        other = keygen(ssh_lab.tmp / "id_other")
        agent.add(other, "")  # not the one: only the key matching the identity file is offered
        monkeypatch.setenv("SSH_AUTH_SOCK", str(agent.sock))
        error = deploy_error(path).errors[0]
        assert error.phase == "auth" and "no key to offer" in str(error), error
        assert f"could not use {encrypted} (encrypted; not in the agent; no terminal" in str(error), error

        agent.add(encrypted, PASSPHRASE)
        with pc.SSHCluster.from_config(path) as cluster:
            assert sorted(x for x, _ in cluster.run([tagger()], range(20))) == list(range(20))
    finally:
        agent.stop()
    assert wait_until(lambda: ssh_lab.sessions() == [], 10)


PROMPTED_STATUS = """
import fcntl, os, sys, termios
fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty becomes this session's terminal: getpass reads /dev/tty
from pipeline_cluster import cli
sys.exit(cli.main(["deploy", "status", sys.argv[1]]))
"""


def _read_until(fd: int, text: bytes, timeout: float) -> bytes:
    """What the pty's master gives until `text` appears (or the child closes it), within `timeout` s."""
    got = b""
    deadline = time.monotonic() + timeout
    while text not in got and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        try:
            chunk = os.read(fd, 4096) if ready else b""
        except OSError:  # EIO: the child closed the terminal
            break
        if ready and not chunk:
            break
        got += chunk
    return got


@pytest.mark.timeout(60)
def test_a_passphrase_is_asked_on_a_terminal_when_no_agent_has_the_key(ssh_lab, tmp_path):
    encrypted = keygen(ssh_lab.tmp / "id_encrypted", PASSPHRASE)
    server = ssh_lab.sshd("127.0.0.15", keys=(encrypted,))
    path = ssh_lab.config([ssh_lab.node(server, "n")], {"identity_file": str(encrypted)})
    script = tmp_path / "status.py"
    script.write_text(PROMPTED_STATUS)
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    child = subprocess.Popen([sys.executable, str(script), str(path)], stdin=slave, stdout=slave, stderr=slave,
                             start_new_session=True, env=env, cwd="/")
    os.close(slave)
    try:
        prompt = _read_until(master, b"Enter passphrase for key", 30)
        assert f"Enter passphrase for key '{encrypted}'".encode() in prompt, prompt
        os.write(master, PASSPHRASE.encode() + b"\n")
        out = _read_until(master, b"not running", 30)
        assert child.wait(30) == 0 and b"n: not running" in out, out
    finally:
        child.kill()
        child.wait()
        os.close(master)


@pytest.mark.timeout(60)
def test_accept_new_hashes_the_names_it_pins_when_known_hosts_is_hashed(ssh_lab, capsys):
    server = ssh_lab.sshd("127.0.0.16", trust=False)
    hashed = paramiko.HostKeys.hash_host("elsewhere.example")
    ssh_lab.known_hosts.write_text(f"{hashed} {' '.join(server.known_hosts_line().split()[1:])}\n")
    node = ssh_lab.node(server, "n")
    assert cli.main(["deploy", "status", str(ssh_lab.config([node], {"host_key_policy": "accept-new"}))]) == 0
    pinned = ssh_lab.known_hosts.read_text().splitlines()[1]
    assert pinned.startswith("|1|") and "127.0.0.16" not in pinned, pinned
    name = f"[127.0.0.16]:{server.port}"
    found = subprocess.run(["ssh-keygen", "-F", name, "-f", str(ssh_lab.known_hosts)], capture_output=True,
                           text=True)
    assert found.returncode == 0 and found.stdout.count("|1|") == 1, found  # OpenSSH finds it
    assert cli.main(["deploy", "status", str(ssh_lab.config([node]))]) == 0  # and strict accepts it now
    assert "n: not running" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_auto_replaces_an_install_of_the_same_version_with_other_code(ssh_lab, tmp_path):
    site = tmp_path / "host-site"  # the host's checkout, on its python's path: this version, one file changed
    wheel = zipfile.ZipFile(io.BytesIO(build_wheel().data))
    wheel.extractall(site, [name for name in wheel.namelist() if name.startswith("pipeline_cluster/")])
    demo = site / "pipeline_cluster" / "demo.py"
    demo.write_text(demo.read_text() + "\n# changed on the host\n")
    python = tmp_path / "host-python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    found = subprocess.run([str(python), "-c", "import pipeline_cluster as p; print(p.__version__, p.__file__)"],
                           capture_output=True, text=True, check=True, cwd="/").stdout.split()
    assert found == [pc.__version__, str(site / "pipeline_cluster" / "__init__.py")]

    server = ssh_lab.sshd("127.0.0.17")
    path = ssh_lab.config([ssh_lab.node(server, "s", python=str(python), install_env={"PIP_NO_COLOR": "1"})])
    for expected in ("shipped", "cached"):
        with pc.SSHCluster.from_config(path) as cluster:
            host = cluster.hosts[0]
            assert host.ship == expected
            node = psutil.Process(host.pid)
            assert node.cmdline()[0].startswith(str(ssh_lab.tmp / "work-s" / "venvs")), node.cmdline()
            assert "PIP_NO_COLOR" not in node.environ()  # install_env is the install's only
            assert sorted(x for x, _ in cluster.run([tagger()], range(20))) == list(range(20))
    assert wait_until(lambda: ssh_lab.sessions() == [], 10)


def processes_under(directory) -> list[str]:
    """`ps` on the host: the command lines that mention `directory`."""
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in listing.splitlines() if str(directory) in line]


@pytest.mark.timeout(240)
def test_a_hanging_install_is_killed_at_install_timeout_and_the_next_deploy_succeeds(ssh_lab, tmp_path):
    bare = tmp_path / "bare"  # a host python with pip but none of the dependencies: pip must ask the index
    subprocess.run([os.path.join(sys.base_prefix, "bin", "python3"), "-m", "venv", str(bare)], check=True)
    server = ssh_lab.sshd("127.0.0.18")
    work = ssh_lab.tmp / "work-h"
    node = ssh_lab.node(server, "h", python=str(bare / "bin" / "python"), install_timeout=10.0)
    with socket.socket() as index:  # accepts connections (the kernel does) and never answers
        index.bind(("127.0.0.1", 0))
        index.listen(64)
        hanging = {"PIP_INDEX_URL": f"http://127.0.0.1:{index.getsockname()[1]}/simple"}
        started = time.monotonic()
        error = deploy_error(ssh_lab.config([{**node, "install_env": hanging}])).errors[0]
        elapsed = time.monotonic() - started
    assert error.phase == "ship" and error.exit_status == 124, error
    assert "out of time (install_timeout): killed" in error.stderr_tail and "-m pip install" in error.stderr_tail
    assert 10.0 <= elapsed < 10.0 + NO_HANG, elapsed
    assert processes_under(work) == []  # pip and whatever it started went with its process group

    venv_lock = work / "venvs" / f"{build_wheel().sha256[:16]}.lock"
    with open(venv_lock, "w") as lock:  # another install holds the venv: the wait is bounded and names it
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("a test holding it\n")
        lock.flush()
        error = deploy_error(ssh_lab.config([{**node, "install_timeout": 1.0}])).errors[0]
    assert error.phase == "ship" and f"waiting for {venv_lock}, held by a test holding it" in error.stderr_tail

    with pc.SSHCluster.from_config(ssh_lab.config([node])) as cluster:  # the host's usual index (or wheelhouse)
        assert cluster.hosts[0].ship == "shipped"
        assert sorted(x for x, _ in cluster.run([tagger()], range(20))) == list(range(20))
    assert wait_until(lambda: ssh_lab.sessions() == [], 10)


def read_until(proc: subprocess.Popen, text: str, timeout: float = NO_HANG) -> list[str]:
    """`proc`'s stdout lines up to the first that contains `text`."""
    deadline, lines = time.monotonic() + timeout, []
    while not lines or text not in lines[-1]:
        lines.append(read_line(proc, max(0.1, deadline - time.monotonic())))
    return lines


@pytest.mark.timeout(90)
def test_logs_follow_streams_the_runs_as_they_come_and_ends_with_its_reader(ssh_lab):
    server = ssh_lab.sshd("127.0.0.19")
    path = ssh_lab.config([ssh_lab.node(server, "n")])
    follower = subprocess.Popen([sys.executable, "-m", "pipeline_cluster.cli", "deploy", "logs", "--follow",
                                 str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        with pc.SSHCluster.from_config(path) as cluster:
            first = cluster.rundir.run_id
            assert f"n | ==> run {first} <==" in read_until(follower, f"==> run {first}")[-1]
            assert "node server listening on 127.0.0.1" in read_until(follower, "node server listening")[-1]
        assert read_until(follower, "node server stopped after")[-1].startswith("n | ")  # appended as it happened

        assert wait_until(lambda: new_run_id()[:15] > first[:15], 5)  # run ids sort by the second they start
        with pc.SSHCluster.from_config(path) as cluster:
            second = cluster.rundir.run_id
            read_until(follower, f"n | ==> run {second} <==")  # the newer run, followed from its start
            assert "node server listening on 127.0.0.1" in read_until(follower, "node server listening")[-1]
        follower.send_signal(signal.SIGTERM)
        assert follower.wait(10) == 0
    finally:
        follower.kill()
        follower.wait()
    assert wait_until(lambda: ssh_lab.sessions() == [], 10)  # the follower on the host ended with its channel


def warner():
    """A stage (shipped by value) that logs a warning for every item."""
    def warn(x):
        logging.getLogger("mystage").warning("careful with item %s", x)
        return x
    return warn


@pytest.mark.timeout(60)
def test_worker_warnings_reach_the_node_log_and_the_roots_log_with_the_node_name(ssh_lab, tmp_path, capsys):
    server = ssh_lab.sshd("127.0.0.20")
    path = ssh_lab.config([ssh_lab.node(server, "n")])
    root_log = tmp_path / "root.log"
    with pc.SSHCluster.from_config(path, log_file=str(root_log)) as cluster:
        assert sorted(cluster.run([warner()], range(200))) == list(range(200))
    in_root = [line for line in root_log.read_text().splitlines() if "[mystage] careful with item" in line]
    assert len(in_root) == 200 and all(" node=n " in line for line in in_root)

    assert cli.main(["deploy", "logs", str(path), "--lines", "500"]) == 0
    node_log = capsys.readouterr().out
    echoed = [line for line in node_log.splitlines() if "[mystage] careful with item" in line]
    assert 1 <= len(echoed) <= 20 and all(" node=n " in line for line in echoed), node_log  # a flood is counted
    assert f"({200 - len(echoed)} more warning(s) or error(s): in the root's log only)" in node_log, node_log
    assert wait_until(lambda: ssh_lab.sessions() == [], 10)


@pytest.mark.timeout(60)
def test_two_files_with_the_same_cluster_name_never_touch_each_others_nodes(ssh_lab, capsys):
    server = ssh_lab.sshd("127.0.0.21")
    node = ssh_lab.node(server, "n")
    first, second = ssh_lab.config([node]), ssh_lab.config([node])  # both name the cluster "test": same host, dirs
    with pc.SSHCluster.from_config(first) as cluster:
        pid = cluster.hosts[0].pid
        assert cli.main(["deploy", "down", str(second)]) == 0
        assert cli.main(["deploy", "status", str(second)]) == 0
        out = capsys.readouterr().out
        assert "no node was running" in out and "n: not running" in out, out
        assert cli.main(["deploy", "status", str(first)]) == 0
        assert f"n: running, pid {pid}," in capsys.readouterr().out
        assert sorted(x for x, _ in cluster.run([tagger()], range(20))) == list(range(20))
    assert wait_until(lambda: ssh_lab.sessions() == [], 10)


@pytest.mark.timeout(120)
def test_nodes_added_and_removed_while_a_pipeline_streams(ssh_lab):
    a, b, c = ssh_lab.sshd("127.0.0.2"), ssh_lab.sshd("127.0.0.3"), ssh_lab.sshd("127.0.0.4")
    path = ssh_lab.config([ssh_lab.node(a, "a"), ssh_lab.node(b, "b")])
    with pc.SSHCluster.from_config(path, credit=64) as cluster:
        b_pid = next(host.pid for host in cluster.hosts if host.node == "b")
        outputs = []
        for output in cluster.run([tagger(delay=0.002)], range(3_000)):
            outputs.append(output)
            if len(outputs) == 300:
                assert cluster.add_node(ssh_lab.node(c, "c")) == "c"
                cluster.remove_node("b")
        assert collections.Counter(x for x, _ in outputs) == collections.Counter(range(3_000))
        assert {node for _, node in outputs} == {"a", "b", "c"}  # c took work once it came; b finished its own
        assert [node["node"] for node in cluster.nodes()] == ["a", "c"]
        assert wait_until(lambda: not alive(b_pid), 15), "the removed node is still running on its host"
        with pytest.raises(ValueError, match="in this cluster already"):
            cluster.add_node(ssh_lab.node(c, "c"))
    assert wait_until(lambda: ssh_lab.sessions() == [], 15), ssh_lab.sessions()


ATTACH_SCRIPT = """
import collections, os, sys
import pipeline_cluster as pc

def tag(x):
    return x, os.environ.get("NODE_TAG")

with pc.SSHCluster.attach(sys.argv[1]) as cluster:
    outputs = list(cluster.run([tag], range(2000)))
print(sorted(collections.Counter(x for x, _ in outputs).values()) == [1] * 2000, sorted({t for _, t in outputs}))
"""


@pytest.mark.timeout(120)
def test_detached_nodes_serve_roots_of_other_processes_then_their_lease_ends_them(ssh_lab, capsys):
    from pipeline_cluster.deploy.bootstrap import state_file
    from pipeline_cluster.deploy.config import load_config

    a, b = ssh_lab.sshd("127.0.0.2"), ssh_lab.sshd("127.0.0.3")
    path = ssh_lab.config([ssh_lab.node(a, "a"), ssh_lab.node(b, "b")], idle_timeout=8.0)
    assert cli.main(["deploy", "up", "--detach", str(path)]) == 0
    assert "2 node(s) up, detached" in capsys.readouterr().out
    state = json.loads(state_file(load_config(path)).read_text())
    assert oct(state_file(load_config(path)).stat().st_mode & 0o777) == "0o600"  # it holds the cluster's key
    pids = [node["pid"] for node in state["nodes"].values()]
    assert all(alive(pid) for pid in pids)  # they outlived the command that started them
    attached = subprocess.run([sys.executable, "-c", ATTACH_SCRIPT, str(path)], capture_output=True, text=True,
                              timeout=60)
    assert attached.stdout.strip() == "True ['a', 'b']", attached.stderr[-3000:]
    with pc.SSHCluster.attach(path) as cluster:  # a second root, after the first
        assert sorted(cluster.run([abs], [-1, 2, -3])) == [1, 2, 3]
    assert all(alive(pid) for pid in pids)  # closing a root leaves detached nodes running...
    assert wait_until(lambda: not any(alive(pid) for pid in pids), 30), "the lease did not end the nodes"
    assert cli.main(["deploy", "down", str(path)]) == 0  # ...until their lease ends: nothing left to stop
    assert "no node was running" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="deploy up --detach"):
        pc.SSHCluster.attach(path)


@pytest.mark.timeout(150)
def test_deploy_add_and_remove_change_a_detached_cluster_under_an_attached_run(ssh_lab, capsys):
    from pipeline_cluster.deploy.bootstrap import state_file
    from pipeline_cluster.deploy.config import load_config

    a, b, c = ssh_lab.sshd("127.0.0.2"), ssh_lab.sshd("127.0.0.3"), ssh_lab.sshd("127.0.0.4")
    path = ssh_lab.config([ssh_lab.node(a, "a"), ssh_lab.node(b, "b"), ssh_lab.node(c, "c")], idle_timeout=60.0)
    assert cli.main(["deploy", "up", "--detach", str(path)]) == 0
    state = json.loads(state_file(load_config(path)).read_text())
    assert cli.main(["deploy", "remove", str(path), "c"]) == 0  # no root attached: stopped at once
    c_pid = state["nodes"]["c"]["pid"]
    assert wait_until(lambda: not alive(c_pid), 15)
    b_pid = state["nodes"]["b"]["pid"]
    try:
        with pc.SSHCluster.attach(path, credit=64) as cluster:
            outputs, changes = [], []
            for output in cluster.run([tagger(delay=0.002)], range(6_000)):
                outputs.append(output)
                if len(outputs) == 300:  # another process changes the cluster while the run streams
                    changes.append(subprocess.Popen([sys.executable, "-m", "pipeline_cluster.cli", "deploy", "add",
                                                     str(path), "c"]))
                    changes.append(subprocess.Popen([sys.executable, "-m", "pipeline_cluster.cli", "deploy",
                                                     "remove", str(path), "b"]))
            assert [change.wait(60) for change in changes] == [0, 0]
            assert collections.Counter(x for x, _ in outputs) == collections.Counter(range(6_000))
            assert {tag for _, tag in outputs} == {"a", "b", "c"}  # b worked until drained; c once added
            assert not alive(b_pid)
            assert sorted(node["node"] for node in cluster.nodes()) == ["a", "c"]
    finally:
        assert cli.main(["deploy", "down", str(path)]) == 0


@pytest.mark.timeout(240)
def test_a_wheelhouse_installs_a_host_that_has_no_package_index(ssh_lab, tmp_path):
    bare = tmp_path / "bare"  # a host python without the dependencies, and no index it can reach
    subprocess.run([os.path.join(sys.base_prefix, "bin", "python3"), "-m", "venv", str(bare)], check=True)
    server = ssh_lab.sshd("127.0.0.19")
    no_index = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}
    node = ssh_lab.node(server, "w", python=str(bare / "bin" / "python"), install_env=no_index, wheelhouse=True)
    with pc.SSHCluster.from_config(ssh_lab.config([node])) as cluster:
        assert cluster.hosts[0].ship == "shipped"
        assert sorted(x for x, _ in cluster.run([tagger()], range(20))) == list(range(20))
    shipped = sorted(path.name for path in (ssh_lab.tmp / "work-w" / "wheelhouse").glob("*.whl"))
    assert any(name.startswith("pykka-") for name in shipped) and any(name.startswith("cryptography-")
                                                                    for name in shipped), shipped
    assert wait_until(lambda: ssh_lab.sessions() == [], 10)
