"""Smoke run of the benchmark harness at tiny sizes, so `python -m bench` cannot rot (no absolute-time checks)."""
from __future__ import annotations

import json

import pytest

from bench import harness
from bench.workloads import WORKLOADS, available_systems, available_workloads


@pytest.mark.timeout(180)
def test_harness_reports_every_workload_on_every_system(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    code = harness.main(["--scale", "0.005", "--rounds", "1", "--json", str(out_file)])
    printed = capsys.readouterr().out
    assert code == 0, printed

    document = json.loads(out_file.read_text())
    rows = {(row["workload"], row["system"]): row for row in document["rows"]}
    installed = available_systems()  # Ray and Ray Data run where the bench extra is installed
    expected = {(name, system) for name, workload in WORKLOADS.items() for system in workload.systems
                if system in installed and name in available_workloads()}
    assert set(rows) == expected
    for key, row in rows.items():
        assert row["value"] > 0, key
        assert row["peak_rss_mb"] > 0, key
        assert row["startup_s"] > 0, key
        assert "errors" not in row, key
        for column in ("vs_pooltuned", "vs_loop"):
            assert row[column] is None or row[column] > 0, (key, column)
        assert f"| {key[0]} | {key[1]} |" in printed
    assert rows[("W4", "local")]["median"]["p99_ms"] >= rows[("W4", "local")]["median"]["p50_ms"]
    assert rows[("W6", "node")]["median"]["root_cpu_us_per_item_1"] > 0
    assert document["machine"]["nproc"] >= 1
    assert len(document["trials"]) == len(expected) + len(WORKLOADS["W5"].systems) + len(WORKLOADS["W10"].systems)
    # (W5 also runs its 10k size, W10 its run with 100 failures)
