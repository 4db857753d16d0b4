"""The dashboard server of a running cluster, over real HTTP on loopback: the page, its JSON, and /metrics parsed
with prometheus_client's own parser and checked against stats()."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import pipeline_cluster as pc
from pipeline_cluster.dashboard import needs_token
from tests.helpers import REPO, read_line, terminate


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read()


def slow(x: int) -> int:
    time.sleep(0.002)
    return x


def picky(x: int) -> int:
    """Fails item 7 with markup in its message: the page must show it as text."""
    if x == 7:
        raise ValueError("<b>item</b> 7")
    return x


@pytest.mark.timeout(60)
def test_the_page_its_json_and_metrics_match_the_running_cluster(tmp_path, capfd):
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=2, dashboard="127.0.0.1:0") as cluster:
        url = cluster.dashboard_url
        assert url.startswith("http://127.0.0.1:") and "token" not in url
        assert f"pipeline_cluster dashboard: {url}" in capfd.readouterr().err  # said once at start
        results = iter(cluster.run([slow], range(2000)))
        for _ in range(500):
            next(results)
        page = _get(url).decode()
        state = json.loads(_get(url + "api/stats"))
        metrics = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                   for family in text_string_to_metric_families(_get(url + "metrics").decode())
                   for sample in family.samples}
        stats = cluster.stats()
        list(results)
    assert "<title>pipeline_cluster</title>" in page and "api/stats" in page
    assert state["phase"] == "running" and "slow" in state["stages"] and state["verdict"]
    items_in = metrics[("pipeline_cluster_stage_items_total", (("event", "in"), ("stage", "slow")))]
    items_out = metrics[("pipeline_cluster_stage_items_total", (("event", "out"), ("stage", "slow")))]
    assert 500 <= items_out <= stats["slow"]["items_out"] and items_out <= items_in <= 2000
    assert metrics[("pipeline_cluster_stage_workers", (("stage", "slow"),))] == 2 == stats["slow"]["workers"]
    buckets = {dict(labels)["le"]: value for (name, labels), value in metrics.items()
               if name == "pipeline_cluster_stage_item_seconds_bucket"}
    timed = metrics[("pipeline_cluster_stage_item_seconds_count", (("stage", "slow"),))]
    assert items_out <= timed <= items_in and buckets["+Inf"] == pytest.approx(timed)
    assert buckets["0.001"] == 0 and buckets["10.0"] == pytest.approx(timed)  # every item sleeps 2 ms
    assert list(buckets.values()) == sorted(buckets.values())  # cumulative
    assert metrics[("pipeline_cluster_stage_item_seconds_sum", (("stage", "slow"),))] >= timed * 0.002
    assert metrics[("pipeline_cluster_nodes", (("state", "ready"),))] == 1
    assert metrics[("pipeline_cluster_node_credit", (("node", "local"),))] > 0
    assert [node["node"] for node in state["node_figures"]] == ["local"]
    with pytest.raises(urllib.error.URLError):
        _get(url)  # closed with the cluster


def test_only_loopback_goes_without_a_token():
    assert not needs_token("127.0.0.1") and not needs_token("127.0.0.5") and not needs_token("::1")
    assert not needs_token("localhost")
    assert needs_token("0.0.0.0") and needs_token("10.1.2.3") and needs_token("node-a.example")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.browser
@pytest.mark.timeout(120)
def test_the_page_renders_and_updates_in_a_real_browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("the browser test needs Debian's chromium: apt-get install -y chromium (.ci/run does)")
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=2, dashboard=True) as cluster:
        results = iter(cluster.run([slow, pc.Stage(picky, supervision={"max_attempts": 1})], range(4000)))
        for _ in range(1000):
            next(results)

        def browse(*args: str) -> str:
            return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                                   "--virtual-time-budget=3000", "--window-size=1100,420", *args,
                                   cluster.dashboard_url], capture_output=True, text=True, timeout=60).stdout

        first = browse("--dump-dom")
        for _ in range(1000):
            next(results)
        second = browse("--dump-dom")
        browse(f"--screenshot={tmp_path / 'dashboard.png'}")
        list(results)
    for dom in (first, second):  # the script ran: a row per stage, a plot in each, the verdict
        assert dom.count('<tr class="stage"><td>slow</td>') == 1, dom[-3000:]
        assert "<polyline" in dom and "limits throughput" in dom, dom[-3000:]
    outs = [int(re.search(r'<tr class="stage"><td>slow</td><td>\d+</td><td>(\d+)</td>', dom).group(1))
            for dom in (first, second)]
    assert 1000 <= outs[0] < outs[1]  # it updates as the run goes on
    for dom in (first, second):  # item 7's dead letter, its markup shown as text, with its traceback
        assert '<summary>picky: ValueError: &lt;b&gt;item&lt;/b&gt; 7 (exception, 1 attempt(s)' in dom, dom[-3000:]
        assert "<b>item</b>" not in dom and 'raise ValueError("&lt;b&gt;item&lt;/b&gt; 7")' in dom
    assert (tmp_path / "dashboard.png").stat().st_size > 5000  # kept with the test's files


@pytest.mark.timeout(60)
def test_the_dashboard_of_a_run_in_another_process(tmp_path):
    run_dir = tmp_path / "run"
    with pc.LocalCluster(run_dir=str(run_dir), workers=1) as cluster:
        results = iter(cluster.run([slow], range(3000)))
        for _ in range(1200):  # over 2 s: stats.json has been written while running
            next(results)
        server = subprocess.Popen([sys.executable, "-m", "pipeline_cluster.cli", "dashboard", str(run_dir),
                                   "--address", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            line = read_line(server, 30)
            url = line.split(": ", 1)[1].strip()
            state = json.loads(_get(url + "api/stats"))
            metrics = _get(url + "metrics").decode()
        finally:
            terminate(server, 10)
        list(results)
        run_id = cluster.run_id
    assert state["phase"] == "running" and "slow" in state["stages"] and state["run_id"] == run_id
    assert 'pipeline_cluster_stage_items_total{event="in",stage="slow"}' in metrics


@pytest.mark.timeout(60)
def test_the_page_resizes_a_stage_while_the_run_streams(tmp_path):
    with pc.LocalCluster(run_dir=str(tmp_path / "run"), workers=1, dashboard=True) as cluster:
        url = cluster.dashboard_url
        results = iter(cluster.run([slow], range(3000)))
        outputs = [next(results) for _ in range(500)]
        assert json.loads(_get(url + "api/stats"))["can_resize"] is True
        request = urllib.request.Request(url + "api/resize", data=json.dumps({"stage": "slow", "workers": 3}).encode(),
                                         method="POST")
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200
        bad = urllib.request.Request(url + "api/resize", data=b'{"stage": "nope", "workers": 2}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=10)
        assert refused.value.code == 400
        outputs += [next(results) for _ in range(1500)]
        workers = cluster.stats()["slow"]["workers"]
        outputs += list(results)
    assert workers == 3 and sorted(outputs) == list(range(3000))
