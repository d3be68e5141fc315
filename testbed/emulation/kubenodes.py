"""The emulated cluster's nodes: every host of the topology is a Docker host of the node image
(`make kube-image`: the stage image plus containerd, runc, the CNI plugins and the kubelet),
wired into the Mininet links exactly like the Docker hosts of testbed.emulation.containers
(a network holder owns the netns, so HTB shaping, delay, loss and link faults apply to it and
to every pod behind it), with the host's `--cpus` and `--memory` bounding the kubelet,
containerd and all its pods alike.

The machine container is not privileged. It gets what containerd, runc and the CNI plugins
need and no more: its own cgroup namespace (the kubelet's `cgroupRoot /` is the node's own
group, so nodes never meet in the cgroup tree and the host's limits bound the pods),
CAP_SYS_ADMIN (mounts and namespaces for pods), CAP_NET_ADMIN (pod veths and routes),
CAP_SYS_PTRACE (runc opens /proc/PID/ns/* of the pod's sandbox, which runs as the pod's user
when it sets runAsUser: without it every restricted pod fails to start with "can't get final
child's PID from pipe") and seccomp unconfined (runc's keyring and mount calls; pods get
containerd's default profile again). /proc/sys and /sys stay read-only and no device is
passed: a node cannot change the machine's kernel settings or reach its disks, which
`--privileged` would allow. The kubelet reads the six global sysctls it insists on from
files node-entry.sh mounts over them; what is per network namespace (ip_forward, routes,
the Service rule) the driver sets from outside, through the host's Mininet shell. (Not
CAP_SYS_RESOURCE: these machines' bounding set lacks it; containerd keeps pods' OOM scores
at or above the node's, `restrict_oom_score_adj`.)

Pod networking is kindnet's design without the daemon: each node has a /24 of the pod range
(host order), the CNI `ptp` plugin gives each pod a veth and a /32 route in the node's
namespace, and every node (and the dispatcher) has a route to each other node's /24 via that
node's address: pod-to-pod traffic leaves by the node's shaped link. No kube-proxy: pods
reach the API server by one DNAT rule per node for the `kubernetes` Service IP, and the
deployment's Services are headless or resolved by CoreDNS (testbed.emulation.kubecontrol).

Docker through the CLI (testbed.emulation.dockerd.Dockerd.docker), not the `docker` SDK: the
testbed drives a daemon by its unix socket with a handful of commands whose exit status and
stderr are the whole interface, runs without the SDK's extra dependency (and its version
coupling with the daemon's API), and shares one code path with the Docker hosts and the image
builder; the SDK would add nothing the CLI lacks here.

Division of labour: this module makes the node image's tarballs and each node's files and
containers; testbed.emulation.kubecontrol runs the control plane; testbed.experiment.k8s_cluster
puts them together for a run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from formats.topology import HostSpec
from testbed.emulation import records
from testbed.emulation.containers import HOST_LABEL, ContainerError, DockerHosts
from testbed.emulation.dockerd import RUN_LABEL, Dockerd, docker_cli
from testbed.emulation.records import CGROUP_ROOT, RunRecord

KUBE_VERSION = "v1.34.4"                     # cluster/build-kubernetes.sh's default
KUBE_CACHE = Path(os.environ.get("EDGEPIPE_KUBE_CACHE", "/var/cache/edgepipe/kubernetes"))
IMAGES_DIR = KUBE_CACHE / "images"           # tarballs every node imports at boot
PAUSE_TAG = f"edgepipe-pause:{KUBE_VERSION}"
# Debian's containerd and runc, the CNI plugins and what they need that the stage image
# (debootstrap minbase + python3) lacks.
NODE_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables",
                 "libip4tc2", "libip6tc2", "libxtables12", "libnetfilter-conntrack3",
                 "libnfnetlink0", "libnftnl11", "libmnl0", "libseccomp2", "netbase")
POD_RANGE = "10.244.0.0/16"
SERVICE_RANGE = "10.96.0.0/16"
API_SERVICE_IP = "10.96.0.1"
CONF_MOUNT = "/etc/edgepipe/node"
STATE_MOUNT = "/var/lib/edgepipe-node"
IMAGES_MOUNT = "/opt/edgepipe/images"
NODE_CAPS = ("SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE")


def kube_bin(version: str = KUBE_VERSION) -> Path:
    return KUBE_CACHE / version / "bin"


def pod_cidr(index: int) -> str:
    """The pod /24 of the index-th host (1-based, topology order)."""
    return f"10.244.{index}.0/24"


@dataclass(frozen=True)
class NodeTuning:
    """How fast Kubernetes itself notices a dead node and moves its pods: the kubelet's
    lease and status period, the node lifecycle controller's grace period and the
    not-ready/unreachable tolerations the API server gives every pod."""

    lease_s: int = 40
    status_update_s: int = 10
    monitor_grace_s: int = 40
    toleration_s: int = 300

    @classmethod
    def tuned(cls) -> NodeTuning:
        return cls(lease_s=8, status_update_s=2, monitor_grace_s=8, toleration_s=2)


def _docker_save(daemon: Dockerd, tag: str, target: Path) -> None:
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as stream:
        proc = subprocess.run([docker_cli(), "-H", daemon.host, "save", tag], stdout=stream,
                              stderr=subprocess.PIPE, check=False, timeout=600)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ContainerError(f"docker save {tag}: {proc.stderr.decode(errors='replace')}")
    partial.rename(target)


def ensure_pause_image(daemon: Dockerd) -> None:
    """The sandbox image: Kubernetes' pause.c, compiled statically by `make kube-bin`, alone
    in an imported image (no registry, no base)."""
    if daemon.image_exists(PAUSE_TAG):
        return
    pause = kube_bin() / "pause"
    if not pause.is_file():
        raise ContainerError(f"{pause} is missing: `make kube-bin`")
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(str(pause), arcname="pause")
    daemon.docker("import", "--change", 'ENTRYPOINT ["/pause"]', "-", PAUSE_TAG,
                  input=buffer.getvalue(), timeout=120)


def image_tarballs(daemon: Dockerd, stage: str, controller: str) -> list[Path]:
    """`docker save` of the images pods run (stage, controller, pause) into IMAGES_DIR, one
    tarball per image ID (kept while the image is unchanged); older ones are removed."""
    ensure_pause_image(daemon)
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    wanted = []
    for tag in (stage, controller, PAUSE_TAG):
        image_id = daemon.docker("image", "inspect", "-f", "{{.Id}}", tag).stdout.decode()
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", tag.split(":")[0])
        target = IMAGES_DIR / f"{name}-{image_id.strip().split(':')[-1][:12]}.tar"
        if not target.exists():
            _docker_save(daemon, tag, target)
        wanted.append(target)
    for old in IMAGES_DIR.glob("*.tar"):
        if old not in wanted:
            old.unlink()
    return wanted


def check_tarballs(daemon: Dockerd, stage: str, controller: str) -> list[Path]:
    """The tarballs of the images as the daemon has them now; ContainerError (`make
    kube-image`) when one is missing or stale."""
    found = []
    for tag in (stage, controller, PAUSE_TAG):
        proc = daemon.docker("image", "inspect", "-f", "{{.Id}}", tag, check=False)
        if proc.returncode != 0:
            raise ContainerError(f"image {tag} is missing: `make kube-image`")
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", tag.split(":")[0])
        tar = IMAGES_DIR / f"{name}-{proc.stdout.decode().strip().split(':')[-1][:12]}.tar"
        if not tar.is_file():
            raise ContainerError(f"{tar} is missing or {tag} changed since: `make kube-image`")
        found.append(tar)
    return found


# --- each node's files ------------------------------------------------------------------------

def containerd_toml(state: str = STATE_MOUNT) -> str:
    return f"""version = 2
