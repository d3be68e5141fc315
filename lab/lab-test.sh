#!/usr/bin/env bash
# `make lab-test` in the lab VM (docs/lab.md): a k3s cluster in Docker with one node per
# topology host (CPU and memory limits from the topology), the stage and controller images
# imported into it, the scenario's manifests checked by the real API server (server-side dry
# run: schema, defaulting and Pod Security admission), then the scenario run with the k3s
# backend.
# The cluster is removed at the end, also on failure or Ctrl-C.
#
#   sudo lab/lab-test.sh [SCENARIO]      (default: scenarios/baseline.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."

SCENARIO=${1:-scenarios/baseline.yaml}
PY=.venv/bin/python
OUT=${OUT:-results/lab-k3s}
CLUSTER=lab/k3s-cluster.sh

[ "$(id -u)" -eq 0 ] || { echo "run as root (sudo)" >&2; exit 2; }
command -v docker >/dev/null || { echo "no docker: is this the lab VM? (vagrant up)" >&2; exit 2; }

# The topology's hosts: the dispatcher becomes the k3s server, every other host an agent.
# A node container holds the k3s agent *and* the stage pod, so it gets the host's budget plus
# the agent's own overhead; the pod's limits (from the manifests) hold the stage to the
# topology's budget exactly.
AGENT_CPU=${AGENT_CPU:-0.25}
AGENT_MEMORY_MIB=${AGENT_MEMORY_MIB:-384}
mapfile -t NODES < <("$PY" - "$SCENARIO" "$AGENT_CPU" "$AGENT_MEMORY_MIB" <<'EOF'
import sys
from formats.scenario import load_scenario
scenario = load_scenario(sys.argv[1])
extra_cpu, extra_mib = float(sys.argv[2]), int(sys.argv[3])
hosts = scenario.topology.hosts
server = [h for h in hosts.values() if h.role == "dispatcher"][0]
print(server.name)
for host in hosts.values():
    if host is not server:
        mib = host.memory_bytes // (1024 * 1024) + extra_mib
        print(f"{host.name}={host.cpu + extra_cpu:g}:{mib}m")
EOF
)

trap '"$CLUSTER" down' EXIT
"$CLUSTER" up "${NODES[@]}"
"$CLUSTER" import edgepipe-stage:latest
"$CLUSTER" import edgepipe-controller:latest
# Each host's link to its switch, from the topology (lab VMs have sch_netem for the delay).
"$PY" - "$SCENARIO" <<'EOF' | while read -r name mbit delay; do "$CLUSTER" shape "$name" "$mbit" "$delay"; done
import sys
from formats.scenario import load_scenario
topology = load_scenario(sys.argv[1]).topology
for name in topology.hosts:
    link = next((l for l in topology.links if name in (l.a, l.b)), None)
    if link is not None:
        print(name, f"{link.bandwidth_mbps:g}", f"{link.delay_ms:g}")
EOF
export KUBECONFIG
KUBECONFIG=$("$CLUSTER" kubeconfig)
server=edgepipe-k3s-${NODES[0]}

echo "== manifests: dry run, then the API server's own validation"
rm -rf "$OUT"
"$PY" run_scenario.py "$SCENARIO" --backend k3s --dry-run --out "$OUT"
docker cp "$OUT/k8s" "$server:/tmp/edgepipe-k8s"
# The namespace must exist for namespaced objects to be dry-run; create it for real.
docker exec "$server" kubectl apply -f /tmp/edgepipe-k8s/00-namespace.yaml
docker exec "$server" kubectl apply --dry-run=server -f /tmp/edgepipe-k8s/

echo "== the scenario on k3s"
"$PY" run_scenario.py "$SCENARIO" --backend k3s --out "$OUT"
