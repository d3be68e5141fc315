"""The emulated Kubernetes cluster (root): real kube-apiserver, controller-manager, scheduler,
etcd, CoreDNS and kubelets on containerd in node containers on the emulated links.

- the kube_node_failure scenario end to end through `run_scenario.py --backend k3s --cluster
  emulated`: exit 0, nothing lost or mismatched, the crash detected, summary.json's cluster,
  and the run's record, containers, node stores and PKI gone afterwards;
- a pod-to-pod probe on a cluster: pods' TCP is bounded by the shaped link it crosses.

The binaries and the node image are built first when missing (`make kube-image`, which runs
`make kube-bin`: ~10-20 min from nothing, seconds when cached). Timing on the project's
machine with caches warm: the scenario ~3 min, the probe ~2 min.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kube_image() -> None:
    """Binaries, node image and image tarballs: built when missing, else found cached."""
    proc = subprocess.run(["make", "-C", str(ROOT), "kube-image"], capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, f"make kube-image failed:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"


def _leftovers(run_id: str) -> list[str]:
    from testbed.emulation.dockerd import Dockerd, run_containers
    from testbed.experiment.k8s_cluster import STATE_ROOT

    found = [f"container {c}" for c in run_containers(Dockerd().host, run_id)]
    found += [f"dir {p}" for p in (STATE_ROOT / run_id,) if p.exists()]
    found += [f"interface {n}" for n in os.listdir("/sys/class/net") if n.startswith(run_id)]
    return found


def test_node_failure_scenario_on_a_real_cluster(kube_image: None, state_dir: Path,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run_scenario.py"),
         str(ROOT / "scenarios" / "kube_node_failure.yaml"), "--backend", "k3s",
         "--cluster", "emulated", "--out", str(out)],
        capture_output=True, text=True, timeout=1200, cwd=ROOT)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 0, log
    assert summary["backend"] == "k3s"
    assert summary["requests"]["lost"] == 0 and summary["requests"]["mismatched"] == 0
    assert summary["requests"]["completed"] > 0
    cluster = summary["cluster"]
    assert cluster["kind"] == "emulated" and cluster["kubernetes_version"] == "v1.34.4"
    assert sorted(n["name"] for n in cluster["nodes"]) == ["dispatcher", "edge1", "edge2"]
    crash = next(f for f in summary["faults"] if f["action"] == "node.crash")
    assert crash["detected_s"] is not None and crash["detected_s"] >= crash["at_s"]
    # everything the run made is gone: record, containers, stores, interfaces, PKI
    run_id = re.search(r"\(run ([a-z0-9]+)\)", proc.stdout + proc.stderr)
    assert run_id, log
    assert not list(state_dir.glob("*.json")), log
    assert not (state_dir / run_id.group(1)).exists()
    assert not _leftovers(run_id.group(1))


def test_pod_traffic_crosses_the_shaped_link(kube_image: None, state_dir: Path) -> None:
    from formats.topology import load_topology
    from testbed.experiment.k8s_cluster import EmulatedCluster
    from testbed.experiment.k8s_probe import probe_cluster

    topology = load_topology(ROOT / "topologies" / "kube-3.yaml")
    cluster = EmulatedCluster(topology, [])
    with cluster:
        run_id = cluster.net.run_id
        rows = {row["sender"]: row for row in probe_cluster(cluster)}
    assert rows["edge2"]["link_mbps"] == 50.0 and rows["edge1"]["link_mbps"] == 100.0
    # HTB bounds it from above; loose below (the machine is shared)
    assert 0.5 * 50 < rows["edge2"]["measured_mbps"] <= 1.05 * 50, rows
    assert rows["edge1"]["measured_mbps"] > 1.3 * rows["edge2"]["measured_mbps"], rows
    assert rows["edge1"]["measured_mbps"] <= 1.05 * 100, rows
    assert not _leftovers(run_id) and not list(state_dir.glob("*.json"))
