"""The report: per workload and system, the medians over rounds, ratios to Pool (tuned) and to the loop, as a table.

Each row's figure is the workload's headline: outputs/s (W1), efficiency (W2, W6), MB/s (W3), p50 ms (W4, with
p99 beside it), peak RSS of 1M inputs over 10k (W5). A ratio is this row's figure divided by the reference
system's figure for the same workload: above 1 is better for W1, W2, W3; below 1 is better for W4 and W5.
"""
from __future__ import annotations

import statistics
from typing import Any

from .measure import medians
from .workloads import ALL_SYSTEMS, WORKLOADS

REFERENCES = {"vs_pooltuned": "pooltuned", "vs_loop": "loop"}
SYSTEM_NOTES = {  # what a system is, said once in its rows' notes
    "localdash": "with the dashboard, its figures fetched once a second",
    "localev": "awaited on the caller's own Event, set by the output handler",
    "localw64": "workers=64, one item at a time each",
    "localjournal": "durable run (run_id): the journal, outputs iterated",
    "localfile": "outputs iterated and written as JSON lines by the caller; no journal",
    "localsink": "durable run into pc.sinks.JsonLines: journal and file committed together",
    "ray": "pc.RayCluster on a local Ray (one node)",
    "raydata": "Ray Data with its defaults: from_items, map/flat_map per stage, iter_rows",
    "pypeln": "pypeln: a process stage per stage (a thread stage with 64 workers for W8)",
}


