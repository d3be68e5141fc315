"""The report of a results directory (plots and index.html) from synthetic records, and the
per-host sampler's bucket arithmetic: no network needed."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from testbed.emulation.hostmon import HostMonitor
from testbed.experiment.report import fault_windows, write_report

START = 1_700_000_000.0


def plan(nodes: list[str]) -> dict[str, Any]:
    return {"algorithm": "optimal", "bottleneck_ms": 40.0, "latency_ms": 120.0,
            "stages": [{"segments": [i * 3, i * 3 + 3], "node": node,
                        "compute_ms": 40.0 if i == 0 else 20.0, "in_ms": 5.0}
                       for i, node in enumerate(nodes)],
            "out_ms": 1.0}


def events() -> list[dict[str, Any]]:
    return [
        {"t": START - 1, "type": "plan.deployed", "predicted_throughput_rps": 25.0,
         "plan": plan(["edge1", "edge2"]), "epoch": 1},
        {"t": START + 5, "type": "fault.injected", "action": "node.crash", "target": "edge2",
         "step": 0, "late_ms": 0.4},
        {"t": START + 6, "type": "node.suspected", "host": "edge2"},
        {"t": START + 7, "type": "plan.deployed", "predicted_throughput_rps": 20.0,
         "plan": plan(["edge1", "edge3", "edge4", "edge5", "edge6", "edge7", "edge8"]),
         "epoch": 2},
        {"t": START + 8, "type": "fault.injected", "action": "link.bandwidth",
         "target": ["edge1", "s1"], "step": 1, "late_ms": 0.2},
        {"t": START + 11, "type": "fault.healed", "action": "link.bandwidth",
         "target": ["edge1", "s1"], "step": 1},
        {"t": START + 12, "type": "fault.injected", "action": "node.restart", "target": "edge3",
         "step": 2},
        {"t": START + 13, "type": "fault.injected", "action": "link.partition",
         "target": [["edge1"], ["edge3", "edge4"]], "step": 3},
        {"t": START + 25, "type": "fault.healed", "action": "node.crash", "target": "edge2",
         "step": 0, "final": True},
    ]


def test_fault_windows_pair_heals_and_clip_to_the_window() -> None:
    windows = fault_windows(events(), START, 20.0)
    assert [(w["action"], w["begin"], w["end"]) for w in windows] == [
        ("node.crash", 5.0, 20.0),         # healed only in the final phase, after the window
        ("link.bandwidth", 8.0, 11.0),
        ("node.restart", 12.0, None),      # instant: nothing to heal
        ("link.partition", 13.0, 20.0),    # never healed in these records
    ]


def test_report_writes_plots_and_an_index(tmp_path: Path) -> None:
    series = tmp_path / "timeseries.csv"
    with series.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["t_s", "completed", "throughput_rps", "p50_ms", "p95_ms", "p99_ms",
                         "edge1_cpu", "edge1_mem_mb"])
        for t in range(20):
            rps = 5 if 5 <= t < 7 else 24
            writer.writerow([t, rps, rps, 100 + t, 150, 200 + 10 * (t == 6), 0.19, 140.5])
    for name in ("summary.json", "requests.csv", "events.jsonl", "plan.json"):
        (tmp_path / name).write_text("{}\n")
    summary = {
        "scenario": "node-failure <x>", "backend": "embedded", "throughput_rps": 22.1,
        "predicted_throughput_rps": 25.0, "throughput_ratio": 0.884,
        "latency_ms": {"p50": 101.0, "p95": 150.0, "p99": 210.0, "mean": 110.0},
        "requests": {"sent": 450, "completed": 450, "lost": 0, "duplicates": 0,
                     "mismatched": 0, "replayed": 12},
        "faults": [{"action": "node.crash", "target": "edge2", "at_s": 5.0, "late_ms": 0.4,
                    "detected_s": 6.0, "recovered_s": 8.0}],
        "window": {"start_unix": START, "duration_s": 20.0, "warmup_s": 5.0},
        "invalid": [],
        "links": [{"link": "edge1-s1", "bandwidth_mbps": 100.0, "delay_ms": 20.0,
                   "jitter_ms": 0.0, "loss_pct": 1.0, "bandwidth": "htb",
                   "delay": "nfqueue shim at the receiving hosts",
                   "loss": "iptables statistic at the receiving hosts"}],
        "plan": plan(["edge1", "edge2"]),
        "slo": {"passed": True, "violations": []},
    }
    write_report(tmp_path, summary, events(), series)
    for name in ("timeline.png", "hosts.png", "plan.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    page = (tmp_path / "index.html").read_text()
    for name in ("summary.json", "requests.csv", "timeseries.csv", "events.jsonl",
                 "plan.json", "timeline.png", "hosts.png", "plan.png"):
        assert f'href="{name}"' in page, name
    assert "node-failure &lt;x&gt;" in page and "SLO\npassed" in page
    assert "nfqueue shim at the receiving hosts" in page and "22.1" in page


def test_report_without_timeseries_or_plan_still_writes_an_index(tmp_path: Path) -> None:
    summary = {"scenario": "empty", "slo": {"passed": False, "violations": ["no request"]}}
    write_report(tmp_path, summary, [], tmp_path / "missing.csv")
    page = (tmp_path / "index.html").read_text()
    assert "no request" in page and "failed" in page
    assert not list(tmp_path.glob("*.png"))
    json.dumps(summary)  # the summary is untouched and still serialisable


def test_host_monitor_buckets() -> None:
    monitor = HostMonitor({"edge1": "x"})
    # 0.25 cores and growing memory, sampled every second from 0.5 s before the window
    monitor.readings = [(START - 0.5 + i, {"edge1": (int(0.25e9 * i), (100 + i) << 20)})
                        for i in range(5)]
    buckets = monitor.buckets(START, 3.0)
    assert sorted(buckets) == [0, 1, 2]
    assert all(row["edge1_cpu"] == 0.25 for row in buckets.values())
    assert [buckets[i]["edge1_mem_mb"] for i in range(3)] == [101.0, 102.0, 103.0]
