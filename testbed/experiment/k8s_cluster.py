"""`run_scenario.py SCENARIO --backend k3s --cluster emulated --out DIR` (root): a real
Kubernetes cluster built from the scenario's topology, the scenario run on it through the
k3s live path (testbed.experiment.k3s_live), everything torn down by the run's record.

Bring-up, in order (each item recorded before it exists):
  1. the emulated network with every host a node container (testbed.emulation.kubenodes;
     the dispatcher too: the controller pod is pinned there), booting into a wait for its
     configuration;
  2. the control plane in the dispatcher's namespace and the run's PKI
     (testbed.emulation.kubecontrol, testbed.emulation.kubepki);
  3. per node: its kubelet's certificates and kubeconfig, containerd's and the CNI's
     configuration; in its network namespace, from outside: forwarding on, a route to every
     other node's pod /24 via that node, the `kubernetes` Service rule; then `ready`, and
     the node boots containerd, imports the images and starts the kubelet;
  4. every Node Ready.
Faults of the scenario act on the nodes: `node.crash` kills the node container and darkens its
link, `node.restart` kills and starts it (its kubelet boots again), `node.pause` freezes it,
link faults shape its links. summary.json's "cluster" says what ran.

Division of labour: this module orders the pieces and waits; the pieces are in
testbed.emulation.kube*; the run itself is testbed.experiment.k3s_live's.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

from formats.topology import Topology
from testbed.emulation.dockerd import Dockerd, start_for_runs
from testbed.emulation.images import CONTROLLER_TAG, DEFAULT_TAG, NODE_TAG, app_digest
from testbed.emulation.kubecontrol import API_PORT, ControlPlane
from testbed.emulation.kubenodes import (
    API_SERVICE_IP,
    KUBE_VERSION,
    NodeContainers,
    NodeDirs,
    NodeTuning,
    check_tarballs,
    cni_conflist,
    containerd_toml,
    kubelet_yaml,
    pod_cidr,
)
from testbed.emulation.network import EmulatedNetwork
from testbed.emulation.records import RunRecord
from testbed.experiment.prepare import log

STATE_ROOT = Path("/var/lib/edgepipe/kube")   # containerd's stores: overlayfs needs a disk
READY_TIMEOUT_S = 300.0
# What a node container can suffer (testbed.emulation.network's methods for Docker hosts).
CLUSTER_FAULTS = ("node.crash", "node.restart", "node.pause", "node.resume", "node.cpu",
                  "link.down", "link.up", "link.bandwidth", "link.delay", "link.loss",
                  "link.partition")


def node_topology(topology: Topology) -> Topology:
    """The topology with every host a Docker host of the node image."""
    hosts = {name: dataclasses.replace(spec, kind="docker", image=NODE_TAG)
             for name, spec in topology.hosts.items()}
    return dataclasses.replace(topology, hosts=hosts)


class NodeNetwork(EmulatedNetwork):
    """The emulated network whose Docker hosts are Kubernetes nodes (NodeContainers); their
    configuration and store directories are recorded as the run's trees before they exist."""

    docker_dispatcher = True

    def __init__(self, topology: Topology, **kwargs: Any) -> None:
        super().__init__(node_topology(topology), **kwargs)
        self.node_dirs: dict[str, NodeDirs] = {}

    @property
    def kube_dir(self) -> Path:
        return self.run_dir / "kube"

    def _start_docker(self, record: RunRecord) -> None:
        state = STATE_ROOT / self.run_id
        record.add("trees", str(self.kube_dir), str(state))
        self.node_dirs = {host: NodeDirs(self.kube_dir / "nodes" / host, state / host)
                          for host in self.topology.hosts}
        for dirs in self.node_dirs.values():
            dirs.conf.mkdir(parents=True)
            dirs.state.mkdir(parents=True)
        daemon = Dockerd()
        record.docker_host = daemon.host
        record.save()
        start_for_runs(daemon)
        check_tarballs(daemon, DEFAULT_TAG, CONTROLLER_TAG)
        self.docker = NodeContainers(daemon, record, self.node_dirs)
        self.docker.check_image(NODE_TAG, app_digest())