root = "{state}/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/library/{PAUSE_TAG}"
  # the node's own oom_score_adj is the floor: a container cannot ask for less
  restrict_oom_score_adj = true
  disable_hugetlb_controller = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
"""


def cni_conflist(cidr: str) -> str:
    return json.dumps({
        "cniVersion": "0.4.0", "name": "edgepipe",
        "plugins": [{"type": "ptp", "ipMasq": False, "mtu": 1500,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": cidr}]],
                              "routes": [{"dst": "0.0.0.0/0"}]}}],
    }, indent=1)


def kubelet_yaml(conf: str, dns_ip: str, tuning: NodeTuning) -> str:
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "cgroupDriver": "cgroupfs", "cgroupRoot": "/", "failSwapOn": False,
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": f"{conf}/ca.crt"}},
        # Only holders of a certificate of the run's CA get past authentication (the API
        # server, the driver): nothing to authorize beyond that.
        "authorization": {"mode": "AlwaysAllow"},
        "tlsCertFile": f"{conf}/kubelet-serving.crt",
        "tlsPrivateKeyFile": f"{conf}/kubelet-serving.key",
        "clusterDNS": [dns_ip], "clusterDomain": "cluster.local", "resolvConf": "",
        "nodeLeaseDurationSeconds": tuning.lease_s,
        "nodeStatusUpdateFrequency": f"{tuning.status_update_s}s",
        "nodeStatusReportFrequency": f"{tuning.status_update_s}s",
        # The imported images must never be collected: they cannot be pulled again.
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                         "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        "serializeImagePulls": False, "registerNode": True,
        "syncFrequency": "5s", "fileCheckFrequency": "5s",
        "volumeStatsAggPeriod": "0s", "localStorageCapacityIsolation": False,
    }
    return json.dumps(config, indent=1)     # JSON is YAML


@dataclass
class NodeDirs:
    conf: Path     # read-only at CONF_MOUNT: configs, certificates, `ready`
    state: Path    # read-write at STATE_MOUNT: containerd's store, logs


class NodeContainers(DockerHosts):
    """DockerHosts whose machine container is a Kubernetes node (module docstring); the
    network holder is the same as a Docker host's."""

    def __init__(self, daemon: Dockerd, record: RunRecord, dirs: dict[str, NodeDirs]) -> None:
        super().__init__(daemon, record)
        self.dirs = dirs

    def create(self, host: str, node: str, spec: HostSpec, image: str,
               binds: Sequence[Path]) -> int:
        labels = ["--label", f"{RUN_LABEL}={self.record.run_id}", "--label",
                  f"{HOST_LABEL}={host}", "--init", "--log-driver", "none",
                  "--cgroup-parent", f"/{node}"]
        holder = f"{node}-net"
        self.record.add("containers", holder)
        self._docker("run", "-d", "--name", holder, "--network", "none", *labels,
                     "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                     "--entrypoint", "sleep", image, "infinity")
        holder_pid = int(self._docker("inspect", "-f", "{{.State.Pid}}", holder))
        memory = ["--memory", str(spec.memory_bytes)]
        if (CGROUP_ROOT / "memory" / "memory.memsw.limit_in_bytes").exists():
            memory += ["--memory-swap", str(spec.memory_bytes)]
        dirs = self.dirs[host]
        mounts = [f"type=bind,source={dirs.conf},target={CONF_MOUNT},readonly",
                  f"type=bind,source={dirs.state},target={STATE_MOUNT}",
                  f"type=bind,source={IMAGES_DIR},target={IMAGES_MOUNT},readonly",
                  *(f"type=bind,source={path},target={path}" for path in binds)]
        self.record.add("containers", node)
        container_id = self._docker(
            "run", "-d", "--name", node, "--network", f"container:{holder}",
            "--cpus", f"{spec.cpu:g}", *memory, "--cgroupns", "private",
            *[arg for cap in NODE_CAPS for arg in ("--cap-add", cap)],
            "--security-opt", "seccomp=unconfined", "--user", "0:0",
            *[arg for mount in mounts for arg in ("--mount", mount)], *labels, image)
        from testbed.emulation.containers import Container

        container = Container(host, node, container_id)
        self.containers[host] = container
        self._refresh(container)
        return holder_pid

    def pids(self, host: str) -> list[int]:
        """Everything in the node but its init (containerd, the kubelet, the pods)."""
        init = self.containers[host].init_pid
        top = CGROUP_ROOT / self.cgroup(host, "memory")
        found: list[int] = []
        for directory, _, files in os.walk(top):
            if "cgroup.procs" in files:
                found += records.cgroup_pids(str(Path(directory).relative_to(CGROUP_ROOT)))
        return [pid for pid in found if pid != init]


def node_dirs(run_dir: Path, state_root: Path, hosts: Sequence[str]) -> dict[str, NodeDirs]:
    return {host: NodeDirs(run_dir / "kube" / "nodes" / host, state_root / host)
            for host in hosts}

