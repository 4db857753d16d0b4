"""cluster.toml validation, the in-memory wheel, and the host helper's pid safety: no SSH needed."""
from __future__ import annotations

import configparser
import importlib
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline_cluster import cli
from pipeline_cluster.deploy.config import Jump, load_config
from pipeline_cluster.deploy.errors import ConfigError
from pipeline_cluster.deploy.wheel import PACKAGES, build_wheel
from tests.helpers import REPO, wait_until

GOOD = """
[cluster]
name = "lab"
connect = "direct"
heartbeat = 2
dead_after = 20.0
python = "/opt/py/bin/python3"
workers = 3

[ssh]
user = "deploy"
port = 2222
identity_file = "id_test"
known_hosts = "kh"
host_key_policy = "accept-new"
jump = "ops@bastion:2200"

[[node]]
host = "10.1.0.5"

[[node]]
name = "big"
host = "big.example"
port = 22
user = "root"
workers = 8
env = { OMP_NUM_THREADS = "1" }
ship = "never"
install_timeout = 300
install_env = { PIP_INDEX_URL = "https://pypi.internal/simple" }
jump = []

[stages.split]
workers = 4
supervision = { max_attempts = 5 }
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "id_test").write_text("not really a key\n")
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


@pytest.mark.timeout(30)
def test_config_defaults_overrides_and_paths(tmp_path):
    config = load_config(write(tmp_path, GOOD.replace("jump = []\n", "")))
    assert (config.name, config.connect, config.heartbeat, config.dead_after) == ("lab", "direct", 2, 20.0)
    first, big = config.nodes
    assert first.name == "10.1.0.5" and first.python == "/opt/py/bin/python3" and first.workers == 3
    assert first.ssh.user == "deploy" and first.ssh.port == 2222 and first.ship == "auto"
    assert first.ssh.identity_files == (str(tmp_path / "id_test"),)  # relative to the file
    assert first.ssh.identities_only  # an identity_file is the only key offered
    assert first.ssh.known_hosts == str(tmp_path / "kh")
    assert [str(j) for j in first.ssh.jump] == ["ops@bastion:2200"]
    assert big.ssh.user == "root" and big.ssh.port == 22 and big.workers == 8 and big.ship == "never"
    assert big.env == {"OMP_NUM_THREADS": "1"} and big.address == "root@big.example:22"
    assert (first.install_timeout, first.install_env) == (120.0, {})
    assert (big.install_timeout, big.install_env) == (300, {"PIP_INDEX_URL": "https://pypi.internal/simple"})
    assert config.stages == {"split": {"workers": 4, "supervision": {"max_attempts": 5}}}


def test_wheelhouse_is_true_or_a_directory_next_to_the_file_and_idle_timeout_is_seconds(tmp_path):
    base = GOOD.replace("jump = []\n", "")
    config = load_config(write(tmp_path, base.replace("[cluster]\n", "[cluster]\nidle_timeout = 90\n"
                                                      "wheelhouse = \"wheels\"\n", 1)))
    assert config.idle_timeout == 90 and {node.wheelhouse for node in config.nodes} == {str(tmp_path / "wheels")}
    assert load_config(write(tmp_path, base)).nodes[0].wheelhouse is False
    with pytest.raises(ConfigError, match="wheelhouse: must be true .* or a directory of wheels, got 3"):
        load_config(write(tmp_path, base.replace("[cluster]\n", "[cluster]\nwheelhouse = 3\n", 1)))


@pytest.mark.timeout(30)
def test_check_names_every_bad_key(tmp_path, capsys):
    bad = """
[cluster]
connect = "telepathy"
heartbeat = 5
dead_after = 1
credits = 10
install_timeout = 0

[ssh]
host_key_policy = "yolo"
port = "22"
identity_file = "missing_key"

[[node]]
host = "a"
pyhton = "python3"
workers = 0

[[node]]
name = "a"
host = "b"
env = { PATH = 1 }
jump = "not a@valid@jump"

[[node]]
name = "no host here"

[stages.split]
wrokers = 2
supervision = { max_attempt = 3 }

