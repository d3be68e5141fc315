"""The CI fault-injection job: short versions of three library scenarios run end to end on
real Mininet hosts and must pass every SLO they declare except the speed ones (lost,
mismatched, duplicates, steps on time; crashes detected within 1 s)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.mark.parametrize("name", ["node_failure", "link_degradation", "io_faults"])
def test_scenario_passes_its_slos(name: str, tmp_path: Path) -> None:
    out = tmp_path / name
    result = subprocess.run([sys.executable, str(ROOT / "run_scenario.py"),
                             str(ROOT / "scenarios" / f"{name}.yaml"), "--out", str(out),
                             "--duration", "30s"], capture_output=True, text=True, timeout=600)
    summary_path = out / "summary.json"
    assert summary_path.exists(), result.stderr[-4000:]
    summary = json.loads(summary_path.read_text())
    assert summary["faults"], "no fault was injected"
    assert all(f["late_ms"] is not None and f["late_ms"] < 250 for f in summary["faults"])
    # Every SLO but the speed ones gates CI: recovery is measured against the planner's
    # predicted throughput, which this VM reaches or misses by run (a speed figure for
    # benchmarks/recovery.py, not for a timed test).
    speed = ("recovered", "never recovered", "of predicted")
    gating = [v for v in summary["slo"]["violations"] if not any(w in v for w in speed)]
    assert result.returncode in (0, 1), result.stderr[-2000:]
    assert not gating, (gating, result.stdout[-2000:])
    crash = [f for f in summary["faults"] if f["action"] == "node.crash"]
    assert all(f["detected_s"] is not None and f["detected_s"] - f["at_s"] < 1.0
               for f in crash), crash
