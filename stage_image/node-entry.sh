#!/bin/sh
# The boot of an emulated Kubernetes node (a Docker container, not privileged: see
# testbed/emulation/kubenodes.py for its capabilities and why). Its configuration is mounted
# read-only at /etc/edgepipe/node by the driver, its state (containerd's store, logs) at
# /var/lib/edgepipe-node, the images to import at /opt/edgepipe/images.
set -eu
CONF=/etc/edgepipe/node
STATE=/var/lib/edgepipe-node
mkdir -p "$STATE/logs"
# The driver writes the configuration once the control plane is up; a reboot finds it there.
until [ -f "$CONF/ready" ]; do sleep 0.2; done

# cgroups: the container has its own cgroup namespace, so each v1 hierarchy's root here is the
# node's own group (its --cpus and --memory bound everything below). Docker mounts them
# read-only; containerd and the kubelet make the pods' groups under them.
for dir in /sys/fs/cgroup/*; do
    [ -L "$dir" ] || mount -o remount,rw,bind "$dir" "$dir" 2>/dev/null || true
done
mount -o remount,rw /sys/fs/cgroup 2>/dev/null || true

# /proc/sys stays read-only (a node must not change the machine's kernel), but for
# /proc/sys/net: what is there belongs to the network namespace of whoever writes (the node's,
# a pod's), and the CNI plugins set a pod's interfaces through it.
mount --bind /proc/sys/net /proc/sys/net
mount -o remount,rw,bind /proc/sys/net /proc/sys/net
# The kubelet insists on six global settings (it would write them); it reads them from these
# files instead.
mkdir -p /run/edgepipe-sysctl
while read -r key value; do
    file=/run/edgepipe-sysctl/$(echo "$key" | tr / .)
    echo "$value" > "$file"
    mount --bind "$file" "/proc/sys/$key"
done <<SYSCTL
vm/overcommit_memory 1
vm/panic_on_oom 0
kernel/panic 10
kernel/panic_on_oops 1
kernel/keys/root_maxkeys 1000000
kernel/keys/root_maxbytes 25000000
SYSCTL

# The kubelet's OOM watcher opens /dev/kmsg or refuses to start. The machine's kernel log is
# not the node's to read (dmesg_restrict): an empty file, read to its end, stops the watcher;
# a pod killed for memory is still reported, by containerd from its cgroup.
[ -e /dev/kmsg ] || : > /dev/kmsg

mkdir -p /etc/cni/net.d /run/containerd
cp "$CONF"/cni.conflist /etc/cni/net.d/10-edgepipe.conflist
containerd --config "$CONF/containerd.toml" >>"$STATE/logs/containerd.log" 2>&1 &
i=0
until ctr --address /run/containerd/containerd.sock version >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -lt 300 ] || { echo "containerd did not start" >&2; exit 1; }
    sleep 0.1
done
# Content already in the store (a reboot) is not unpacked again: the second import is quick.
for tar in /opt/edgepipe/images/*.tar; do
    ctr --address /run/containerd/containerd.sock -n k8s.io images import "$tar" >>"$STATE/logs/import.log" 2>&1
done
echo "$(date +%s.%N) images imported" >>"$STATE/logs/boot.log"
exec kubelet --config "$CONF/kubelet.yaml" --kubeconfig "$CONF/kubelet.conf" \
    --hostname-override "$(cat "$CONF/name")" --node-ip "$(cat "$CONF/ip")" \
    >>"$STATE/logs/kubelet.log" 2>&1
