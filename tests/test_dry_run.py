"""`run_scenario.py SCENARIO --backend k3s --dry-run --out DIR` writes every manifest to
DIR/k8s/ without a cluster; they validate against the Kubernetes schema and pin each stage to
the node its plan chose."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES_VERSION = "1.30.0"


def test_k3s_dry_run_writes_valid_pinned_manifests(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "run_scenario.py"),
                             str(ROOT / "scenarios" / "baseline.yaml"), "--backend", "k3s",
                             "--dry-run", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads((out / "plan.json").read_text())
    documents = [doc for path in sorted((out / "k8s").glob("*.yaml"))
                 for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert documents
    for doc in documents:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    pinned = sorted(doc["spec"]["template"]["spec"]["nodeSelector"]["kubernetes.io/hostname"]
                    for doc in documents
                    if doc["kind"] == "Deployment" and "stage" in doc["metadata"]["name"])
    assert pinned == sorted(stage["node"] for stage in plan["stages"])


def test_k3s_takes_the_scenarios_control_settings_and_refuses_what_it_cannot(
        tmp_path: Path) -> None:
    base = (ROOT / "scenarios" / "baseline.yaml").read_text().replace(
        "../topologies/", f"{ROOT / 'topologies'}/")
    refused = tmp_path / "refused.yaml"
    refused.write_text(base + "control:\n  rejoin_hold: 2s\n  drain: 1s\n")
    result = subprocess.run([sys.executable, str(ROOT / "run_scenario.py"), str(refused),
                             "--backend", "k3s", "--dry-run", "--out", str(tmp_path / "r")],
                            capture_output=True, text=True, timeout=600)
    line = base.count("\n") + 3
    assert result.returncode == 2 and f"refused.yaml:{line}" in result.stderr
    assert "control.drain" in result.stderr and not (tmp_path / "r" / "k8s").exists()
    taken = tmp_path / "taken.yaml"
    taken.write_text(base + "control:\n  rejoin_hold: 2s\n  heartbeat: 100ms\n")
    out = tmp_path / "t"
    result = subprocess.run([sys.executable, str(ROOT / "run_scenario.py"), str(taken),
                             "--backend", "k3s", "--dry-run", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    inputs = json.loads((out / "controller" / "controller.json").read_text())
    assert inputs["control"]["rejoin_hold_s"] == 2.0
    assert json.loads((out / "controller" / "settings.json").read_text())[
        "heartbeat_ms"] == 100.0