class EmulatedCluster:
    """One run's Kubernetes cluster on its emulated network (module docstring). `up()` and
    `down()`, or a with-block; `down()` is safe at any point of `up()`."""

    def __init__(self, topology: Topology, shared_dirs: list[Path],
                 tuning: NodeTuning | None = None, logs_to: Path | None = None) -> None:
        self.topology = topology
        self.logs_to = logs_to        # the control plane's and nodes' logs are copied here
        self.tuning = tuning or NodeTuning()
        self.net = NodeNetwork(topology, shared_dirs=shared_dirs)
        self.control: ControlPlane | None = None
        self.timings: dict[str, float] = {}

    @property
    def hosts(self) -> list[str]:
        return list(self.topology.hosts)

    @property
    def kubeconfig(self) -> Path:
        assert self.control is not None
        return self.control.admin_kubeconfig

    def up(self) -> EmulatedCluster:
        started = time.monotonic()
        self.net.build()
        self.timings["network_s"] = time.monotonic() - started
        log(f"network of {len(self.hosts)} node containers up in "
            f"{self.timings['network_s']:.1f} s (run {self.net.run_id})")
        assert self.net.record is not None
        dispatcher = self.topology.dispatcher().name
        self.control = ControlPlane(self.net.record, self.net.kube_dir,
                                    self.net.node(dispatcher).pid, self.net.ip(dispatcher),
                                    self.tuning)
        self.control.start()
        self.timings["control_plane_s"] = time.monotonic() - started
        log(f"control plane up at {self.control.server} after "
            f"{self.timings['control_plane_s']:.1f} s")
        self._configure_nodes()
        self.wait_nodes_ready()
        self.timings["ready_s"] = time.monotonic() - started
        log(f"cluster of {len(self.hosts)} nodes ready after {self.timings['ready_s']:.1f} s")
        return self

    def _configure_nodes(self) -> None:
        control = self.control
        assert control is not None and control.pki is not None
        pki, api_ip = control.pki, control.dispatcher_ip
        server = f"https://{api_ip}:{API_PORT}"
        cidrs = {host: pod_cidr(i) for i, host in enumerate(self.hosts, start=1)}
        for host in self.hosts:
            conf = self.net.node_dirs[host].conf
            ip = self.net.ip(host)
            client = pki.issue(f"kubelet-{host}", f"system:node:{host}", ["system:nodes"])
            serving = pki.issue(f"kubelet-serving-{host}", f"system:node:{host}",
                                ["system:nodes"], client=False, server=True, dns=[host],
                                ips=[ip])
            pki.kubeconfig(conf / "kubelet.conf", server, f"system:node:{host}", client)
            shutil.copy(pki.ca.cert, conf / "ca.crt")
            shutil.copy(serving.cert, conf / "kubelet-serving.crt")
            shutil.copy(serving.key, conf / "kubelet-serving.key")
            (conf / "containerd.toml").write_text(containerd_toml())
            (conf / "cni.conflist").write_text(cni_conflist(cidrs[host]))
            (conf / "kubelet.yaml").write_text(kubelet_yaml("/etc/edgepipe/node", api_ip,
                                                            self.tuning))
            (conf / "name").write_text(host)
            (conf / "ip").write_text(ip)
            # the node's network namespace, from outside (kindnet's routes, kube-proxy's
            # one rule this cluster needs)
            self.net.in_host(host, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            for other in self.hosts:
                if other != host:
                    self.net.in_host(host, ["ip", "route", "replace", cidrs[other], "via",
                                            self.net.ip(other)])
            self.net.in_host(host, ["iptables", "-w", "-t", "nat", "-A", "PREROUTING", "-d",
                                    f"{API_SERVICE_IP}/32", "-p", "tcp", "--dport", "443",
                                    "-j", "DNAT", "--to-destination", f"{api_ip}:{API_PORT}"])
        for host in self.hosts:
            (self.net.node_dirs[host].conf / "ready").touch()

    def api(self) -> Any:
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig),
                                client_configuration=configuration)
        return client.ApiClient(configuration)

    def wait_nodes_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        from kubernetes import client

        deadline = time.monotonic() + timeout_s
        last: dict[str, str] = {}
        with self.api() as api:
            core = client.CoreV1Api(api)
            while time.monotonic() < deadline:
                state = {n.metadata.name: next((c.status for c in n.status.conditions or []
                                                if c.type == "Ready"), "?")
                         for n in core.list_node(_request_timeout=10).items}
                if state != last:
                    log(f"nodes: {state}")
                    last = state
                if all(state.get(host) == "True" for host in self.hosts):
                    return
                time.sleep(1.0)
        raise RuntimeError(f"nodes not ready after {timeout_s:.0f} s: {last}; see the "
                           f"kubelet logs in {STATE_ROOT / self.net.run_id}/*/logs")

    def summary(self) -> dict[str, Any]:
        return {"kind": "emulated", "kubernetes_version": KUBE_VERSION,
                "nodes": [{"name": host, "ip": self.net.ip(host), "pod_cidr": pod_cidr(i),
                           "cpu": spec.cpu, "memory_bytes": spec.memory_bytes,
                           "role": spec.role}
                          for i, (host, spec) in enumerate(self.topology.hosts.items(),
                                                           start=1)],
                "bring_up_s": {k: round(v, 1) for k, v in self.timings.items()},
                "node_monitor_grace_s": self.tuning.monitor_grace_s,
                "toleration_s": self.tuning.toleration_s}

    def down(self) -> None:
        if self.control is not None:
            self.control.stop()
        if self.logs_to is not None:
            self._save_logs(self.logs_to / "kube")
        self.net.stop()

    def _save_logs(self, target: Path) -> None:
        """Copy the logs out of the run's directories before teardown removes them."""
        sources = {"control-plane": self.net.kube_dir / "logs",
                   **{host: dirs.state / "logs" for host, dirs in self.net.node_dirs.items()}}
        for name, source in sources.items():
            if source.is_dir():
                shutil.copytree(source, target / name, dirs_exist_ok=True)

    def __enter__(self) -> EmulatedCluster:
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc: object) -> None:
        self.down()


def run_emulated(scenario: Any, out_dir: Path, keep: bool = False) -> int:
    """The scenario on a cluster built from its topology (module docstring)."""
    from testbed.experiment.k3s_live import BuiltCluster, run_k3s

    with EmulatedCluster(scenario.topology, [out_dir], logs_to=out_dir / "logs") as cluster:
        built = BuiltCluster(cluster.net, CLUSTER_FAULTS, {"image_pull_policy": "Never"},
                             cluster.summary())
        return run_k3s(scenario, out_dir, str(cluster.kubeconfig), keep=keep, cluster=built)
