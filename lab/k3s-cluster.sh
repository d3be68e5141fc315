#!/usr/bin/env bash
# A k3s cluster in Docker containers, for the lab VM (docs/lab.md). Not for CI: no k3s image
# is reachable there.
#
#   lab/k3s-cluster.sh up SERVER_NODE NODE[=CPUS:MEMORY] ...   e.g. up dispatcher edge1=0.5:512m
#   lab/k3s-cluster.sh import IMAGE       load a local image into every node's containerd
#   lab/k3s-cluster.sh shape NODE MBIT DELAY_MS   shape the node's link (HTB rate + netem delay)
#   lab/k3s-cluster.sh kubeconfig         print the path of a kubeconfig for the host
#   lab/k3s-cluster.sh down               remove every container and the network it made
#
# Node names become the nodes' kubernetes.io/hostname, which is what the manifests'
# nodeSelectors name, so use the topology's host names. Every object is named edgepipe-k3s-*
# and labelled edgepipe.lab=k3s; `down` removes exactly those.
set -euo pipefail

K3S_IMAGE=${K3S_IMAGE:-rancher/k3s:v1.31.4-k3s1}
NET=edgepipe-k3s
STATE=${EDGEPIPE_LAB_STATE:-/var/lib/edgepipe/lab}
LABEL=edgepipe.lab=k3s

node_container() { echo "edgepipe-k3s-$1"; }

run_node() {   # name role cpus memory; extra options in DOCKER_EXTRA and K3S_EXTRA
  local name=$1 role=$2 cpus=$3 memory=$4
  local limits=()
  [ -n "$cpus" ] && limits+=(--cpus "$cpus")
  [ -n "$memory" ] && limits+=(--memory "$memory")
  # privileged + tmpfs /run: what k3s needs to run containerd and kubelet inside Docker
  # (the same flags as k3s' own docker-compose example).
  docker run -d --name "$(node_container "$name")" --hostname "$name" --label "$LABEL" \
    --privileged --network "$NET" --tmpfs /run --tmpfs /var/run "${limits[@]}" \
    -e K3S_TOKEN="$(cat "$STATE/token")" "${DOCKER_EXTRA[@]}" \
    "$K3S_IMAGE" "$role" --node-name "$name" "${K3S_EXTRA[@]}" >/dev/null
}

case "${1:-}" in
  up)
    shift
    [ $# -ge 2 ] || { echo "usage: $0 up SERVER_NODE NODE[=CPUS:MEMORY] ..." >&2; exit 2; }
    server=$1; shift
    mkdir -p "$STATE"
    [ -s "$STATE/token" ] || head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$STATE/token"
    docker network inspect "$NET" >/dev/null 2>&1 || docker network create --label "$LABEL" "$NET" >/dev/null
    # The server runs on the dispatcher host and also schedules the controller there.
    DOCKER_EXTRA=(-v "$STATE:/output" -e K3S_KUBECONFIG_OUTPUT=/output/kubeconfig.yaml
                  -e K3S_KUBECONFIG_MODE=644 -p 127.0.0.1:6443:6443)
    K3S_EXTRA=(--disable traefik --disable metrics-server)
    run_node "$server" server "" ""
    DOCKER_EXTRA=(-e K3S_URL="https://$(node_container "$server"):6443")
    K3S_EXTRA=()
    for spec in "$@"; do
      name=${spec%%=*}; budget=${spec#*=}; cpus=""; memory=""
      if [ "$budget" != "$spec" ]; then cpus=${budget%%:*}; memory=${budget#*:}; fi
      run_node "$name" agent "$cpus" "$memory"
    done
    echo "waiting for $(( $# + 1 )) nodes to be Ready..."
    for _ in $(seq 120); do
      ready=$(docker exec "$(node_container "$server")" kubectl get nodes --no-headers 2>/dev/null \
        | awk '$2 == "Ready"' | wc -l)
      [ "$ready" -eq $(( $# + 1 )) ] && { echo "cluster up"; exit 0; }
      sleep 2
    done
    echo "nodes not Ready after 240 s" >&2
    docker exec "$(node_container "$server")" kubectl get nodes >&2 || true
    exit 1
    ;;
  import)
    image=${2:?usage: $0 import IMAGE}
    for c in $(docker ps -q --filter "label=$LABEL"); do
      # The kubelet reads images from containerd's k8s.io namespace.
      docker save "$image" | docker exec -i "$c" ctr -n k8s.io images import - >/dev/null
      echo "imported $image into $(docker inspect -f '{{.Name}}' "$c")"
    done
    ;;
  shape)
    name=${2:?usage: $0 shape NODE MBIT DELAY_MS}; mbit=${3:?}; delay=${4:-0}
    pid=$(docker inspect -f '{{.State.Pid}}' "$(node_container "$name")")
    # From the VM, in the node container's network namespace: the k3s image has no tc. The
    # node's one interface stands for its topology link (a star approximation of the
    # topology: every node's traffic crosses its own link, shaped on egress).
    nsenter -t "$pid" -n tc qdisc replace dev eth0 root handle 1: htb default 10
    nsenter -t "$pid" -n tc class replace dev eth0 parent 1: classid 1:10 htb rate "${mbit}mbit"
    if [ "$delay" != "0" ]; then
      nsenter -t "$pid" -n tc qdisc replace dev eth0 parent 1:10 handle 10: netem delay "${delay}ms"
    fi
    echo "shaped $name: ${mbit} Mbit/s, ${delay} ms"
    ;;
  kubeconfig)
    # The server writes https://127.0.0.1:6443, which the port mapping above serves.
    echo "$STATE/kubeconfig.yaml"
    ;;
  down)
    docker ps -aq --filter "label=$LABEL" | xargs -r docker rm -f >/dev/null
    docker network rm "$NET" >/dev/null 2>&1 || true
    rm -f "$STATE/kubeconfig.yaml"
    echo "cluster removed"
    ;;
  *)
    sed -n '2,13p' "$0"; exit 2 ;;
esac