def _row(workload: str, system: str, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the trials of one workload on one system (all rounds, all variants)."""
    row: dict[str, Any] = {"workload": workload, "system": system, "metric": WORKLOADS[workload].metric}
    errors = [t["error"] for t in trials if "error" in t]
    good = [t for t in trials if "error" not in t]
    if errors:
        row["errors"] = errors
    main = [t for t in good if t.get("variant") != "small"]
    if not main:
        row["value"] = None
        return row
    row["rounds"] = len(main)
    row["median"] = medians(main)
    if workload in ("W5", "W10"):
        small = {t["round"]: t for t in good if t.get("variant") == "small"}
        pairs = [(t, small[t["round"]]) for t in main if t["round"] in small]
        if not pairs:
            row["value"] = None
            return row
        row["value"] = statistics.median(big["peak_rss_mb"] / little["peak_rss_mb"] for big, little in pairs)
        row["small"] = medians([little for _, little in pairs])
    else:
        row["value"] = row["median"]["figure"]
    row["inputs"] = main[0]["inputs"]
    row["peak_rss_mb"] = row["median"]["peak_rss_mb"]
    row["startup_s"] = row["median"]["startup_s"]
    return row


def summarise(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in workload then system order, with ratios to Pool (tuned) and to the loop where both ran."""
    rows = []
    for workload in WORKLOADS:
        for system in ALL_SYSTEMS:
            mine = [t for t in trials if t["workload"] == workload and t["system"] == system]
            if mine:
                rows.append(_row(workload, system, mine))
    by_key = {(r["workload"], r["system"]): r for r in rows}
    for row in rows:
        for column, system in REFERENCES.items():
            ref = by_key.get((row["workload"], system))
            ok = ref is not None and row["value"] is not None and ref["value"]
            row[column] = row["value"] / ref["value"] if ok else None
    return rows


def _figure(row: dict[str, Any]) -> str:
    value, med = row["value"], row.get("median", {})
    if value is None:
        return "FAILED"
    if row["workload"] == "W1":
        return f"{value:,.0f} outputs/s"
    if row["workload"] == "W8":
        return f"{value:,.0f} items/s"
    if row["workload"] == "W9":
        return f"auto / fixed {value:.2f}x"
    if row["workload"] in ("W3", "W7"):
        return f"{value:,.0f} MB/s"
    if row["workload"] == "W4":
        return f"p50 {med['p50_ms']:.3f} / p99 {med['p99_ms']:.3f} ms"
    if row["workload"] in ("W5", "W10"):
        return f"RSS ratio {value:.2f}"
    return f"efficiency {value:.2f}"


def _notes(row: dict[str, Any]) -> str:
    med = row.get("median", {})
    notes = []
    if row["value"] is not None:
        workload, system = row["workload"], row["system"]
        if system in SYSTEM_NOTES:
            notes.append(SYSTEM_NOTES[system])
        elif (system.startswith("pool") or system == "mpire") and workload in ("W1", "W5", "W7"):
            notes.append(("mpire: " if system == "mpire" else "") + "both stages in one call per input")
        elif system.startswith("pool") and workload == "W4":
            notes.append("two pool.apply calls per item; chunksize does not apply")
        elif workload == "W10":
            notes.append(f"peak RSS {med['peak_rss_mb']:.0f} MB with {med['dead_letters']:,.0f} dead letters, "
                         f"{row['small']['peak_rss_mb']:.0f} MB with {row['small']['dead_letters']:,.0f}")
        elif workload == "W8" and system in ("local", "node"):
            notes.append("concurrency=64 on the default workers")
        elif workload == "W8" and system in ("pooltuned", "mpire"):
            notes.append(("mpire WorkerPool(64)" if system == "mpire" else "Pool(64)") + ", chunksize 1")
        elif workload == "W9":
            notes.append(f"auto {med['items_per_s']:,.0f} items/s, ending with {med['auto_light_workers']:.0f} + "
                         f"{med['auto_heavy_workers']:.0f} workers; fixed 2 + 2 {med['fixed_items_per_s']:,.0f} "
                         "items/s; start-up included")
        elif workload == "W4" and system in ("local", "node"):
            notes.append("awaited with cluster.wait_empty()")
        if workload == "W2":
            notes.append(f"{med['time_per_item_s'] * 1e3:.1f} ms CPU/item in the run, {med['items_per_s']:,.0f} "
                         f"items/s; with the calibrated {med['calibrated_time_per_item_s'] * 1e3:.1f} ms: "
                         f"{med['efficiency_calibrated']:.2f}")
        elif workload == "W3":
            notes.append(f"{med['items_per_s']:,.0f} items/s")
        elif workload == "W5":
            notes.append(f"{row['inputs']:,} inputs: {med['peak_rss_mb']:,.0f} MB at {med['items_per_s']:,.0f} "
                         f"outputs/s; {row['small']['inputs']:,.0f} inputs: {row['small']['peak_rss_mb']:,.0f} MB")
        elif workload == "W6":
            notes.append(f"{med['items_per_s']:,.0f} items/s of 1,600 ideal; 1 node: efficiency "
                         f"{med['efficiency_1node']:.2f}; root CPU/item in the run 8 nodes "
                         f"{med['root_cpu_us_per_item_8']:,.0f} us vs 1 node {med['root_cpu_us_per_item_1']:,.0f} us "
                         f"({med['root_cpu_ratio_8_to_1']:.2f}x); connect to close "
                         f"{med['root_cpu_with_connect_us_per_item_8']:,.0f} vs "
                         f"{med['root_cpu_with_connect_us_per_item_1']:,.0f} us "
                         f"({med['root_cpu_with_connect_ratio_8_to_1']:.2f}x)")
    if "steal_pct" in med:
        notes.append(f"steal {med['steal_pct']:.0f}%")
    if row.get("errors"):
        notes.append(f"{row.get('rounds', 0)} good round(s), {len(row['errors'])} failed: "
                     f"{row['errors'][0].splitlines()[0][:120]}")
    return "; ".join(notes)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: workload, system, figure, ratios, peak RSS (MB), start-up (s), notes."""
    header = ["workload", "system", "figure (median)", "vs Pool tuned", "vs loop", "peak RSS MB", "start-up s",
              "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        failed = row["value"] is None
        cells = [row["workload"], row["system"], _figure(row), _ratio(row["vs_pooltuned"]), _ratio(row["vs_loop"]),
                 "-" if failed else f"{row['peak_rss_mb']:,.0f}", "-" if failed else f"{row['startup_s']:.3f}",
                 _notes(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
