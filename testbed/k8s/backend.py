"""The controller's k3s backend: apply an epoch's manifests, watch Nodes and Pods, re-plan by
patching Deployments, and serve stage models to the init containers over HTTP.

Division of labour: what to deploy is testbed/k8s/manifests.py (manifests); when to re-plan and
what the
new plan is belongs to the k3s control loop (testbed/k8s/loop.py), which calls this backend
the way the embedded controller calls its agents. Here, every decision is a pure function of
Kubernetes client model objects (V1Node, V1Pod, V1Deployment, ...), unit-tested without a
cluster; the API calls in `K3sBackend` are thin wrappers around those decisions. No cluster can
run on the project's machines, so the class is exercised only in the lab VM (docs/lab.md).

Node health combines two signals. The API's Ready condition is authoritative but slow (the
node controller marks a node NotReady only after its grace period, 40-50 s); our own
heartbeats (sub-second) catch a crash at once. A node is dead when *either* says so, and alive
again only when both agree.
"""

from __future__ import annotations

import http.server
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

from testbed.k8s.manifests import (
    ANNOTATION_SPEC,
    LABEL_COMPONENT,
    LABEL_EPOCH,
    LABEL_NAME,
    LABEL_STAGE,
    NAME,
    K8sSettings,
    Manifest,
    StageModel,
    epoch_manifests,
)

log = logging.getLogger("edgepipe.k8s")

FIELD_MANAGER = "edgepipe-controller"
APPLY = "application/apply-patch+yaml"    # server-side apply: create or update, prune fields
STAGE_SELECTOR = f"{LABEL_NAME}={NAME},{LABEL_COMPONENT}=stage"


# --- pure decisions on Nodes ---------------------------------------------------------------

def node_ready(node: client.V1Node) -> bool:
    """The kubelet's Ready condition is True (Unknown = the node stopped reporting)."""
    for condition in (node.status.conditions if node.status else None) or []:
        if condition.type == "Ready":
            return condition.status == "True"
    return False


def node_usable(node: client.V1Node) -> bool:
    """Ready, not cordoned, and without a NoSchedule/NoExecute taint: our pods tolerate
    nothing, so a tainted node cannot take a stage (e.g. memory-pressure, unreachable)."""
    if not node_ready(node):
        return False
    if node.spec and node.spec.unschedulable:
        return False
    taints = (node.spec.taints if node.spec else None) or []
    return not any(t.effect in ("NoSchedule", "NoExecute") for t in taints)


def node_hostname(node: client.V1Node) -> str:
    """The value our nodeSelector matches (kubernetes.io/hostname), else the object name."""
    labels = node.metadata.labels or {}
    return labels.get("kubernetes.io/hostname", node.metadata.name)


@dataclass
class NodeHealth:
    """Combined API + heartbeat view of the nodes; feed it events, ask it who is alive."""

    heartbeat_timeout_s: float = 1.0
    api_usable: dict[str, bool] = field(default_factory=dict)
    last_heartbeat: dict[str, float] = field(default_factory=dict)

    def observe_node(self, node: client.V1Node) -> None:
        self.api_usable[node_hostname(node)] = node_usable(node)

    def forget_node(self, node: client.V1Node) -> None:
        self.api_usable.pop(node_hostname(node), None)

    def heartbeat(self, host: str, now: float) -> None:
        self.last_heartbeat[host] = now

    def alive(self, host: str, now: float) -> bool:
        if not self.api_usable.get(host, False):
            return False
        seen = self.last_heartbeat.get(host)
        # No heartbeat source on this host (yet): the API alone decides.
        return seen is None or now - seen <= self.heartbeat_timeout_s

    def alive_nodes(self, now: float) -> set[str]:
        return {host for host in self.api_usable if self.alive(host, now)}

    def dead_nodes(self, now: float) -> set[str]:
        return set(self.api_usable) - self.alive_nodes(now)


def node_event(event: Mapping[str, Any]) -> tuple[str, client.V1Node] | None:
    """(type, node) from a watch event on Nodes; None for bookmarks and errors."""
    kind = event.get("type")
    node = event.get("object")
    if kind in ("ADDED", "MODIFIED", "DELETED") and isinstance(node, client.V1Node):
        return kind, node
    return None


# --- pure decisions on Pods ----------------------------------------------------------------

