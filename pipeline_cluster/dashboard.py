"""The dashboard: a web page of a running cluster's figures, their JSON (`/api/stats`) and Prometheus metrics
(`/metrics`), served by the root, on loopback by default. On any other address every request must carry the token
printed at start (`?token=...` or an `Authorization: Bearer ...` header), since the page shows items and errors."""
from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

HISTORY = 300  # samples of the figures kept for the page's plots, one a second

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>pipeline_cluster</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222 }
table { border-collapse: collapse } td, th { padding: .25em .8em; text-align: right }
th { border-bottom: 1px solid #999 } td:first-child, th:first-child { text-align: left }
#verdict { font-weight: 600; margin: 1em 0 } svg { background: #f6f6f6 } .plot { margin: .3em 1em .3em 0 }
</style></head>
<body><h1>pipeline_cluster <span id="run"></span></h1>
<div id="verdict"></div>
<table id="stages"><thead><tr><th>stage</th><th>in</th><th>out</th><th>out/s</th><th>busy</th><th>queued</th>
<th>failed</th><th>restarts</th><th>workers</th><th>out/s over time</th><th></th></tr></thead><tbody></tbody>
</table>
<h2>nodes</h2>
<table id="nodes"><thead><tr><th>node</th><th>state</th><th>in flight</th><th>credit</th><th>heard, s ago</th>
</tr></thead><tbody></tbody></table>
<h2>recent dead letters</h2>
<div id="failures"></div>
<script>
const query = location.search;
function esc(text) {
  return String(text ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
    "'": "&#39;"})[c]);
}
function failure(f) {
  const what = `${f.stage}: ${f.error_type || f.cause}: ${f.message}`;
  const where = `${f.cause}, ${f.attempts} attempt(s)${f.node ? ", node " + f.node : ""}`;
  return `<details class="failure"><summary>${esc(what)} (${esc(where)})</summary>` +
    `<pre>${esc(f.traceback)}</pre></details>`;
}
function spark(points) {
  const w = 240, h = 40, top = Math.max(1, ...points);
  const x = i => (i * w / Math.max(1, points.length - 1)).toFixed(1);
  const xy = points.map((v, i) => `${x(i)},${(h - v * h / top).toFixed(1)}`);
  return `<svg class="plot" width="${w}" height="${h}">` +
    `<polyline fill="none" stroke="#2a6" stroke-width="2" points="${xy.join(" ")}"/></svg>`;
}
function resizer(name, workers) {
  return `<button onclick="resize('${name}', ${workers + 1})">+1</button>` +
    (workers > 1 ? ` <button onclick="resize('${name}', ${workers - 1})">-1</button>` : "");
}
async function resize(stage, workers) {
  await fetch("api/resize" + query, {method: "POST", body: JSON.stringify({stage, workers})});
  refresh();
}
async function refresh() {
  const r = await fetch("api/stats" + query);
  const s = await r.json();
  document.getElementById("run").textContent = `${s.pipeline || ""} (${s.phase}, run ${s.run_id})`;
  document.getElementById("verdict").textContent = s.verdict || "";
  const rows = Object.entries(s.stages).map(([name, st]) => {
    const rates = s.history.map(h => (h.rates || {})[name] || 0);
    const pct = st.busy == null ? "-" : Math.round(st.busy * 100) + "%";
    const rate = st.out_per_s == null ? "-" : Math.round(st.out_per_s);
    return `<tr class="stage"><td>${name}</td><td>${st.items_in}</td><td>${st.items_out}</td><td>${rate}</td>` +
      `<td>${pct}</td><td>${st.queued}</td><td>${st.failed}</td><td>${st.restarts}</td><td>${st.workers}</td>` +
      `<td>${spark(rates)}</td><td>${s.can_resize ? resizer(name, st.workers) : ""}</td></tr>`;
  });
  document.querySelector("#stages tbody").innerHTML = rows.join("");
  document.querySelector("#nodes tbody").innerHTML = (s.node_figures || []).map(n =>
    `<tr class="node"><td>${n.node}</td><td>${n.state}${n.lost_reason ? ": " + n.lost_reason : ""}</td>` +
    `<td>${n.in_flight}</td><td>${n.credit}</td><td>${n.heartbeat_age_s.toFixed(1)}</td></tr>`).join("");
  const failures = s.recent_failures || [];
  document.getElementById("failures").innerHTML = failures.length ? failures.map(failure).join("") : "none";
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""


class _Collector:
    """Prometheus metrics from the cluster's figures, read when scraped."""

    def __init__(self, figures: Callable[[], dict[str, Any]]) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        snapshot = self.figures()
        items = CounterMetricFamily("pipeline_cluster_stage_items", "Items through a stage, by event.",
                                    labels=["stage", "event"])
        restarts = CounterMetricFamily("pipeline_cluster_stage_restarts", "Worker restarts of a stage.",
                                       labels=["stage"])
        seconds = HistogramMetricFamily("pipeline_cluster_stage_item_seconds",
                                        "Seconds per item in a worker (bucket counts estimated from timed items).",
                                        labels=["stage"])
        gauges = {name: GaugeMetricFamily(f"pipeline_cluster_stage_{name}", text, labels=["stage"]) for name, text in
                  (("queued", "Items waiting for a worker."), ("workers", "Workers up."),
                   ("busy_ratio", "Share of the workers' time spent on items."),
                   ("seconds_per_item", "Mean seconds per item in a worker."))}
        for stage, figures in snapshot["stages"].items():
            for event, key in (("in", "items_in"), ("out", "items_out"), ("dropped", "dropped"),
                               ("failed", "failed"), ("retried", "retried")):
                items.add_metric([stage, event], figures[key])
            restarts.add_metric([stage], figures["restarts"])
            histogram = figures.get("seconds_histogram")
            if histogram:
                seconds.add_metric([stage], [(floatToGoString(float(le)), count)
                                             for le, count in zip(histogram["le"], histogram["cumulative"])],
                                   histogram["sum"])
            for name, key in (("queued", "queued"), ("workers", "workers"), ("busy_ratio", "busy"),
                              ("seconds_per_item", "mean_s")):
                if figures.get(key) is not None:
                    gauges[name].add_metric([stage], figures[key])
        nodes = GaugeMetricFamily("pipeline_cluster_nodes", "Nodes of the cluster, by state.", labels=["state"])
        node_gauges = {name: GaugeMetricFamily(f"pipeline_cluster_node_{name}", text, labels=["node"]) for name, text
                       in (("in_flight", "Root items the node holds unfinished."), ("credit", "The node's credit."),
                           ("heartbeat_age_seconds", "Seconds since the node was last heard from."))}
        states: dict[str, int] = {"ready": 0, "starting": 0, "lost": 0}
        for node in snapshot.get("node_figures", []):
            states[node["state"]] = states.get(node["state"], 0) + 1
            for name, key in (("in_flight", "in_flight"), ("credit", "credit"),
                              ("heartbeat_age_seconds", "heartbeat_age_s")):
                node_gauges[name].add_metric([node["node"]], node[key])
        for state, count in states.items():
            nodes.add_metric([state], count)
        yield from (items, restarts, seconds, *gauges.values(), nodes, *node_gauges.values())


def needs_token(host: str) -> bool:
    """A server on this address must ask for the token: anything but a loopback address."""
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


class Dashboard:
    """The HTTP server, its thread, and a sampler that keeps the last HISTORY seconds of figures for the plots."""

    def __init__(self, figures: Callable[[], dict[str, Any]], address: str | bool,
                 resize: Callable[[str, int], None] | None = None) -> None:
        """`figures()` gives what the page shows (`Cluster.status()` and the run id); `resize(stage, workers)`, when
        given, backs the page's +1/-1 buttons."""
        host, _, port = ("127.0.0.1:0" if address is True else str(address)).rpartition(":")
        self.figures = figures
        self.resize = resize
        self.token = secrets.token_urlsafe(16) if needs_token(host) else None
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(figures))
        self.server = ThreadingHTTPServer((host, int(port or 0)), _handler(self))
        self.server.daemon_threads = True
        bound_port = self.server.server_address[1]
        self.url = f"http://{host or '127.0.0.1'}:{bound_port}/" + (f"?token={self.token}" if self.token else "")
        self.stopping = threading.Event()
        for target, name in ((self.server.serve_forever, "pipeline-cluster-dashboard"),
                             (self._sample, "pipeline-cluster-dashboard-sampler")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def allowed(self, path: str, headers: Any) -> bool:
        """The request carries the token, when one is needed."""
        if self.token is None:
            return True
        given = parse_qs(urlsplit(path).query).get("token", [""])[0]
        bearer = headers.get("Authorization", "")
        given = given or (bearer[7:] if bearer.startswith("Bearer ") else "")
        return hmac.compare_digest(given.encode(), self.token.encode())

    def state(self) -> dict[str, Any]:
        """The page's JSON: the figures and their recent history."""
        return {**self.figures(), "history": list(self.history), "can_resize": self.resize is not None}

    def _sample(self) -> None:
        last: dict[str, int] = {}
        last_time = time.monotonic()
        while not self.stopping.wait(1.0):
            try:
                stages = self.figures()["stages"]
            except Exception:  # the cluster is between runs, or closing: try again next second
                continue
            now = time.monotonic()
            outs = {name: figures["items_out"] for name, figures in stages.items()}
            rates = {name: max(0, out - last.get(name, 0)) / (now - last_time) for name, out in outs.items()}
            self.history.append({"time": time.time(), "rates": rates,
                                 "queued": {name: figures["queued"] for name, figures in stages.items()}})
            last, last_time = outs, now

    def close(self) -> None:
        """Stop serving."""
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


def _handler(dashboard: Dashboard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            if not dashboard.allowed(self.path, self.headers):
                self._send(403, "text/plain", b"token required\n")
                return
            path = urlsplit(self.path).path
            if path == "/":
                self._send(200, "text/html; charset=utf-8", PAGE.encode())
            elif path == "/api/stats":
                self._send(200, "application/json", json.dumps(dashboard.state(), default=str).encode())
            elif path == "/metrics":
                self._send(200, "text/plain; version=0.0.4", generate_latest(dashboard.registry))
            else:
                self._send(404, "text/plain", b"not found\n")

        def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
            if not dashboard.allowed(self.path, self.headers):
                self._send(403, "text/plain", b"token required\n")
                return
            if urlsplit(self.path).path != "/api/resize" or dashboard.resize is None:
                self._send(404, "text/plain", b"not found\n")
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                dashboard.resize(str(request["stage"]), int(request["workers"]))
            except Exception as exc:  # a bad request, a stage that is not there, no run: say so
                self._send(400, "text/plain", f"{exc}\n".encode())
                return
            self._send(200, "application/json", b'{"ok": true}')

        def _send(self, code: int, kind: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # requests are not worth a log line each
            pass

    return Handler
