"""Pod-to-pod bandwidth on the emulated cluster: shows that pods' traffic crosses the shaped
links. For each (sender node, receiver node) pair, a receiver pod and a sender pod of the
stage image (its Python, no extra tool) pinned to the two nodes; the sender streams TCP to
the receiver's pod IP for a few seconds, the receiver reports the rate past the first second
(slow start) in its log. The expected figure is the narrowest link on the path (the topology's
bandwidths; HTB carries ~95% of it as TCP goodput).

`python -m testbed.experiment.k8s_probe [TOPOLOGY]` (root) builds a cluster, probes every
edge node towards the dispatcher's node and prints the table; tests and benchmarks call
`probe_pair` on a cluster they hold.

Division of labour: the cluster is testbed.experiment.k8s_cluster's; this module only adds and
removes its own namespace's pods.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from formats.topology import Topology
from testbed.emulation.images import DEFAULT_TAG

NAMESPACE = "edgepipe-probe"
PORT = 22201
SECONDS = 6.0
# Runs in the stage image's python3: counts bytes as they come, reports bits/s after 1 s.
RECEIVER = f"""
import socket, time
server = socket.create_server(("", {PORT}))
conn, _ = server.accept()
start = time.monotonic(); mark = None; total = 0
while True:
    data = conn.recv(1 << 16)
    if not data:
        break
    now = time.monotonic()
    if mark is None and now - start >= 1.0:
        mark, total = now, 0
    total += len(data)
end = time.monotonic()
print("MBITS", total * 8 / (end - mark) / 1e6 if mark and end > mark else 0.0, flush=True)
"""
SENDER = f"""
import socket, sys, time
for _ in range(100):
    try:
        conn = socket.create_connection((sys.argv[1], {PORT}), timeout=5)
        break
    except OSError:
        time.sleep(0.2)
chunk = bytes(1 << 16); end = time.monotonic() + {SECONDS}
while time.monotonic() < end:
    conn.sendall(chunk)
conn.close()
"""


def path_bandwidth_mbps(topology: Topology, a: str, b: str) -> float:
    """The narrowest link between two hosts (the topology is a tree: one path)."""
    return topology.path_bandwidth_mbps()[(a, b)]


def _pod(name: str, node: str, args: list[str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": {"app.kubernetes.io/name": "edgepipe-probe"}},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                     "restartPolicy": "Never", "enableServiceLinks": False,
                     "automountServiceAccountToken": False,
                     "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "probe", "image": DEFAULT_TAG,
                                     "imagePullPolicy": "Never",
                                     "command": ["python3", "-c", *args]}]}}


def _wait_phase(core: Any, name: str, phases: tuple[str, ...], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pod = core.read_namespaced_pod(name, NAMESPACE)
        if pod.status.phase in phases:
            return pod
        time.sleep(0.5)
    raise RuntimeError(f"probe pod {name} not {'/'.join(phases)} after {timeout_s:.0f} s "
                       f"(phase {pod.status.phase})")


def probe_pair(api: Any, sender: str, receiver: str, timeout_s: float = 120.0) -> float:
    """Mbit/s of TCP from a pod on `sender` to a pod on `receiver`."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    try:
        core.create_namespace({"metadata": {"name": NAMESPACE}})
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    rx, tx = f"rx-{receiver}", f"tx-{sender}"
    try:
        core.create_namespaced_pod(NAMESPACE, _pod(rx, receiver, [RECEIVER]))
        ip = _wait_phase(core, rx, ("Running",), timeout_s).status.pod_ip
        core.create_namespaced_pod(NAMESPACE, _pod(tx, sender, [SENDER, ip]))
        _wait_phase(core, rx, ("Succeeded", "Failed"), timeout_s + SECONDS)
        text = core.read_namespaced_pod_log(rx, NAMESPACE)
    finally:
        for name in (tx, rx):
            try:
                core.delete_namespaced_pod(name, NAMESPACE, grace_period_seconds=0)
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
    for line in text.splitlines():
        if line.startswith("MBITS "):
            return float(line.split()[1])
    raise RuntimeError(f"probe {sender}->{receiver}: no result in the receiver's log: "
                       f"{text[-300:]!r}")


def probe_cluster(cluster: Any) -> list[dict[str, Any]]:
    """Every edge node towards the dispatcher's node: measured and expected Mbit/s."""
    dispatcher = cluster.topology.dispatcher().name
    rows = []
    with cluster.api() as api:
        for host in cluster.hosts:
            if host == dispatcher:
                continue
            measured = probe_pair(api, host, dispatcher)
            rows.append({"sender": host, "receiver": dispatcher, "measured_mbps": measured,
                         "link_mbps": path_bandwidth_mbps(cluster.topology, host,
                                                          dispatcher)})
    return rows


def main(argv: list[str] | None = None) -> int:
    from formats.topology import load_topology
    from testbed.experiment.k8s_cluster import EmulatedCluster

    parser = argparse.ArgumentParser(prog="python -m testbed.experiment.k8s_probe")
    parser.add_argument("topology", nargs="?", default="topologies/kube-3.yaml")
    args = parser.parse_args(argv)
    topology = load_topology(Path(args.topology))
    with EmulatedCluster(topology, []) as cluster:
        rows = probe_cluster(cluster)
    print(f"{'pods':<24} {'measured Mbit/s':>16} {'link Mbit/s':>12} {'ratio':>6}")
    for row in rows:
        print(f"{row['sender'] + ' -> ' + row['receiver']:<24} {row['measured_mbps']:>16.1f} "
              f"{row['link_mbps']:>12.1f} {row['measured_mbps'] / row['link_mbps']:>6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