@dataclass(frozen=True)
class StagePod:
    name: str
    stage: int
    epoch: int
    node: str | None
    phase: str
    ready: bool
    terminating: bool


def stage_pod(pod: client.V1Pod) -> StagePod | None:
    """What the controller needs to know about one of our stage pods (None: not ours)."""
    labels = pod.metadata.labels or {}
    if labels.get(LABEL_NAME) != NAME or labels.get(LABEL_COMPONENT) != "stage":
        return None
    try:
        stage, epoch = int(labels[LABEL_STAGE]), int(labels[LABEL_EPOCH])
    except (KeyError, ValueError):
        return None
    ready = any(c.type == "Ready" and c.status == "True"
                for c in ((pod.status.conditions if pod.status else None) or []))
    return StagePod(pod.metadata.name, stage, epoch, pod.spec.node_name if pod.spec else None,
                    (pod.status.phase if pod.status else None) or "Unknown", ready,
                    pod.metadata.deletion_timestamp is not None)


def epoch_ready(pods: Iterable[client.V1Pod], epoch: int, n_stages: int) -> bool:
    """Every stage of `epoch` has a Ready, non-terminating pod: the rollout is complete."""
    ready = {p.stage for p in map(stage_pod, pods)
             if p and p.epoch == epoch and p.ready and not p.terminating}
    return ready >= set(range(n_stages))


def pods_to_force_delete(pods: Iterable[client.V1Pod], dead_nodes: set[str]) -> list[str]:
    """Our pods on nodes we declared dead. The kubelet there cannot confirm their deletion,
    so they would stay Terminating for minutes; the controller deletes them with grace 0
    (it already moved their stage: the epoch change stops anyone sending to them)."""
    return sorted(p.name for p in map(stage_pod, pods)
                  if p and p.node in dead_nodes)


# --- pure decisions on Deployments and per-epoch objects -----------------------------------

@dataclass
class Rollout:
    """What to change in the cluster to go from what exists to a new epoch's manifests."""

    apply: list[Manifest] = field(default_factory=list)
    delete_deployments: list[str] = field(default_factory=list)
    delete_services: list[str] = field(default_factory=list)


def _labels(obj: Any) -> Mapping[str, str]:
    return (obj.metadata.labels if obj.metadata else None) or {}


def rollout_actions(existing: Iterable[client.V1Deployment], desired: Sequence[Manifest],
                    existing_services: Iterable[client.V1Service] = ()) -> Rollout:
    """Apply every desired object whose spec differs from the live one (Deployments compare
    by the spec digest annotation; everything else is applied, which is idempotent), delete
    stage Deployments and Services of stage slots the new plan no longer has."""
    live = {d.metadata.name: d for d in existing}
    wanted = {m["metadata"]["name"] for m in desired if m["kind"] == "Deployment"}
    rollout = Rollout()
    for manifest in desired:
        if manifest["kind"] == "Deployment":
            current = live.get(manifest["metadata"]["name"])
            digest = manifest["metadata"].get("annotations", {}).get(ANNOTATION_SPEC)
            current_digest = ((current.metadata.annotations or {}).get(ANNOTATION_SPEC)
                              if current else None)
            if current is not None and digest is not None and digest == current_digest:
                continue
        rollout.apply.append(manifest)
    for name, deployment in sorted(live.items()):
        labels = _labels(deployment)
        if labels.get(LABEL_NAME) == NAME and labels.get(LABEL_COMPONENT) == "stage" \
                and name not in wanted:
            rollout.delete_deployments.append(name)
    for service in existing_services:
        labels = _labels(service)
        if labels.get(LABEL_NAME) == NAME and labels.get(LABEL_COMPONENT) == "stage" \
                and service.metadata.name not in wanted:
            rollout.delete_services.append(service.metadata.name)
    return rollout


def latest_epoch(objects: Iterable[Any]) -> int:
    """The highest epoch label among our objects (0: none). A restarted controller numbers
    its first epoch after it: an epoch's ConfigMap and Secret are immutable, so a number is
    never used twice."""
    epochs = [0]
    for obj in objects:
        labels = _labels(obj)
        if labels.get(LABEL_NAME) == NAME and labels.get(LABEL_EPOCH, "").isdigit():
            epochs.append(int(labels[LABEL_EPOCH]))
    return max(epochs)