[extra]
x = 1
"""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, bad))
    problems = "\n".join(caught.value.problems)
    expected = [
        "[cluster].connect: must be one of 'tunnel', 'direct'",
        "[cluster].credits: unknown key (did you mean 'credit'?)",
        "[cluster].install_timeout: must be a positive number of seconds",
        "[cluster].dead_after: must be longer than heartbeat",
        "[ssh].host_key_policy: must be one of 'strict', 'accept-new', 'insecure'",
        "[ssh].port: must be a port number",
        "[ssh].identity_file: no such file",
        "[[node]] #1 (a).pyhton: unknown key (did you mean 'python'?)",
        "[[node]] #1 (a).workers: must be a positive integer",
        "[[node]] #2 (a).env: has bad entries ['PATH']",
        "[[node]] #2 (a).jump: must be",
        "[[node]] #3 (no host here).name: must be letters",
        "[[node]] #3 (no host here): missing 'host'",
        "[[node]] 'a': duplicate name",
        "[stages.split].wrokers: unknown key (did you mean 'workers'?)",
        "[stages.split].supervision: unknown supervision key(s) ['max_attempt']",
        "extra: unknown table",
    ]
    for text in expected:
        assert text in problems, f"{text!r} not reported in:\n{problems}"
    assert len(caught.value.problems) == len(expected), problems

    assert cli.main(["deploy", "check", str(tmp_path / "cluster.toml")]) == 2
    err = capsys.readouterr().err
    assert f"{len(expected)} problem(s)" in err and "pyhton" in err and "wrokers" in err


@pytest.mark.timeout(30)
def test_check_ok_and_syntax_error(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    assert cli.main(["deploy", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok: cluster 'lab'" in out and "2 node(s)" in out and "via ops@bastion:2200" in out
    assert "stage settings for split: used by pipelines with those stages, skipped" in out
    path.write_text("[cluster\nname = 1\n")
    assert cli.main(["deploy", "check", str(path)]) == 2
    assert "cluster.toml" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_wheel_is_reproducible_and_holds_every_module():
    first, second = build_wheel(), build_wheel.__wrapped__()  # the cached build, and a fresh one
    assert first.sha256 == second.sha256 and first.data == second.data
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert set(PACKAGES) == set(setup["options"]["packages"].split())
    names = set(zipfile.ZipFile(io.BytesIO(first.data)).namelist())
    for package in PACKAGES:
        directory = Path(importlib.import_module(package).__file__).parent
        for module in directory.glob("*.py"):
            assert f"{package.replace('.', '/')}/{module.name}" in names
    info = f"pipeline_cluster-{first.version}.dist-info"
    assert {f"{info}/METADATA", f"{info}/RECORD", f"{info}/WHEEL", f"{info}/entry_points.txt"} <= names
    assert first.filename == f"pipeline_cluster-{first.version}-py3-none-any.whl" and "+g" in first.version


@pytest.mark.timeout(30)
def test_importing_the_package_does_not_import_paramiko():
    code = "import sys, pipeline_cluster, pipeline_cluster.cli; print('paramiko' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "False"


@pytest.mark.timeout(30)
def test_host_stop_signals_only_processes_running_in_their_pidfile_dir(tmp_path):
    """A recycled pid (a process running elsewhere) is never signalled; the real node is, by pid."""
    runs = tmp_path / "runs" / "c"
    node_dir, elsewhere = runs / "r1" / "n1", runs / "r1" / "n2"
    node_dir.mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    ours = subprocess.Popen(["sleep", "60"], cwd=node_dir)
    stranger = subprocess.Popen(["sleep", "60"], cwd=tmp_path)
    try:
        (node_dir / "node-1.pid").write_text(str(ours.pid))
        (elsewhere / "node-2.pid").write_text(str(stranger.pid))
        script = (REPO / "deploy" / "hostscript.py").read_text()

        def hostscript(*args: str):
            done = subprocess.run([sys.executable, "-", *args], input=script, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        status = {e["node"]: e["alive"] for e in hostscript("status", str(runs))}
        assert status == {"n1": True, "n2": False}
        report = {Path(e["pidfile"]).parent.name: e["result"] for e in hostscript("stop", str(runs), "5")}
        assert report == {"n1": "terminated", "n2": "not running"}
        assert wait_until(lambda: ours.poll() is not None, 10)
        assert stranger.poll() is None and not list(runs.rglob("*.pid"))
        assert hostscript("stop", str(runs), "5") == []  # idempotent
    finally:
        for proc in (ours, stranger):
            proc.kill()
            proc.wait()
    assert os.path.isdir(node_dir)


SSH_CONFIG = """
Host node-d nd
    HostName 10.9.0.4
    Port 2222
    ProxyJump ops@jumpbox
    IdentityFile {tmp}/id_d
    IdentitiesOnly yes
    ConnectTimeout 3
    UserKnownHostsFile {tmp}/kh_ssh other_file

