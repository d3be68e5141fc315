"""`run_scenario.py SCENARIO --backend k3s [--kubeconfig PATH]`: the scenario on a cluster.

Division of labour: the driver is the experimenter here too. It checks what it can before
touching the cluster (the steps k3s can do from outside, the API reachable, the planned
nodes present), prepares the plan and the deployment's description
(testbed.experiment.k3s_dry_run), and
applies only the cluster set-up and the controller (namespace, RBAC, network policy, the
controller's Secret, inputs, Deployment, Service); the controller in its pod makes every
epoch itself (testbed.k8s.loop) and hosts the load generator + sink
(testbed.k8s.workload). The driver talks to it on its command port through the API
server's pod port-forward (`kubernetes.stream.portforward`; a local TCP relay, so the
ZeroMQ client works unchanged): no Service or NodePort exposes the port, the API server's
authentication and TLS guard the way in, and CurveZMQ (the driver's own keypair, the only
one the port admits) the commands. Over it: the model upload, status, start, stop and the
results (requests.csv, events.jsonl). Faults from the timeline act through the API:
  node.crash    its stage pods deleted with grace 0 and the node tainted
                edgepipe/crashed:NoExecute (nothing of ours runs there, as after a crash);
                healed by removing the taint
  node.restart  its stage pods deleted with grace 0 (their Deployments recreate them there)
The rest needs the nodes themselves (freezing, cgroups, links, disks) or a model repository
in the controller: refused with exit 2 before anything is applied. At the end the results
are written as for the embedded backend (testbed.experiment.run.write_results) and the namespace and
the cluster-wide RBAC are deleted (`--keep` leaves them).
"""

from __future__ import annotations

import base64
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config

from formats.errors import InputError
from formats.scenario import Scenario
from testbed.experiment.prepare import log
from testbed.k8s import manifests as k8s
from testbed.k8s.backend import STAGE_SELECTOR, K3sBackend, node_hostname, pods_to_force_delete
from testbed.k8s.workload import MODEL_CHUNK

CRASH_TAINT = "edgepipe/crashed"
K3S_FAULTS = ("node.crash", "node.restart")
POD_TIMEOUT_S = 300.0          # images are imported, not pulled: minutes would mean trouble
READY_TIMEOUT_S = 600.0
API_TIMEOUT_S = 10.0
CONTROLLER_SELECTOR = f"{k8s.LABEL_NAME}={k8s.NAME},{k8s.LABEL_COMPONENT}=controller"


@dataclass(frozen=True)
class BuiltCluster:
    """A cluster the driver built for this run (`--cluster emulated`,
    testbed.experiment.k8s_cluster): its faults act on the nodes themselves (`net`, the
    emulated network of node containers: every action in `actions`), the settings it needs
    (`settings`: e.g. images imported, never pulled) and what summary.json says of it."""

    net: Any
    actions: tuple[str, ...]
    settings: dict[str, Any]
    summary: dict[str, Any]


def check_steps(scenario: Scenario, allowed: tuple[str, ...] = K3S_FAULTS) -> None:
    """Refuse, before the cluster is touched, steps the k3s backend cannot do from outside."""
    for step in scenario.steps:
        if step.action not in allowed:
            raise InputError(
                f"{step.action} is not supported by the k3s backend (it acts through the API "
                f"only: {', '.join(allowed)}); run this scenario with --backend embedded",
                file=scenario.path, line=step.line, field="action")