def stale_epoch_objects(objects: Iterable[Any], current_epoch: int, keep: int = 1) -> list[str]:
    """Names of per-epoch objects (ConfigMaps, Secrets) older than the `keep` epochs before
    `current_epoch`. The previous epoch is kept by default: its pods may still be
    terminating and must be able to read their config until they are gone."""
    stale = []
    for obj in objects:
        labels = _labels(obj)
        if labels.get(LABEL_NAME) != NAME or LABEL_EPOCH not in labels:
            continue
        try:
            epoch = int(labels[LABEL_EPOCH])
        except ValueError:
            continue
        if epoch < current_epoch - keep:
            stale.append(obj.metadata.name)
    return sorted(stale)


# --- the model server for init containers --------------------------------------------------

_MODEL_PATH = re.compile(r"^/models/([0-9a-f]{64})\.onnx$")


class ModelServer:
    """Serve stage models by SHA-256 over HTTP (GET /models/<sha256>.onnx, GET /healthz).
    Only registered files are served; names are content hashes, so a cache can never hold a
    wrong version under a right name. Integrity is checked by the client (fetch_model)."""

    def __init__(self, host: str = "0.0.0.0", port: int = 18080) -> None:
        self.files: dict[str, Path] = {}
        lock = threading.Lock()
        files = self.files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if self.path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                    return
                match = _MODEL_PATH.match(self.path)
                with lock:
                    path = files.get(match.group(1)) if match else None
                if path is None:
                    self._send(404, b"unknown model\n", "text/plain")
                    return
                size = path.stat().st_size
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                with open(path, "rb") as stream:
                    while chunk := stream.read(1 << 20):
                        self.wfile.write(chunk)

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("model server: " + fmt, *args)

        self._lock = lock
        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def register(self, models: Iterable[StageModel], directory: str | Path) -> None:
        with self._lock:
            for model in models:
                self.files[model.sha256] = Path(directory) / model.file

    def start(self) -> ModelServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="model-server",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --- the thin API layer --------------------------------------------------------------------

