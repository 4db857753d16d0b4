"""The package as a wheel, built in memory from the code this process runs, byte-for-byte reproducible.

No build backend runs: the wheel holds the `.py` files of the imported `pipeline_cluster` packages plus metadata
copied from the installed distribution, with fixed timestamps, so the same code always gives the same sha256 and a
host that already has it is skipped. It is built once per process, so files edited later do not change what ships.
Its version carries a hash of the code (`0.2.0+g1a2b3c4d5e6f`, computed as the host helper computes it for what a
host has installed), so pip never mistakes it for another build of the same release.
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pipeline_cluster
from pipeline_cluster.deploy.hostscript import code_hash, package_files

DIST = "pipeline_cluster"
# The packages of setup.cfg's `packages` (a test checks the two agree).
PACKAGES = ("pipeline_cluster", "pipeline_cluster.logs", "pipeline_cluster.transport", "pipeline_cluster.worker",
            "pipeline_cluster.actors", "pipeline_cluster.deploy")
_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclasses.dataclass(frozen=True)
class Wheel:
    """A built wheel: its file name, bytes, sha256 (hex), and the hash of the code in it (see code_hash)."""

    filename: str
    data: bytes
    sha256: str
    code: str

    @property
    def version(self) -> str:
        """The wheel's version, local label included."""
        return self.filename.split("-")[1]


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _metadata(version: str) -> dict[str, bytes]:
    """dist-info files: METADATA (name, version, requirements of the installed distribution), WHEEL, entry points."""
    installed = importlib.metadata.distribution(DIST)
    requires = [r for r in installed.metadata.get_all("Requires-Dist") or [] if "extra ==" not in r]
    lines = ["Metadata-Version: 2.1", f"Name: {DIST}", f"Version: {version}",
             f"Requires-Python: {(installed.metadata.get_all('Requires-Python') or ['>=3.10'])[0]}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    info = f"{DIST}-{version}.dist-info"
    return {
        f"{info}/METADATA": ("\n".join(lines) + "\n").encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: pipeline_cluster.deploy\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
        f"{info}/entry_points.txt": (installed.read_text("entry_points.txt") or "").encode(),
    }


@functools.cache
def build_wheel() -> Wheel:
    """The wheel of the running pipeline_cluster, built on first use and kept for the life of this process."""
    files: dict[str, bytes] = dict(package_files(PACKAGES))
    code = code_hash(files)
    version = f"{pipeline_cluster.__version__}+g{code[:12]}"
    files.update(_metadata(version))
    record = f"{DIST}-{version}.dist-info/RECORD"
    files[record] = ("\n".join([_record_line(n, d) for n, d in files.items()] + [f"{record},,"]) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():  # dist-info last, RECORD last of all, as the wheel spec recommends
            entry = zipfile.ZipInfo(name, _EPOCH)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, data)
    data = buffer.getvalue()
    return Wheel(f"{DIST}-{version}-py3-none-any.whl", data, hashlib.sha256(data).hexdigest(), code)


def requirements() -> list[str]:
    """What the shipped wheel needs installed with it: the installed distribution's requirements, extras left out."""
    installed = importlib.metadata.distribution(DIST)
    return [r for r in installed.metadata.get_all("Requires-Dist") or [] if "extra ==" not in r]


def wheelhouse(source: bool | str, python: tuple[int, int], cache: Path) -> list[Path]:
    """The dependency wheels to ship to a host with no package index: those in the directory `source`, or with
    `source` True, wheels for `python` (major, minor) on this machine's platform, fetched with `pip download` into
    `cache` once and reused. RuntimeError with pip's last lines when it cannot get them."""
    if isinstance(source, str):
        found = sorted(Path(source).glob("*.whl"))
        if not found:
            raise RuntimeError(f"wheelhouse {source!r} holds no .whl file (fill it with `pip download -d "
                               f"{source} pipeline_cluster`, for the hosts' python and platform)")
        return found
    target = cache / f"py{python[0]}.{python[1]}"
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--python-version", f"{python[0]}.{python[1]}", "--dest", str(target),
               *requirements()]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip download of the dependencies failed: {done.stderr.strip()[-1500:]}")
    return sorted(target.glob("*.whl"))