Host jumpbox
    HostName 10.9.0.1
    Port 2200

Host node-*
    User carol
    ServerAliveInterval 7

Host *
    User nobody
    IdentityFile {tmp}/id_all
"""


@pytest.mark.timeout(30)
def test_ssh_config_fills_in_what_cluster_toml_leaves_unset(tmp_path, capsys):
    (tmp_path / "ssh_config").write_text(SSH_CONFIG.format(tmp=tmp_path))
    path = write(tmp_path, """
[ssh]
ssh_config = "ssh_config"
connect_timeout = 9

[[node]]
host = "node-d"

[[node]]
host = "node-e"
user = "root"
keepalive = 2

[[node]]
name = "plain"
host = "10.9.0.7"
identity_file = "id_test"
""")
    d, e, plain = load_config(path).nodes
    assert (d.name, d.host, d.ssh.port, d.ssh.user) == ("node-d", "10.9.0.4", 2222, "carol")  # first match wins
    assert d.ssh.identity_files == (f"{tmp_path}/id_d", f"{tmp_path}/id_all") and d.ssh.identities_only
    assert d.ssh.jump == (Jump("10.9.0.1", "ops", 2200),)  # the hop is an alias too
    assert d.ssh.known_hosts == f"{tmp_path}/kh_ssh" and d.ssh.keepalive == 7
    assert d.ssh.connect_timeout == 9 and d.sources["connect_timeout"] == "cluster.toml [ssh]"  # explicit wins
    assert d.sources["host"] == f"ssh_config {tmp_path}/ssh_config (HostName of 'node-d')"
    assert d.sources["user"] == f"ssh_config {tmp_path}/ssh_config" and d.sources["host_key_policy"] == "default"

    assert (e.host, e.ssh.user, e.ssh.keepalive, e.ssh.port) == ("node-e", "root", 2, 22)
    assert e.sources["user"] == e.sources["keepalive"] == "cluster.toml [[node]]"
    assert e.ssh.identity_files == (f"{tmp_path}/id_all",) and not e.ssh.identities_only

    assert plain.ssh.identity_files == (str(tmp_path / "id_test"),) and plain.ssh.identities_only
    assert plain.sources["identity_files"] == "cluster.toml [[node]]" and plain.ssh.user == "nobody"

    assert cli.main(["deploy", "check", "--explain", str(path)]) == 0
    out = capsys.readouterr().out
    assert "node-d: carol@10.9.0.4:2222 via ops@10.9.0.1:2200" in out
    assert re.search(r"host +10\.9\.0\.4 +ssh_config .*ssh_config \(HostName of 'node-d'\)", out), out
    assert re.search(r"connect_timeout +9 +cluster.toml \[ssh\]", out), out
    assert re.search(r"host_key_policy +strict +default", out), out


@pytest.mark.timeout(30)
def test_ssh_config_problems_are_config_errors(tmp_path):
    (tmp_path / "ssh_config").write_text("Host a\n    Port twenty\n    ProxyJump not@a@jump\n")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, '[ssh]\nssh_config = "ssh_config"\n[[node]]\nhost = "a"\n'))
    problems = "\n".join(caught.value.problems)
    assert "for host 'a', port: invalid literal" in problems and "proxyjump: 'not@a@jump'" in problems
    with pytest.raises(ConfigError, match=r"\[ssh\].ssh_config: no such file"):
        load_config(write(tmp_path, '[ssh]\nssh_config = "nope"\n[[node]]\nhost = "a"\n'))


@pytest.mark.timeout(30)
def test_min_nodes_defaults_to_all_and_cannot_exceed_the_nodes(tmp_path):
    assert load_config(write(tmp_path, GOOD)).min_nodes is None
    assert load_config(write(tmp_path, GOOD.replace('name = "lab"', 'name = "lab"\nmin_nodes = 1'))).min_nodes == 1
    with pytest.raises(ConfigError, match=r"\[cluster\].min_nodes: is 3, but there are 2 \[\[node\]\] table"):
        load_config(write(tmp_path, GOOD.replace('name = "lab"', 'name = "lab"\nmin_nodes = 3')))