def load_api_client() -> client.ApiClient:
    """In a pod: the ServiceAccount token; elsewhere (the lab host): ~/.kube/config or
    KUBECONFIG (k3s writes /etc/rancher/k3s/k3s.yaml)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class K3sBackend:
    """Deploy epochs and watch the cluster. Every method is a few API calls around the pure
    functions above; errors propagate (the controller decides what to do)."""

    def __init__(self, settings: K8sSettings, api: client.ApiClient | None = None) -> None:
        self.settings = settings
        self.api = api or load_api_client()
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.rbac = client.RbacAuthorizationV1Api(self.api)
        self.networking = client.NetworkingV1Api(self.api)

    @property
    def namespace(self) -> str:
        return self.settings.namespace

    def apply(self, manifest: Manifest) -> Any:
        """Server-side apply: creates or updates, and removes fields we no longer set (a
        re-planned stage's old port, for instance), which a strategic merge would keep."""
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        opts = {"field_manager": FIELD_MANAGER, "force": True, "_content_type": APPLY}
        namespaced = {
            "Deployment": self.apps.patch_namespaced_deployment,
            "Service": self.core.patch_namespaced_service,
            "ConfigMap": self.core.patch_namespaced_config_map,
            "Secret": self.core.patch_namespaced_secret,
            "ServiceAccount": self.core.patch_namespaced_service_account,
            "Role": self.rbac.patch_namespaced_role,
            "RoleBinding": self.rbac.patch_namespaced_role_binding,
            "NetworkPolicy": self.networking.patch_namespaced_network_policy,
        }
        cluster = {
            "Namespace": self.core.patch_namespace,
            "ClusterRole": self.rbac.patch_cluster_role,
            "ClusterRoleBinding": self.rbac.patch_cluster_role_binding,
        }
        if kind in namespaced:
            return namespaced[kind](name, manifest["metadata"]["namespace"], manifest, **opts)
        if kind in cluster:
            return cluster[kind](name, manifest, **opts)
        raise ValueError(f"cannot apply a {kind}")

    def deploy_epoch(self, plan: Any, stages: Sequence[StageModel],
                     settings: K8sSettings) -> Rollout:
        """Roll out a new epoch (a re-plan or a model update): config and keys first, then
        the stage Deployments and Services, then remove stage slots the plan dropped.
        An epoch's ConfigMap and Secret are immutable: to retry the same epoch, pass the same
        `settings.curve_keys` (fresh keys would be a different Secret under the same name)."""
        self.settings = settings
        existing = self.apps.list_namespaced_deployment(
            self.namespace, label_selector=STAGE_SELECTOR).items
        services = self.core.list_namespaced_service(
            self.namespace, label_selector=STAGE_SELECTOR).items
        rollout = rollout_actions(existing, epoch_manifests(plan, stages, settings), services)
        for manifest in rollout.apply:
            self.apply(manifest)
        for name in rollout.delete_deployments:
            self.apps.delete_namespaced_deployment(name, self.namespace)
        for name in rollout.delete_services:
            self.core.delete_namespaced_service(name, self.namespace)
        return rollout

    def prune_epochs(self, current_epoch: int) -> list[str]:
        """Delete ConfigMaps and Secrets of epochs before the previous one."""
        selector = f"{LABEL_NAME}={NAME}"
        maps = self.core.list_namespaced_config_map(self.namespace, label_selector=selector)
        removed = []
        for name in stale_epoch_objects(maps.items, current_epoch):
            self.core.delete_namespaced_config_map(name, self.namespace)
            removed.append(name)
        # Secrets cannot be listed (the Role does not allow it): name them by epoch.
        for epoch in range(max(1, current_epoch - 10), current_epoch - 1):
            try:
                self.core.delete_namespaced_secret(f"{NAME}-e{epoch}-curve", self.namespace)
                removed.append(f"{NAME}-e{epoch}-curve")
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
        return removed

    def force_delete_pods_on(self, dead_nodes: set[str]) -> list[str]:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=STAGE_SELECTOR)
        names = pods_to_force_delete(pods.items, dead_nodes)
        for name in names:
            self.core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)
        return names

    def stage_pods(self) -> list[client.V1Pod]:
        return self.core.list_namespaced_pod(self.namespace,
                                             label_selector=STAGE_SELECTOR).items

    def nodes(self) -> list[client.V1Node]:
        return self.core.list_node().items

    def epoch_objects(self) -> list[Any]:
        """Our stage Deployments and per-epoch ConfigMaps: what `latest_epoch` reads."""
        selector = f"{LABEL_NAME}={NAME}"
        return [*self.apps.list_namespaced_deployment(self.namespace,
                                                      label_selector=STAGE_SELECTOR).items,
                *self.core.list_namespaced_config_map(self.namespace,
                                                      label_selector=selector).items]

    def watch_nodes(self, on_event: Callable[[str, client.V1Node], None],
                    stop: threading.Event, timeout_s: int = 30) -> None:
        """Call `on_event(type, node)` for every Node change until `stop` is set. Re-lists
        after each server timeout (and on 410 Gone), so no change is missed for long."""
        self._watch(self.core.list_node, {}, node_event, on_event, stop, timeout_s)

    def watch_pods(self, on_event: Callable[[str, client.V1Pod], None],
                   stop: threading.Event, timeout_s: int = 30) -> None:
        def pod_event(event: Mapping[str, Any]) -> tuple[str, client.V1Pod] | None:
            obj = event.get("object")
            if event.get("type") in ("ADDED", "MODIFIED", "DELETED") \
                    and isinstance(obj, client.V1Pod):
                return event["type"], obj
            return None
        self._watch(self.core.list_namespaced_pod,
                    {"namespace": self.namespace, "label_selector": STAGE_SELECTOR},
                    pod_event, on_event, stop, timeout_s)

    def _watch(self, list_fn: Callable[..., Any], kwargs: dict[str, Any],
               translate: Callable[[Mapping[str, Any]], Any],
               on_event: Callable[[str, Any], None], stop: threading.Event,
               timeout_s: int) -> None:
        while not stop.is_set():
            w = watch.Watch()
            try:
                for event in w.stream(list_fn, timeout_seconds=timeout_s, **kwargs):
                    if stop.is_set():
                        break
                    item = translate(event)
                    if item is not None:
                        on_event(*item)
            except client.ApiException as exc:
                if exc.status != 410:       # 410: resource version too old, re-list
                    raise
            finally:
                w.stop()
