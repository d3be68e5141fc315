"""Kubernetes against our controllers, measured (issue 12): the same node crash (edge1 of
topologies/kube-3.yaml, its node container killed and its link dark) handled by

  k8s-default   Kubernetes' own mechanisms only, default timing: the node lifecycle controller
                marks the node unreachable after node-monitor-grace-period (40 s), the pods'
                default toleration (300 s) runs out, they are evicted and the Deployment's
                replacement starts on a live node;
  k8s-tuned     the same with grace 8 s, tolerations 2 s, kubelet lease 8 s / status 2 s;
  k3s           the k3s backend's controller on the emulated cluster (`--backend k3s
                --cluster emulated`): stage heartbeats, re-plan, replay;
  embedded      the embedded controller on the same topology (process hosts).

    sudo .venv/bin/python benchmarks/k8s_recovery.py [--only k8s-tuned,k3s] [--out DIR]

For the Kubernetes-only rows a Deployment (1 replica of the stage image serving TCP, with a
readiness probe) starts on edge1; `detected` is when the API shows the Node not Ready,
`recovered` when a replacement pod is Ready on another node; nothing replays requests there,
so `lost` is what was in flight plus whatever is sent until recovery: not counted. For the
controller rows the figures are summary.json's (detection and recovery after the fault,
lost requests). JSON: OUT/k8s_recovery.json (benchmarks/recovery.py reads the measured
Kubernetes wait from it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOPOLOGY = ROOT / "topologies" / "kube-3.yaml"
SCENARIO = ROOT / "scenarios" / "kube_node_failure.yaml"
VICTIM = "edge1"
NAMESPACE = "edgepipe-bench"
DEFAULT_OUT = ROOT / "results" / "bench_k8s_recovery"


def victim_deployment() -> dict[str, Any]:
    from testbed.emulation.images import DEFAULT_TAG

    labels = {"app.kubernetes.io/name": "victim"}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "victim", "namespace": NAMESPACE},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {
                # starts on the victim; any edge node will do for its replacement
                "affinity": {"nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "kubernetes.io/hostname",
                                               "operator": "NotIn",
                                               "values": ["dispatcher"]}]}]},
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 100, "preference": {"matchExpressions": [
                            {"key": "kubernetes.io/hostname", "operator": "In",
                             "values": [VICTIM]}]}}]}},
                "terminationGracePeriodSeconds": 0, "enableServiceLinks": False,
                "automountServiceAccountToken": False,
                "containers": [{
                    "name": "server", "image": DEFAULT_TAG, "imagePullPolicy": "Never",
                    "command": ["python3", "-m", "http.server", "22080"],
                    "readinessProbe": {"tcpSocket": {"port": 22080}, "periodSeconds": 1}}]}}},
    }


def ready_pods(core: Any) -> dict[str, str]:
    """Ready, not terminating pods of the victim Deployment: name -> node."""
    pods = core.list_namespaced_pod(NAMESPACE, label_selector="app.kubernetes.io/name=victim",
                                    _request_timeout=10).items
    return {p.metadata.name: p.spec.node_name for p in pods
            if p.metadata.deletion_timestamp is None
            and any(c.type == "Ready" and c.status == "True"
                    for c in p.status.conditions or [])}


def node_ready(core: Any, node: str) -> bool:
    found = core.read_node(node, _request_timeout=10)
    return any(c.type == "Ready" and c.status == "True" for c in found.status.conditions or [])


def kubernetes_only(tuned: bool, limit_s: float) -> dict[str, Any]:
    from kubernetes import client

    from formats.topology import load_topology
    from testbed.emulation.kubenodes import NodeTuning
    from testbed.experiment.k8s_cluster import EmulatedCluster

    tuning = NodeTuning.tuned() if tuned else NodeTuning()
    name = "k8s-tuned" if tuned else "k8s-default"
    with EmulatedCluster(load_topology(TOPOLOGY), [], tuning) as cluster, cluster.api() as api:
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        apps.create_namespaced_deployment(NAMESPACE, victim_deployment())
        deadline = time.monotonic() + 180
        while VICTIM not in ready_pods(core).values():
            if time.monotonic() > deadline:
                raise RuntimeError("the victim pod did not become ready on edge1")
            time.sleep(0.5)
        time.sleep(2.0)
        crash = time.monotonic()
        cluster.net.crash_host(VICTIM)
        detected = recovered = None
        while time.monotonic() - crash < limit_s and recovered is None:
            now = time.monotonic() - crash
            if detected is None and not node_ready(core, VICTIM):
                detected = now
            if any(node != VICTIM for node in ready_pods(core).values()):
                recovered = now
            time.sleep(0.25)
        return {"case": name, "detected_s": detected, "recovered_s": recovered, "lost": None,
                "grace_s": tuning.monitor_grace_s, "toleration_s": tuning.toleration_s,
                "bring_up_s": cluster.timings.get("ready_s")}


def controller_run(name: str, out: Path, duration: str) -> dict[str, Any]:
    argv = [sys.executable, str(ROOT / "run_scenario.py"), str(SCENARIO), "--duration",
            duration, "--out", str(out / name)]
    if name == "k3s":
        argv += ["--backend", "k3s", "--cluster", "emulated"]
    proc = subprocess.run(argv, check=False)
    summary_path = out / name / "summary.json"
    if not summary_path.exists():
        return {"case": name, "error": f"no summary (exit {proc.returncode})"}
    summary = json.loads(summary_path.read_text())
    crash = next(f for f in summary["faults"] if f["action"] == "node.crash")

    def rel(key: str) -> float | None:
        return None if crash.get(key) is None else crash[key] - crash["at_s"]
    return {"case": name, "detected_s": rel("detected_s"), "recovered_s": rel("recovered_s"),
            "lost": summary["requests"]["lost"], "exit": proc.returncode,
            "bring_up_s": summary.get("cluster", {}).get("bring_up_s", {}).get("ready_s")}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'case':<12} {'detected s':>10} {'recovered s':>11} {'lost':>5}"]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['case']:<12} {row['error']}")
            continue

        def cell(value: Any, width: int) -> str:
            text = "-" if value is None else (f"{value:.2f}" if isinstance(value, float)
                                              else str(value))
            return f"{text:>{width}}"
        lines.append(f"{row['case']:<12} {cell(row['detected_s'], 10)} "
                     f"{cell(row['recovered_s'], 11)} {cell(row['lost'], 5)}")
    return "\n".join(lines)


def measured_default(out: Path = DEFAULT_OUT) -> float | None:
    """Kubernetes' own recovery time with default timing, if this benchmark measured it."""
    try:
        rows = json.loads((out / "k8s_recovery.json").read_text())
    except (OSError, ValueError):
        return None
    found = [r.get("recovered_s") for r in rows if r.get("case") == "k8s-default"]
    return found[0] if found and found[0] is not None else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated: k8s-default, k8s-tuned, k3s, "
                        "embedded")
    parser.add_argument("--duration", default="40s", help="controller runs' measured window "
                        "(the scenario's own: the k3s re-plan fetches the model over edge2's link)")
    parser.add_argument("--limit", type=float, default=600.0,
                        help="Kubernetes-only: give up waiting after this many seconds")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("error: needs root (Mininet, node containers)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = ["k8s-default", "k8s-tuned", "k3s", "embedded"]
    rows = []
    for case in cases:
        if args.only and case not in args.only.split(","):
            continue
        print(f"== {case}", file=sys.stderr, flush=True)
        if case.startswith("k8s-"):
            rows.append(kubernetes_only(case == "k8s-tuned", args.limit))
        else:
            rows.append(controller_run(case, out, args.duration))
        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows))
    (out / "k8s_recovery.json").write_text(json.dumps(rows, indent=1))
    print(f"JSON: {out / 'k8s_recovery.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
