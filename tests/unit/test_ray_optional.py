"""Ray is an optional extra: nothing imports it unless a RayCluster is made, and without it the error says what
to install."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline_cluster.raycluster import RayCluster


def test_without_ray_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails as if it were not installed
    with pytest.raises(ImportError, match=r'pip install "pipeline_cluster\[ray\]"'):
        RayCluster()


def test_a_local_run_never_imports_ray():
    code = ("import sys, pipeline_cluster as pc\n"
            "with pc.LocalCluster(workers=1) as cluster:\n"
            "    assert sorted(cluster.run([abs], [-1, 2])) == [1, 2]\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
