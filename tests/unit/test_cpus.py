"""usable_cpus: the affinity count capped by the cgroup CPU quota (v2 cpu.max or v1 CFS), rounded up, at least 1."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline_cluster import cpus
from tests.helpers import REPO, wait_until

PROBE = "from pipeline_cluster.cpus import usable_cpus; print(usable_cpus())"

# Real contents of /proc/self/mountinfo on a cgroup v2 host, a hybrid (v1 + unified) host, and in a container.
MOUNTINFO_V2 = (
    "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
    "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 "
    "rw,nsdelegate,memory_recursiveprot\n"
)
MOUNTINFO_HYBRID = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)
MOUNTINFO_CONTAINER_V1 = (
    "1210 1205 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid,nodev,noexec,relatime master:11 - cgroup cgroup "
    "rw,cpu,cpuacct\n"
)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max 100000\n", None),
        ("200000 100000\n", 2.0),
        ("150000 100000\n", 1.5),
        ("50000 100000", 0.5),
        ("", None),
        ("max\n", None),
        ("garbage\n", None),
        ("abc 100000\n", None),
        ("100000 0\n", None),
        ("1 2 3\n", None),
    ],
)
def test_parse_cpu_max(text: str, expected: float | None) -> None:
    assert cpus.parse_cpu_max(text) == expected


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [
        ("-1\n", "100000\n", None),
        ("100000\n", "100000\n", 1.0),
        ("150000\n", "100000\n", 1.5),
        ("50000\n", "100000\n", 0.5),
        ("garbage", "100000\n", None),
        ("100000\n", "", None),
        ("100000\n", "0\n", None),
    ],
)
def test_parse_cfs(quota: str, period: str, expected: float | None) -> None:
    assert cpus.parse_cfs(quota, period) == expected


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("affinity", "quota", "expected"),
    [(2, None, 2), (2, 2.0, 2), (2, 1.5, 2), (4, 1.5, 2), (2, 0.5, 1), (2, 0.001, 1), (2, 8.0, 2), (0, None, 1)],
)
def test_cpus_from_rounds_the_quota_up_and_never_goes_below_one(affinity: int, quota: float | None,
                                                               expected: int) -> None:
    assert cpus.cpus_from(affinity, quota) == expected


@pytest.mark.timeout(10)
def test_parse_proc_cgroup() -> None:
    text = "12:cpu,cpuacct:/user.slice\n4:memory:/user.slice/x\n1:name=systemd:/init.scope\n0::/user.slice/u.scope\n"
    unified, v1 = cpus.parse_proc_cgroup(text)
    assert unified == "/user.slice/u.scope"
    assert v1["cpu"] == v1["cpuacct"] == "/user.slice"
    assert v1["memory"] == "/user.slice/x"
    assert cpus.parse_proc_cgroup("0::/\n") == ("/", {})
    assert cpus.parse_proc_cgroup("") == (None, {})


@pytest.mark.timeout(10)
def test_parse_mountinfo() -> None:
    assert cpus.parse_mountinfo(MOUNTINFO_V2) == (("/", "/sys/fs/cgroup"), {})
    unified, v1 = cpus.parse_mountinfo(MOUNTINFO_HYBRID)
    assert unified == ("/", "/sys/fs/cgroup/unified")
    assert v1["cpu"] == v1["cpuacct"] == ("/", "/sys/fs/cgroup/cpu,cpuacct")
    assert cpus.parse_mountinfo(MOUNTINFO_CONTAINER_V1)[1]["cpu"] == ("/docker/abc", "/sys/fs/cgroup/cpu,cpuacct")
    escaped = "41 31 0:38 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n"
    assert cpus.parse_mountinfo(escaped)[0] == ("/", "/mnt/cg two")


@pytest.mark.timeout(10)
def test_cgroup_dirs_cover_the_cgroup_and_its_ancestors_up_to_the_mount() -> None:
    assert cpus._cgroup_dirs("/a/b", "/", "/m") == ["/m/a/b", "/m/a", "/m"]
    assert cpus._cgroup_dirs("/", "/", "/m") == ["/m"]
    assert cpus._cgroup_dirs("/docker/abc/sub", "/docker/abc", "/m") == ["/m/sub", "/m"]
    assert cpus._cgroup_dirs("/docker/abc", "/docker/abc", "/m") == ["/m"]
    assert cpus._cgroup_dirs("/elsewhere", "/docker/abc", "/m") == ["/m"]
    assert cpus._cgroup_dirs("/../../x", "/", "/m") == ["/m"]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _fake_proc(root: Path, cgroup: str, mountinfo: str) -> str:
    """A fake /proc/self under `root` with the given cgroup and mountinfo contents; returns its path."""
    _write(root / "proc/self/cgroup", cgroup)
    _write(root / "proc/self/mountinfo", mountinfo)
    return str(root / "proc/self")


@pytest.mark.timeout(10)
def test_v2_limit_on_a_parent_wins_over_an_unlimited_child(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, "0::/pod/app\n", MOUNTINFO_V2)
    _write(tmp_path / "sys/fs/cgroup/pod/cpu.max", "150000 100000\n")
    _write(tmp_path / "sys/fs/cgroup/pod/app/cpu.max", "max 100000\n")
    assert cpus._quota_cpus(proc_self=proc, fs_root=str(tmp_path)) == 1.5
    assert cpus.cpus_from(4, cpus._quota_cpus(proc_self=proc, fs_root=str(tmp_path))) == 2


@pytest.mark.timeout(10)
def test_v2_the_tightest_limit_on_the_path_wins(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, "0::/pod/app\n", MOUNTINFO_V2)
    _write(tmp_path / "sys/fs/cgroup/pod/cpu.max", "400000 100000\n")
    _write(tmp_path / "sys/fs/cgroup/pod/app/cpu.max", "50000 100000\n")
    assert cpus._quota_cpus(proc_self=proc, fs_root=str(tmp_path)) == 0.5


@pytest.mark.timeout(10)
def test_v2_in_a_container_the_mount_root_is_the_cgroup(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, "0::/\n", MOUNTINFO_V2)
    _write(tmp_path / "sys/fs/cgroup/cpu.max", "200000 100000\n")
    assert cpus._quota_cpus(proc_self=proc, fs_root=str(tmp_path)) == 2.0


@pytest.mark.timeout(10)
def test_v1_limit_on_a_parent_in_a_hybrid_layout(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, "3:cpu,cpuacct:/kube/pod\n0::/\n", MOUNTINFO_HYBRID)
    cpu = tmp_path / "sys/fs/cgroup/cpu,cpuacct"
    _write(cpu / "kube/cpu.cfs_quota_us", "300000\n")
    _write(cpu / "kube/cpu.cfs_period_us", "100000\n")
    _write(cpu / "kube/pod/cpu.cfs_quota_us", "-1\n")
    _write(cpu / "kube/pod/cpu.cfs_period_us", "100000\n")
    (tmp_path / "sys/fs/cgroup/unified").mkdir(parents=True)  # unified hierarchy without the cpu controller
    assert cpus._quota_cpus(proc_self=proc, fs_root=str(tmp_path)) == 3.0


@pytest.mark.timeout(10)
def test_v1_container_mount_root_maps_onto_the_mount_point(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, "3:cpu,cpuacct:/docker/abc\n", MOUNTINFO_CONTAINER_V1)
    _write(tmp_path / "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "50000\n")
    _write(tmp_path / "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert cpus._quota_cpus(proc_self=proc, fs_root=str(tmp_path)) == 0.5


@pytest.mark.timeout(10)
def test_missing_or_garbage_files_mean_no_limit(tmp_path: Path) -> None:
    assert cpus._quota_cpus(proc_self=str(tmp_path / "nowhere"), fs_root=str(tmp_path)) is None
    proc = _fake_proc(tmp_path, "0::/pod/app\n", MOUNTINFO_V2)
    assert cpus._quota_cpus(proc_self=proc, fs_root=str(tmp_path)) is None  # no cgroup files at all
    _write(tmp_path / "sys/fs/cgroup/pod/app/cpu.max", "garbage\n")
    (tmp_path / "sys/fs/cgroup/pod/cpu.max").mkdir()  # a directory: reading it fails
    assert cpus._quota_cpus(proc_self=proc, fs_root=str(tmp_path)) is None
    proc = _fake_proc(tmp_path / "bad", "\x00:::\nnonsense\n", "not mountinfo\n - \n")
    assert cpus._quota_cpus(proc_self=proc, fs_root=str(tmp_path)) is None


@pytest.mark.timeout(10)
def test_usable_cpus_on_this_machine_is_within_the_affinity() -> None:
    assert 1 <= cpus.usable_cpus() <= cpus.affinity_cpus()


# Real cgroups: a child cgroup with a 1-CPU quota, and a process moved into it before it imports the module.


def _mounts() -> tuple[tuple[str, str] | None, dict[str, tuple[str, str]]]:
    with open("/proc/self/mountinfo") as f:
        return cpus.parse_mountinfo(f.read())


def _need_root_and_two_cpus() -> None:
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")
    if cpus.affinity_cpus() < 2:
        pytest.skip(f"a 1-CPU quota is only visible with 2 or more CPUs; this process may use {cpus.affinity_cpus()}")


def _probe_in(cgroup: Path) -> subprocess.CompletedProcess[str]:
    """Run PROBE in a new Python process that first moves itself into `cgroup` (its cgroup.procs)."""
    code = f"import os\nwith open({str(cgroup / 'cgroup.procs')!r}, 'w') as f:\n    f.write(str(os.getpid()))\n{PROBE}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=30
    )


def _rmdir(path: Path) -> None:
    """Remove a cgroup, retrying for up to 5 s while the kernel still counts a just-reaped process in it."""

    def removed() -> bool:
        try:
            path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            return False
        return True

    if not wait_until(removed, timeout=5, interval=0.05):
        path.rmdir()  # still busy: raise the kernel's error


@pytest.fixture
def v2_parent() -> Iterator[Path]:
    """A new cgroup v2 directory under the cgroup2 mount root, with the cpu controller enabled for its children."""
    _need_root_and_two_cpus()
    unified, _ = _mounts()
    if unified is None:
        pytest.skip("no cgroup2 hierarchy is mounted (/proc/self/mountinfo has no cgroup2 line)")
    mount = Path(unified[1])
    controllers = (mount / "cgroup.controllers").read_text().split()
    enabled_here = False
    if "cpu" not in (mount / "cgroup.subtree_control").read_text().split():
        try:
            with open(mount / "cgroup.subtree_control", "w") as f:
                f.write("+cpu")
            enabled_here = True
        except OSError as e:
            pytest.skip(f"the kernel refused '+cpu' in {mount}/cgroup.subtree_control: {e!r} "
                        f"(cgroup.controllers there: {' '.join(controllers) or 'none'}; "
                        "the cpu controller is likely bound to a cgroup v1 hierarchy)")
    parent = mount / f"pctest-{os.getpid()}"
    parent.mkdir()
    try:
        with open(parent / "cgroup.subtree_control", "w") as f:
            f.write("+cpu")
        yield parent
    finally:
        for child in [p for p in parent.iterdir() if p.is_dir()]:
            _rmdir(child)
        _rmdir(parent)
        if enabled_here:
            try:
                with open(mount / "cgroup.subtree_control", "w") as f:
                    f.write("-cpu")
            except OSError:
                pass  # another cgroup started using the controller meanwhile; leaving it on is harmless


@pytest.mark.timeout(60)
@pytest.mark.parametrize("limited", ["leaf", "parent"])
def test_real_cgroup_v2_quota_of_one_cpu(v2_parent: Path, limited: str) -> None:
    leaf = v2_parent / "leaf"
    leaf.mkdir()
    (leaf if limited == "leaf" else v2_parent).joinpath("cpu.max").write_text("100000 100000")
    result = _probe_in(leaf)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


@pytest.fixture
def v1_parent() -> Iterator[Path]:
    """A new directory under the cgroup v1 cpu controller's mount."""
    _need_root_and_two_cpus()
    _, v1 = _mounts()
    if "cpu" not in v1:
        pytest.skip("no cgroup v1 hierarchy has the cpu controller (/proc/self/mountinfo)")
    parent = Path(v1["cpu"][1]) / f"pctest-{os.getpid()}"
    try:
        parent.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create a cgroup under {parent.parent}: {e!r}")
    try:
        yield parent
    finally:
        for child in [p for p in parent.iterdir() if p.is_dir()]:
            _rmdir(child)
        _rmdir(parent)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("limited", ["leaf", "parent"])
def test_real_cgroup_v1_quota_of_one_cpu(v1_parent: Path, limited: str) -> None:
    leaf = v1_parent / "leaf"
    leaf.mkdir()
    limit = leaf if limited == "leaf" else v1_parent
    (limit / "cpu.cfs_period_us").write_text("100000")
    (limit / "cpu.cfs_quota_us").write_text("100000")
    result = _probe_in(leaf)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
