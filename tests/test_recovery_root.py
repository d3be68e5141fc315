"""A node of the pipeline crashes on a real Mininet network (root): resnet18 on star-6 through
run_scenario.py. The crash is noticed within a second, the pipeline moves to the nodes left
(a warm standby takes the lost stage), throughput comes back, and no request is lost, answered
twice or wrong."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_node_crash_recovers_without_losing_anything(tmp_path: Path) -> None:
    from partitioner.algorithms import solve
    from partitioner.profile import instance_for_topology, profile_model
    from testbed.topology import load_topology

    topology = ROOT / "topologies" / "star-6.yaml"
    instance = instance_for_topology(profile_model("resnet18", progress=False),
                                     load_topology(topology))
    victim = solve(instance, "auto", time_limit_s=2.0, seed=0).stages[1].node
    scenario = tmp_path / "crash.yaml"
    scenario.write_text(
        f"name: crash\ntopology: {topology}\nmodel: {{zoo: resnet18}}\n"
        "workload: {mode: closed, concurrency: 6, duration: 18s, warmup: 4s, seed: 1}\n"
        f"steps:\n  - {{at: 8s, action: node.crash, target: {victim}}}\n"
        "slo: {lost: 0, mismatched: 0}\n")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "run_scenario.py"), str(scenario),
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert (out / "summary.json").exists(), result.stdout + result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    requests = summary["requests"]
    assert requests["completed"] == requests["sent"] > 0
    assert (requests["lost"], requests["mismatched"]) == (0, 0)
    with (out / "requests.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len({r["rid"] for r in rows}) == len(rows)            # each delivered once
    (fault,) = summary["faults"]
    assert fault["detected_s"] is not None and fault["detected_s"] - fault["at_s"] <= 1.0
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    window = summary["window"]["start_unix"]
    crashed = window + fault["at_s"]
    moved = [e for e in events if e["type"] == "plan.deployed" and e["t"] > crashed]
    assert moved and victim not in moved[0]["hosts"]
    # recovered: after the switch, a full second at 90% of what the pipeline did before (how
    # fast is a benchmark figure, benchmarks/recovery.py; here: that it happens at all)
    dones = sorted(float(r["done"]) for r in rows)
    before = sum(crashed - 6 <= t < crashed - 1 for t in dones) / 5
    back = next((t for t in dones if t >= moved[0]["t"] + 1
                 and sum(t - 1 < u <= t for u in dones) >= 0.9 * before), None)
    assert back is not None, (before, moved[0]["t"] - crashed)
    assert result.returncode == 0, summary["slo"]