def connect(kubeconfig: str | None) -> client.ApiClient:
    """An API client for the kubeconfig (--kubeconfig, else $KUBECONFIG), checked by one
    call; InputError (exit 2) when there is none or the API does not answer."""
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if not path:
        raise InputError("the k3s backend needs a cluster: --kubeconfig PATH or $KUBECONFIG "
                         "(docs/lab.md); without one, --dry-run writes the manifests")
    configuration = client.Configuration()
    try:
        config.load_kube_config(config_file=path, client_configuration=configuration)
    except (config.ConfigException, OSError, ValueError, TypeError) as exc:
        raise InputError(f"cannot use this kubeconfig: {exc}", file=path) from exc
    configuration.retries = 0      # an unreachable API fails now, not after urllib3's retries
    api = client.ApiClient(configuration)
    try:
        client.VersionApi(api).get_code(_request_timeout=API_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - connection refused, TLS, auth, timeouts...
        api.close()
        raise InputError(f"no Kubernetes API reachable at {configuration.host}: "
                         f"{type(exc).__name__}: {str(exc)[:300]}", file=path) from exc
    return api


def check_nodes(api: client.ApiClient, scenario: Scenario) -> None:
    """Every host of the topology must be a node (by kubernetes.io/hostname, what the
    nodeSelectors match)."""
    nodes = {node_hostname(n) for n in client.CoreV1Api(api).list_node(
        _request_timeout=API_TIMEOUT_S).items}
    missing = sorted(set(scenario.topology.hosts) - nodes)
    if missing:
        raise InputError(f"hosts {missing} of the topology are not nodes of the cluster "
                         f"(nodes: {sorted(nodes)})", file=scenario.topology.path,
                         field="hosts")


# -- faults through the API -------------------------------------------------------------------

class ClusterFaults:
    """The `net` of testbed.experiment.faults.FaultTimeline for the k3s backend: the node operations
    the API can do (module docstring)."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.core = client.CoreV1Api(api)
        self.namespace = namespace

    def kill_host(self, host: str) -> list[str]:
        pods = self.core.list_namespaced_pod(self.namespace,
                                             label_selector=STAGE_SELECTOR).items
        names = pods_to_force_delete(pods, {host})
        for name in names:
            self.core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)
        return names

    def crash_host(self, host: str) -> list[str]:
        # the taint first: the Deployments' new pods must not land there again
        self._set_taint(host, True)
        return self.kill_host(host)

    def host_up(self, host: str) -> None:
        self._set_taint(host, False)

    def _set_taint(self, host: str, present: bool) -> None:
        node = self.core.read_node(host)
        taints = [t for t in (node.spec.taints or []) if t.key != CRASH_TAINT]
        if present:
            taints.append(client.V1Taint(key=CRASH_TAINT, value="true", effect="NoExecute"))
        body = {"spec": {"taints": [client.ApiClient().sanitize_for_serialization(t)
                                    for t in taints]}}
        self.core.patch_node(host, body)


# -- the command port through the API server --------------------------------------------------

Connector = Callable[[], Any]        # a connected socket-like object (send, recv, fileno)


def portforward_connector(api: client.ApiClient, namespace: str, pod: str,
                          port: int) -> Connector:
    """A new port-forward (one websocket through the API server) per connection."""
    from kubernetes.stream import portforward

    core = client.CoreV1Api(api)

    def connect() -> Any:
        forward = portforward(core.connect_get_namespaced_pod_portforward, pod, namespace,
                              ports=str(port))
        return forward.socket(port)
    return connect


class Relay:
    """A TCP listener on 127.0.0.1 whose every connection is spliced onto a new connection
    from `connect` (the pod's port through the API server): ZeroMQ connects to `address` as
    to any TCP endpoint, and reconnects through a new port-forward when one breaks."""

    def __init__(self, connect: Connector, host: str = "127.0.0.1") -> None:
        self.connect = connect
        self.listener = socket.create_server((host, 0))
        self.address = f"tcp://{host}:{self.listener.getsockname()[1]}"
        self.closed = threading.Event()
        self.errors: list[str] = []
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                local, _ = self.listener.accept()
            except OSError:
                return
            try:
                remote = self.connect()
            except Exception as exc:  # noqa: BLE001 - the API refused the port-forward
                self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                local.close()
                continue
            threading.Thread(target=self._splice, args=(local, remote), daemon=True).start()

    def _splice(self, local: socket.socket, remote: Any) -> None:
        peers = {local.fileno(): (local, remote), remote.fileno(): (remote, local)}
        try:
            while not self.closed.is_set():
                ready, _, _ = select.select(list(peers), [], [], 0.2)
                for fd in ready:
                    source, sink = peers[fd]
                    data = source.recv(1 << 16)
                    if not data:
                        return
                    sink.sendall(data)
        except OSError:
            return
        finally:
            local.close()
            remote.close()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()


# -- the run ----------------------------------------------------------------------------------

class Deployment:
    """What the driver applied, so that it can take it away again."""

    def __init__(self, api: client.ApiClient, settings: k8s.K8sSettings) -> None:
        self.backend = K3sBackend(settings, api=api)
        self.core = client.CoreV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.namespace = settings.namespace
        self.applied: list[tuple[str, str]] = []        # (kind, name)

    def apply(self, manifests: list[k8s.Manifest]) -> None:
        """The cluster set-up and the controller; the epochs are the controller's."""
        for manifest in manifests:
            if k8s.LABEL_EPOCH in manifest["metadata"].get("labels", {}):
                continue
            self.applied.append((manifest["kind"], manifest["metadata"]["name"]))
            self.backend.apply(manifest)
            log(f"applied {manifest['kind']} {manifest['metadata']['name']}")

    def controller_pod(self, timeout_s: float = POD_TIMEOUT_S) -> str:
        """The controller pod's name once it runs and is ready (its model server answers)."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            for pod in self.core.list_namespaced_pod(
                    self.namespace, label_selector=CONTROLLER_SELECTOR).items:
                ready = any(c.type == "Ready" and c.status == "True"
                            for c in (pod.status.conditions or []))
                if pod.metadata.deletion_timestamp is None and ready:
                    return pod.metadata.name
                state = f"{pod.metadata.name}: {pod.status.phase}"
                if state != last:
                    log(f"controller pod {state}")
                    last = state
            time.sleep(1.0)
        raise RuntimeError(f"the controller pod was not ready after {timeout_s:.0f} s "
                           f"(kubectl -n {self.namespace} describe pod -l "
                           f"{CONTROLLER_SELECTOR})")

    def pod_check(self, pod: str, every_s: float = 2.0) -> Callable[[str], None]:
        """For testbed.experiment.run.wait_ready / run_workload: raise when the controller pod is
        gone
        or its container restarted (its state, the workload with it, would be lost)."""
        checked = [0.0]

        def check(phase: str) -> None:
            if time.monotonic() - checked[0] < every_s:
                return
            checked[0] = time.monotonic()
            try:
                found = self.core.read_namespaced_pod(pod, self.namespace)
            except client.ApiException as exc:
                if exc.status == 404:
                    raise RuntimeError(f"the controller pod {pod} is gone {phase}") from exc
                return                  # the API is busy: judge at the next check
            restarts = sum(s.restart_count for s in (found.status.container_statuses or []))
            if found.status.phase in ("Failed", "Succeeded") or restarts:
                raise RuntimeError(f"the controller pod {pod} stopped {phase} "
                                   f"(phase {found.status.phase}, restarts {restarts}): "
                                   f"kubectl -n {self.namespace} logs {pod}")
        return check

    def teardown(self, wait_s: float = 120.0) -> None:
        """Delete the namespace (everything in it, the epochs too) and our cluster-wide RBAC;
        wait until the namespace is gone, so that the next run can create it again."""
        for kind, name in self.applied:
            try:
                if kind == "ClusterRoleBinding":
                    self.rbac.delete_cluster_role_binding(name)
                elif kind == "ClusterRole":
                    self.rbac.delete_cluster_role(name)
            except client.ApiException as exc:
                if exc.status != 404:
                    log(f"teardown: cannot delete {kind} {name}: {exc.reason}")
        if not any(kind == "Namespace" for kind, _ in self.applied):
            return
        try:
            self.core.delete_namespace(self.namespace)
        except client.ApiException as exc:
            if exc.status != 404:
                log(f"teardown: cannot delete namespace {self.namespace}: {exc.reason}")
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                self.core.read_namespace(self.namespace)
            except client.ApiException as exc:
                if exc.status == 404:
                    log(f"namespace {self.namespace} deleted")
                    return
            time.sleep(1.0)
        log(f"teardown: namespace {self.namespace} still terminating after {wait_s:.0f} s")


def upload_model(call: Callable[..., dict[str, Any] | None], model: Path) -> None:
    """Send the model over the command port in order; the controller checks its hash."""
    total = model.stat().st_size
    offset = 0
    with open(model, "rb") as stream:
        while offset < total:
            chunk = stream.read(MODEL_CHUNK)
            reply = call("put_model", chunk, offset=offset, total=total)
            if reply is None:
                raise RuntimeError("the controller did not answer the model upload")
            if not reply.get("ok"):
                raise RuntimeError(f"the controller refused the model: {reply.get('error')}")
            offset += len(chunk)
    log(f"model uploaded ({total} bytes)")


def fetch_file(call: Callable[..., dict[str, Any] | None], name: str, target: Path) -> int:
    """Copy a results file of the controller's to `target`; its size."""
    offset, parts = 0, []
    while True:
        reply = call("fetch", file=name, offset=offset)
        if reply is None or not reply.get("ok"):
            raise RuntimeError(f"cannot fetch {name}: {reply and reply.get('error')}")
        data = base64.b64decode(reply["data"], validate=True)
        if reply.get("next") != offset + len(data):
            raise RuntimeError(f"fetch {name}: a reply out of order")
        parts.append(data)
        offset += len(data)
        if reply.get("eof"):
            break
    target.write_bytes(b"".join(parts))
    return offset


def run_k3s(scenario: Scenario, out_dir: Path, kubeconfig: str | None, keep: bool = False,
            connector: Callable[[client.ApiClient, str, str, int], Connector] | None = None,
            cluster: BuiltCluster | None = None) -> int:
    """The scenario on a cluster (module docstring). `connector` makes the way to the
    controller's command port (default: the API server's port-forward); `cluster` is the one
    the driver built, if it did."""
    from testbed.experiment.faults import FaultTimeline, Hooks
    from testbed.experiment.k3s_dry_run import make_bundle
    from testbed.experiment.prepare import prepare
    from testbed.experiment.run import ControlClient, run_workload, wait_ready, write_results

    check_steps(scenario, cluster.actions if cluster else K3S_FAULTS)
    api = connect(kubeconfig)
    check_nodes(api, scenario)
    prepared = prepare(scenario, out_dir)
    bundle = make_bundle(scenario, prepared, out_dir, **(cluster.settings if cluster else {}))
    deployment = Deployment(api, bundle.settings)
    curve = ((bundle.driver_keys, bundle.controller_public)
             if bundle.driver_keys is not None and bundle.controller_public else None)
    relay: Relay | None = None
    clients: list[ControlClient] = []
    timeline: FaultTimeline | None = None
    try:
        deployment.apply(bundle.manifests(prepared.plan))
        pod = deployment.controller_pod()
        log(f"controller pod {pod} ready; its command port through the API server")
        relay = Relay((connector or portforward_connector)(
            api, bundle.settings.namespace, pod, bundle.settings.command_port))
        client_, step_client = (ControlClient(relay.address, 10000, curve),
                                ControlClient(relay.address, 10000, curve))
        clients += [client_, step_client]
        check = deployment.pod_check(pod)
        upload_model(client_.call, prepared.model_path)
        # a crash's heal starts nothing: the kubelet and the Deployments do that (a built
        # cluster's node boots its kubelet when its container starts again)
        timeline = FaultTimeline(scenario.steps,
                                 cluster.net if cluster else ClusterFaults(
                                     api, bundle.settings.namespace),
                                 Hooks(restart_host=lambda _host: None,
                                       controller=step_client.call))
        wait_ready(client_, check, READY_TIMEOUT_S)
        log(f"running {scenario.workload.mode} workload: {scenario.workload.warmup_s:g}s "
            f"warm-up + {scenario.workload.duration_s:g}s measured")
        window_start, status = run_workload(scenario, client_, check, timeline)
        client_.call("stop")
        for name in ("requests.csv", "events.jsonl"):
            size = fetch_file(client_.call, name, out_dir / name)
            log(f"fetched {name} ({size} bytes)")
    except client.ApiException as exc:
        raise RuntimeError(f"the Kubernetes API refused: {exc.status} {exc.reason}: "
                           f"{str(exc.body)[:300]}") from exc
    except urllib3.exceptions.HTTPError as exc:
        raise RuntimeError(f"the Kubernetes API went away: {exc}") from exc
    finally:
        if timeline is not None:
            timeline.heal_all()
        for each in clients:
            each.close()
        if relay is not None:
            relay.close()
        if keep:
            log(f"--keep: namespace {bundle.settings.namespace} left on the cluster")
        else:
            deployment.teardown()
        api.close()
    assert timeline is not None
    summary = write_results(scenario, "k3s", out_dir, timeline.events, window_start,
                            prepared.predicted_rps, int(status.get("duplicates", 0)),
                            {"plan": bundle.plan_json,
                             "cluster": {"namespace": bundle.settings.namespace,
                                         "controller_pod": pod,
                                         **(cluster.summary if cluster else {})}})
    return 0 if summary["slo"]["passed"] else 1
