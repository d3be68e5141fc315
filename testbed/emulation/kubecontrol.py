"""The emulated cluster's control plane: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and CoreDNS as processes of the driver's, in the dispatcher host's network
namespace (so nodes reach the API server and the DNS over the emulated links, as edge
devices reach their cloud side) and in the root mount namespace (the binaries come from the
per-machine cache of `make kube-bin`). Every process is written to the run's record when it
starts, so the run's teardown (or `edgepipe cleanup` after a kill -9) ends it by PID.

The driver, in the root namespace, reaches the API server over one veth pair of its own into
the dispatcher's namespace (`<run>ka` / `<run>kb`, a link-local /30 picked from the run id),
recorded like the topology's interfaces. etcd listens on the dispatcher's loopback only.

Flags are for a small shared machine: no leader election (one of each), no profiling, no
priority-and-fairness queues, etcd with a small backend and no fsync (its data is a tmpfs
under the run's directory anyway). The node lifecycle's timing (NodeTuning) is what the
recovery benchmark varies.

Division of labour: testbed.emulation.kubepki makes the certificates this module names;
testbed.emulation.kubenodes the nodes; testbed.experiment.k8s_cluster orders all of it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import signal
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from testbed.emulation import records
from testbed.emulation.kubenodes import API_SERVICE_IP, SERVICE_RANGE, NodeTuning, kube_bin
from testbed.emulation.kubepki import Pki, apiserver_names
from testbed.emulation.records import RunRecord

API_PORT = 22443
ETCD_CLIENT_PORT = 22379
ETCD_PEER_PORT = 22380
COREDNS_VERSION = "v1.12.4"          # cluster/build-coredns.sh's default
START_TIMEOUT_S = 180.0              # the API server's first start on a loaded 2-core machine


class ControlPlaneError(RuntimeError):
    """A control-plane process did not start or answer (the message names its log)."""


def coredns_bin(version: str = COREDNS_VERSION) -> Path:
    return kube_bin().parent.parent / f"coredns-{version}" / "bin" / "coredns"


def driver_link(run_id: str) -> tuple[str, str]:
    """The driver's and the dispatcher's address on the root link: a /30 of 169.254.0.0/16
    chosen by the run id, so runs side by side do not collide (links are point to point)."""
    index = int(hashlib.sha256(run_id.encode()).hexdigest(), 16) % (1 << 14)
    base = ipaddress.ip_address("169.254.0.0") + 4 * index
    return str(base + 1), str(base + 2)


@dataclass
class ControlPlane:
    """The control plane of one run. `start()` brings it up and waits for the API server;
    `stop()` ends every process in reverse order."""

    record: RunRecord
    kube_dir: Path                 # <run dir>/kube: PKI, logs, etcd's data, kubeconfigs
    netns_pid: int                 # a process in the dispatcher's network namespace
    dispatcher_ip: str
    tuning: NodeTuning = field(default_factory=NodeTuning)
    pki: Pki | None = None
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    @property
    def driver_ip(self) -> str:
        return driver_link(self.record.run_id)[0]

    @property
    def link_ip(self) -> str:
        return driver_link(self.record.run_id)[1]

    @property
    def admin_kubeconfig(self) -> Path:
        return self.kube_dir / "admin.conf"

    @property
    def server(self) -> str:
        """The API server as the driver reaches it."""
        return f"https://{self.link_ip}:{API_PORT}"

    def _nsenter(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.netns_pid}/ns/net", *argv]

    def _link(self) -> None:
        run_id = self.record.run_id
        root, inner = f"{run_id}ka", f"{run_id}kb"
        self.record.add("interfaces", root, inner)
        for argv in (["ip", "link", "add", root, "type", "veth", "peer", "name", inner,
                      "netns", str(self.netns_pid)],
                     ["ip", "addr", "add", f"{self.driver_ip}/30", "dev", root],
                     ["ip", "link", "set", root, "up"],
                     self._nsenter("ip", "addr", "add", f"{self.link_ip}/30", "dev", inner),
                     self._nsenter("ip", "link", "set", inner, "up")):
            subprocess.run(argv, check=True, capture_output=True, timeout=30)

    def _make_pki(self) -> Pki:
        pki = Pki(self.kube_dir / "pki")
        pki.issue("apiserver", "kube-apiserver", client=False, server=True,
                  dns=apiserver_names(),
                  ips=[API_SERVICE_IP, self.dispatcher_ip, self.link_ip, "127.0.0.1"])
        pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                  ["system:masters"])
        pki.service_account_keys()
        local = f"https://127.0.0.1:{API_PORT}"
        pki.kubeconfig(self.admin_kubeconfig, self.server, "admin",
                       pki.issue("admin", "kubernetes-admin", ["system:masters"]))
        for name, user in (("controller-manager", "system:kube-controller-manager"),
                           ("scheduler", "system:kube-scheduler")):
            pki.kubeconfig(self.kube_dir / f"{name}.conf", local, user,
                           pki.issue(name, user))
        # CoreDNS is the cluster's, on the dispatcher side like the rest: the admin group
        # spares an RBAC role for its list/watch of Services and EndpointSlices.
        pki.kubeconfig(self.kube_dir / "coredns.conf", local, "coredns",
                       pki.issue("coredns", "edgepipe:coredns", ["system:masters"]))
        return pki

    def _spawn(self, name: str, argv: list[str]) -> None:
        log_path = self.kube_dir / "logs" / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(self._nsenter(*argv), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        # nsenter execs the binary (no fork for a network namespace): this PID is it.
        self.record.add_process(proc.pid, records.process_start_time(proc.pid),
                                "dispatcher", f"kube:{name}")
        self.procs.append((name, proc))

    def start(self) -> None:
        for sub in ("logs", "etcd"):
            (self.kube_dir / sub).mkdir(parents=True, exist_ok=True)
        self._link()
        self.pki = pki = self._make_pki()
        bin_dir, p = kube_bin(), pki.dir
        etcd_client = f"http://127.0.0.1:{ETCD_CLIENT_PORT}"
        self._spawn("etcd", [
            str(bin_dir / "etcd"), "--name", "edgepipe",
            "--data-dir", str(self.kube_dir / "etcd"),
            "--listen-client-urls", etcd_client, "--advertise-client-urls", etcd_client,
            "--listen-peer-urls", f"http://127.0.0.1:{ETCD_PEER_PORT}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{ETCD_PEER_PORT}",
            "--initial-cluster", f"edgepipe=http://127.0.0.1:{ETCD_PEER_PORT}",
            "--quota-backend-bytes", str(512 << 20), "--unsafe-no-fsync",
            "--log-level", "warn"])
        self._spawn("kube-apiserver", [
            str(bin_dir / "kube-apiserver"), "--etcd-servers", etcd_client,
            "--bind-address", "0.0.0.0", "--secure-port", str(API_PORT),
            "--advertise-address", self.dispatcher_ip,
            "--service-cluster-ip-range", SERVICE_RANGE,
            "--client-ca-file", str(p / "ca.crt"),
            "--tls-cert-file", str(p / "apiserver.crt"),
            "--tls-private-key-file", str(p / "apiserver.key"),
            "--kubelet-client-certificate", str(p / "apiserver-kubelet-client.crt"),
            "--kubelet-client-key", str(p / "apiserver-kubelet-client.key"),
            "--kubelet-certificate-authority", str(p / "ca.crt"),
            "--kubelet-preferred-address-types", "InternalIP",
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", str(p / "sa.pub"),
            "--service-account-signing-key-file", str(p / "sa.key"),
            "--authorization-mode", "Node,RBAC",
            "--enable-admission-plugins", "NodeRestriction",
            "--allow-privileged=false", "--profiling=false",
            "--enable-priority-and-fairness=false",
            "--default-not-ready-toleration-seconds", str(self.tuning.toleration_s),
            "--default-unreachable-toleration-seconds", str(self.tuning.toleration_s),
            "--event-ttl", "30m", "-v", "1"])
        self.wait_api()
        monitor_period = "1s" if self.tuning.monitor_grace_s < 20 else "5s"
        self._spawn("kube-controller-manager", [
            str(bin_dir / "kube-controller-manager"),
            "--kubeconfig", str(self.kube_dir / "controller-manager.conf"),
            "--service-account-private-key-file", str(p / "sa.key"),
            "--root-ca-file", str(p / "ca.crt"),
            "--use-service-account-credentials=true",
            "--leader-elect=false", "--profiling=false", "--secure-port", "0",
            "--node-monitor-grace-period", f"{self.tuning.monitor_grace_s}s",
            "--node-monitor-period", monitor_period,
            "--concurrent-deployment-syncs", "2", "-v", "1"])
        self._spawn("kube-scheduler", [
            str(bin_dir / "kube-scheduler"),
            "--kubeconfig", str(self.kube_dir / "scheduler.conf"),
            "--leader-elect=false", "--profiling=false", "--secure-port", "0",
            "-v", "1"])
        corefile = self.kube_dir / "Corefile"
        # ttl 0: a new epoch's stage pod is found at once, not after a cached answer expires
        corefile.write_text(
            f".:53 {{\n    bind {self.dispatcher_ip}\n    errors\n"
            f"    kubernetes cluster.local {{\n"
            f"        kubeconfig {self.kube_dir / 'coredns.conf'} edgepipe\n"
            f"        ttl 0\n    }}\n}}\n")
        dns = coredns_bin()
        if not dns.is_file():
            raise ControlPlaneError(f"{dns} is missing: `make kube-bin`")
        self._spawn("coredns", [str(dns), "-conf", str(corefile)])

    def _context(self) -> ssl.SSLContext:
        assert self.pki is not None
        context = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        context.load_cert_chain(str(self.pki.dir / "admin.crt"), str(self.pki.dir / "admin.key"))
        return context

    def wait_api(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Until the API server says it is ready; the seconds it took."""
        started = time.monotonic()
        context = self._context()
        last = ""
        while time.monotonic() - started < timeout_s:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise ControlPlaneError(
                        f"{name} exited with {proc.returncode}: see "
                        f"{self.kube_dir / 'logs' / (name + '.log')}")
            try:
                with urllib.request.urlopen(f"{self.server}/readyz", context=context,
                                            timeout=5) as reply:
                    if reply.status == 200:
                        return time.monotonic() - started
            except OSError as exc:
                last = str(exc)
            time.sleep(0.5)
        raise ControlPlaneError(f"the API server was not ready after {timeout_s:.0f} s "
                                f"({last}): see {self.kube_dir / 'logs'}")

    def stop(self, timeout_s: float = 10.0) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()
