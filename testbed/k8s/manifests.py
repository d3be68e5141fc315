"""Kubernetes manifests for a plan: pure functions, plan + stages + settings -> manifest dicts,
and `write_manifests()` for `run_scenario.py --backend k3s --dry-run --out DIR` (DIR/k8s/).

Division of labour: this module only *describes* a deployment. Talking to a cluster (apply,
watch, re-plan) is testbed/k8s/backend.py; what runs in the pods is stage_image (the worker,
the model fetcher of the init container); the plan comes from the partitioner.

How the embedded design maps onto Kubernetes (one to one, see docs/architecture.md):
- a stage on a host        -> a Deployment (1 replica) pinned with nodeSelector
                              kubernetes.io/hostname=<planned node>; CPU and memory requests =
                              limits = the host's budget in the topology (Guaranteed QoS, like
                              the embedded host's cgroups), checked against the plan's need
- the agent's model fetch  -> an init container (stage_image.fetch_model) that downloads the
                              stage model from the controller's HTTP model server into an
                              in-memory emptyDir and checks its SHA-256
- the worker's config file -> an immutable ConfigMap per epoch (one key per stage)
- the stage endpoint       -> a headless Service per stage (DNS names the pod IP directly:
                              ZeroMQ keeps long-lived connections, and a re-planned stage's new
                              pod is reached by re-resolving, without kube-proxy conntrack)
- the controller           -> a Deployment + Service with a ServiceAccount that may manage
                              this namespace's stage objects (Role) and only *read* Nodes
                              (ClusterRole: Nodes are cluster-scoped, so no Role can grant them);
                              what it starts from (settings, planner instance, first plan,
                              model hash) in a ConfigMap, the model file copied into its volume
- the agent's heartbeat    -> the stage worker's own `stage_heartbeat` to the controller
                              Service's control port (testbed/k8s/loop.py receives it)
- CurveZMQ keys            -> a Secret per epoch, one keypair per endpoint; each pod mounts
                              only its own secret key; public keys are in the ConfigMap
- the agent's allow-lists  -> each stage's config names the keys it admits frames from (its
                              upstream, testbed.control.auth.senders); the sink's list is
                              the control loop's (testbed.k8s.loop)
Labels carry the epoch and model version on everything that belongs to one deployment.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from formats.control import ControlSettings
from formats.errors import InputError
from partitioner.instance import Plan
from stage_image.security import generate_deployment_keys
from testbed.control.auth import senders

Manifest = dict[str, Any]

NAME = "edgepipe"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_STAGE = "edgepipe/stage"
LABEL_EPOCH = "edgepipe/epoch"
LABEL_VERSION = "edgepipe/model-version"
LABEL_NODE = "edgepipe/node"
ANNOTATION_SHA = "edgepipe/model-sha256"
ANNOTATION_SPEC = "edgepipe/spec-sha256"
HOSTNAME_LABEL = "kubernetes.io/hostname"

STAGE_UID = 65532         # the image's USER; the pod security context says the same
MODEL_DIR = "/models"
CONFIG_DIR = "/etc/edgepipe"
CURVE_DIR = "/etc/edgepipe/curve"
CONTROLLER_INPUT_DIR = "/etc/edgepipe/controller"
CONTROLLER_MODELS_DIR = "/var/lib/edgepipe/models"
MiB = 1024 * 1024
CONFIG_MAP_LIMIT = 1024 * 1024      # the API server refuses larger ConfigMaps


@dataclass(frozen=True)
class NodeResources:
    """A host's budget in the topology: CPU in cores, memory in bytes."""

    cpu: float
    memory_bytes: int


@dataclass(frozen=True)
class StageModel:
    """One entry of stages.json plus what the init container needs to fetch and check it."""

    file: str
    inputs: list[str]
    outputs: list[str]
    sha256: str
    size: int


def load_stage_models(split_dir: str | Path) -> list[StageModel]:
    """Read stages.json of a split directory and hash each stage file."""
    split_dir = Path(split_dir)
    entries = json.loads((split_dir / "stages.json").read_text())
    models = []
    for entry in entries:
        path = split_dir / entry["file"]
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
        models.append(StageModel(entry["file"], list(entry["inputs"]), list(entry["outputs"]),
                                 digest.hexdigest(), path.stat().st_size))
    return models


@dataclass(frozen=True)
class K8sSettings:
    """Everything about a Kubernetes deployment that is not in the plan."""

    nodes: Mapping[str, NodeResources]
    namespace: str = NAME
    epoch: int = 1
    model_version: int = 1
    image: str = "edgepipe-stage:latest"
    # `make image` builds it (testbed.emulation.images.CONTROLLER_TAG; a test keeps them equal).
    controller_image: str = "edgepipe-controller:latest"
    # In the lab the images are imported into k3s' containerd, never pulled.
    image_pull_policy: str = "IfNotPresent"
    controller_node: str | None = None          # the dispatcher host; None: anywhere
    controller_command: Sequence[str] | None = None
    controller_cpu: float = 0.5
    controller_memory_bytes: int = 1024 * MiB
    control_port: int = 18000
    model_port: int = 18080
    sink_port: int = 19000
    # The driver's commands (start the workload, status, results): reached through the API
    # server's pod port-forward only, so no Service exposes it (testbed/experiment/k3s_live.py).
    command_port: int = 18001
    data_port_base: int = 20000
    # What the worker needs besides its model (interpreter, onnxruntime, buffers): must fit
    # in the host's memory together with the plan's memory for the stage.
    runtime_memory_bytes: int = 96 * MiB
    curve: bool = True                          # on by default in the k3s backend
    # Admit only this namespace's pods to ours. Off for CNIs that would also block the
    # kubelet's probes (not verified on k3s' kube-router yet: docs/lab.md).
    network_policy: bool = True
    # Stage workers beat to the controller's control port this often (the control settings'
    # default); None: no heartbeats, node health from the API alone.
    heartbeat_ms: float | None = ControlSettings.heartbeat_ms
    curve_keys: Mapping[str, Any] | None = None  # name -> security.KeyPair; None: generate
    extra_labels: Mapping[str, str] = field(default_factory=dict)

    def data_port(self) -> int:
        # The embedded backend's rule (docs/architecture.md): a new epoch binds a new port,
        # so a sender still on the old epoch can never reach a new worker.
        return self.data_port_base + self.epoch % 20000


# --- small helpers -------------------------------------------------------------------------

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _check_dns_label(value: str, what: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise ValueError(f"{what} {value!r} is not a DNS label (lower case, digits, '-')")
    return value


def cpu_quantity(cores: float) -> str:
    """Cores as a Kubernetes quantity in millicores, never below 1m (the API's resolution)."""
    if not cores > 0 or math.isinf(cores):
        raise ValueError(f"CPU must be a positive number of cores, got {cores}")
    return f"{max(1, round(cores * 1000))}m"


def memory_quantity(nbytes: int) -> str:
    """Bytes as a quantity in whole MiB (Mi), rounded down: never more than the host has."""
    if nbytes < MiB:
        raise ValueError(f"memory must be at least 1 MiB, got {nbytes} bytes")
    return f"{nbytes // MiB}Mi"


def stage_name(index: int) -> str:
    return f"{NAME}-stage-{index}"


def config_map_name(epoch: int) -> str:
    return f"{NAME}-e{epoch}-stages"


def curve_secret_name(epoch: int) -> str:
    return f"{NAME}-e{epoch}-curve"


def controller_name() -> str:
    return f"{NAME}-controller"


def controller_secret_name() -> str:
    return f"{NAME}-controller-curve"


def service_host(name: str, namespace: str) -> str:
    return f"{name}.{namespace}.svc.cluster.local"


def base_labels(component: str, settings: K8sSettings) -> dict[str, str]:
    return {LABEL_NAME: NAME, LABEL_PART_OF: NAME, LABEL_COMPONENT: component,
            LABEL_MANAGED_BY: "edgepipe-controller", **settings.extra_labels}


def epoch_labels(settings: K8sSettings) -> dict[str, str]:
    return {LABEL_EPOCH: str(settings.epoch), LABEL_VERSION: str(settings.model_version)}


def _meta(name: str, settings: K8sSettings, labels: Mapping[str, str],
          annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": settings.namespace, "labels": dict(labels)}
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def _restricted_container_security() -> dict[str, Any]:
    # The Pod Security "restricted" profile, which the namespace enforces.
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def _pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": STAGE_UID, "runAsGroup": STAGE_UID,
            "fsGroup": STAGE_UID, "seccompProfile": {"type": "RuntimeDefault"}}


def _resources(cpu: float, memory_bytes: int) -> dict[str, Any]:
    # requests == limits: Guaranteed QoS, the scheduler reserves exactly the host budget the
    # plan assumed, and the pod is the last to be evicted under memory pressure.
    amount = {"cpu": cpu_quantity(cpu), "memory": memory_quantity(memory_bytes)}
    return {"requests": dict(amount), "limits": dict(amount)}


# --- the namespace and its access rights ---------------------------------------------------

def namespace_manifest(settings: K8sSettings) -> Manifest:
    _check_dns_label(settings.namespace, "namespace")
    labels = {**base_labels("namespace", settings),
              # Every pod we make meets the restricted profile; enforce it so nothing else does.
              "pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": settings.namespace, "labels": labels}}


# What the controller does in its namespace, and nothing else: no wildcards, no escalation.
CONTROLLER_RULES: list[dict[str, Any]] = [
    # Watch its stage pods; delete the ones stuck on a node it declared dead (force delete).
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "delete"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    # Re-plan and roll out: apply (server-side) and prune stage objects of old epochs.
    {"apiGroups": ["apps"], "resources": ["deployments"],
     "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
    {"apiGroups": [""], "resources": ["services", "configmaps"],
     "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
    # Per-epoch CurveZMQ keys. No list/watch: it only touches the Secrets it created.
    {"apiGroups": [""], "resources": ["secrets"],
     "verbs": ["get", "create", "patch", "update", "delete"]},
    # Control-plane decisions show up in `kubectl get events`.
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
]
# Nodes are cluster-scoped: a namespaced Role cannot grant them, so node health needs a
# ClusterRole. It is read-only and limited to nodes.
NODE_READER_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
]


def rbac_manifests(settings: K8sSettings) -> list[Manifest]:
    ns = settings.namespace
    labels = base_labels("controller", settings)
    account = controller_name()
    # Cluster-scoped objects are shared by all namespaces: the name carries the namespace.
    node_reader = f"{NAME}-node-reader-{ns}"
    subject = [{"kind": "ServiceAccount", "name": account, "namespace": ns}]
    stage_account = {"apiVersion": "v1", "kind": "ServiceAccount",
                     "metadata": _meta(f"{NAME}-stage", settings, base_labels("stage", settings)),
                     # Stage pods never talk to the API server: no token in them at all.
                     "automountServiceAccountToken": False}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": _meta(account, settings, labels)},
        stage_account,
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": _meta(account, settings, labels), "rules": CONTROLLER_RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": _meta(account, settings, labels),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
         "subjects": subject},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": node_reader, "labels": labels}, "rules": NODE_READER_RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": node_reader, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": node_reader},
         "subjects": subject},
    ]


def network_policy_manifest(settings: K8sSettings) -> Manifest:
    """Our pods accept connections only from pods of this namespace (stages, controller):
    the data and control ports are not for the rest of the cluster."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(f"{NAME}-same-namespace", settings, base_labels("policy", settings)),
            "spec": {"podSelector": {"matchLabels": {LABEL_NAME: NAME}},
                     "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {}}]}]}}


# --- per-epoch configuration ---------------------------------------------------------------

def endpoint_names(n_stages: int) -> list[str]:
    """CurveZMQ endpoints of a deployment: each stage and the controller (dispatcher+sink)."""
    return [endpoint_name(i) for i in range(n_stages)] + [endpoint_name(None)]


def endpoint_name(stage: int | None) -> str:
    """The endpoint of a stage, or (None) of the dispatcher and sink: the controller."""
    return "controller" if stage is None else f"stage-{stage}"


def sender_keys(plan: Plan, stage: int | None, public: Mapping[str, str]) -> list[str]:
    """The allow-list of `stage`'s worker (None: of the sink), the embedded backend's rule
    (testbed.control.auth.senders) over this epoch's endpoint keys."""
    return [public[endpoint_name(i)] for i in senders(plan, stage)]


def _curve_keys(settings: K8sSettings, n_stages: int) -> Mapping[str, Any]:
    if settings.curve_keys is not None:
        missing = set(endpoint_names(n_stages)) - set(settings.curve_keys)
        if missing:
            raise ValueError(f"curve_keys lacks {sorted(missing)}")
        return settings.curve_keys
    return generate_deployment_keys(endpoint_names(n_stages))


def stage_address(index: int, settings: K8sSettings) -> str:
    """Where stage `index` of the settings' epoch listens (its headless Service)."""
    return f"tcp://{service_host(stage_name(index), settings.namespace)}:{settings.data_port()}"


def stage_next_address(index: int, n_stages: int, settings: K8sSettings) -> str:
    if index + 1 < n_stages:
        return stage_address(index + 1, settings)
    return f"tcp://{service_host(controller_name(), settings.namespace)}:{settings.sink_port}"


def heartbeat_address(settings: K8sSettings) -> str:
    return f"tcp://{service_host(controller_name(), settings.namespace)}:{settings.control_port}"


def worker_config(index: int, plan: Plan, stages: Sequence[StageModel],
                  settings: K8sSettings, curve_public: Mapping[str, str] | None = None,
                  ) -> dict[str, Any]:
    """The worker's JSON config (stage_image.worker.WorkerConfig fields) for stage `index`;
    with CurveZMQ (`curve_public`: endpoint -> public key), the keys it admits frames from:
    its upstream only, as in the embedded backend."""
    stage, model = plan.stages[index], stages[index]
    config: dict[str, Any] = {
        "host": stage.node, "epoch": settings.epoch, "stage": index,
        "version": settings.model_version, "model": f"{MODEL_DIR}/stage.onnx",
        # Bind on all of the pod's addresses: its IP is not known when this is written.
        "bind": f"tcp://*:{settings.data_port()}",
        "next": stage_next_address(index, len(plan.stages), settings),
        "inputs": list(model.inputs), "outputs": list(model.outputs)}
    if settings.heartbeat_ms is not None:
        config["heartbeat"] = heartbeat_address(settings)
        config["heartbeat_ms"] = settings.heartbeat_ms
    if curve_public is not None:
        config["upstream"] = sender_keys(plan, index, curve_public)
        config["upstream_gate"] = True
    return config


def config_map_manifest(plan: Plan, stages: Sequence[StageModel], settings: K8sSettings,
                        curve_public: Mapping[str, str] | None) -> Manifest:
    data = {f"stage-{i}.json": json.dumps(worker_config(i, plan, stages, settings,
                                                        curve_public), indent=1)
            for i in range(len(plan.stages))}
    data["stages.json"] = json.dumps(
        [{"file": m.file, "inputs": m.inputs, "outputs": m.outputs, "sha256": m.sha256,
          "size": m.size, "node": s.node} for m, s in zip(stages, plan.stages)], indent=1)
    if curve_public is not None:
        data["curve-public.json"] = json.dumps(dict(curve_public), indent=1)
    labels = {**base_labels("config", settings), **epoch_labels(settings)}
    # Immutable: an epoch's config never changes; a new epoch gets a new ConfigMap, so a pod
    # can never see a half-updated config, and the API server need not watch it.
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(config_map_name(settings.epoch), settings, labels),
            "immutable": True, "data": data}


def curve_secret_manifest(keys: Mapping[str, Any], settings: K8sSettings) -> Manifest:
    labels = {**base_labels("curve-keys", settings), **epoch_labels(settings)}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(curve_secret_name(settings.epoch), settings, labels),
            "immutable": True,
            "stringData": {f"{name}.secret": pair.secret.decode() for name, pair in keys.items()}}


# --- stages --------------------------------------------------------------------------------

def stage_resources(index: int, plan: Plan, settings: K8sSettings) -> NodeResources:
    """The pod's budget: the planned host's CPU and memory. Refuses a plan whose stage needs
    more memory (model + runtime) than the host has: the pod would be OOM-killed forever."""
    node = plan.stages[index].node
    if node not in settings.nodes:
        raise ValueError(f"stage {index} is planned on {node!r}, which has no resources "
                         f"in the settings (known: {sorted(settings.nodes)})")
    budget = settings.nodes[node]
    if plan.cost is not None:
        need = plan.cost.memory_bytes[index] + settings.runtime_memory_bytes
        if need > budget.memory_bytes:
            raise ValueError(f"stage {index} needs {need // MiB} MiB on {node} "
                             f"(model + runtime), the host has {budget.memory_bytes // MiB} MiB")
    return budget


def _spec_digest(template: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]


def stage_deployment(index: int, plan: Plan, stages: Sequence[StageModel],
                     settings: K8sSettings) -> Manifest:
    stage, model = plan.stages[index], stages[index]
    budget = stage_resources(index, plan, settings)
    port = settings.data_port()
    selector = {LABEL_NAME: NAME, LABEL_COMPONENT: "stage", LABEL_STAGE: str(index)}
    labels = {**base_labels("stage", settings), **epoch_labels(settings),
              LABEL_STAGE: str(index), LABEL_NODE: stage.node}
    resources = _resources(budget.cpu, budget.memory_bytes)
    model_url = (f"http://{service_host(controller_name(), settings.namespace)}:"
                 f"{settings.model_port}/models/{model.sha256}.onnx")
    config_items = [{"key": f"stage-{index}.json", "path": "stage.json"}]
    volumes: list[dict[str, Any]] = [
        # In memory, like the embedded host's tmpfs: the cached model counts against the
        # pod's memory limit, as the planner's memory model assumes. Room for 1.25 copies.
        {"name": "models", "emptyDir": {"medium": "Memory",
                                        "sizeLimit": memory_quantity(
                                            max(MiB, model.size * 5 // 4 + MiB))}},
        {"name": "config", "configMap": {"name": config_map_name(settings.epoch),
                                         "items": config_items}},
    ]
    mounts = [{"name": "models", "mountPath": MODEL_DIR, "readOnly": True},
              {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    env = [{"name": "OMP_NUM_THREADS", "value": "1"}]
    if settings.curve:
        config_items.append({"key": "curve-public.json", "path": "curve-public.json"})
        # Each pod gets its own secret key only; 0440 + fsGroup: readable by the worker's
        # group, by no one else in the pod.
        volumes.append({"name": "curve", "secret": {
            "secretName": curve_secret_name(settings.epoch), "defaultMode": 0o440,
            "items": [{"key": f"stage-{index}.secret", "path": "own.secret"}]}})
        mounts.append({"name": "curve", "mountPath": CURVE_DIR, "readOnly": True})
        env.append({"name": "EDGEPIPE_CURVE_DIR", "value": CURVE_DIR})
    fetch = {
        "name": "fetch-model", "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python3", "-m", "stage_image.fetch_model", model_url, model.sha256,
                    f"{MODEL_DIR}/stage.onnx"],
        "volumeMounts": [{"name": "models", "mountPath": MODEL_DIR}],
        # Same budget as the worker: keeps the pod Guaranteed (every container must be).
        "resources": resources, "securityContext": _restricted_container_security(),
    }
    worker = {
        "name": "worker", "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python3", "-m", "stage_image.worker", f"{CONFIG_DIR}/stage.json"],
        "ports": [{"name": "data", "containerPort": port, "protocol": "TCP"}],
        "env": env, "resources": resources, "volumeMounts": mounts,
        # The PULL socket accepts TCP once the model is loaded and the socket bound.
        "readinessProbe": {"tcpSocket": {"port": "data"}, "periodSeconds": 2,
                           "failureThreshold": 2},
        "securityContext": _restricted_container_security(),
    }
    pod_spec = {
        "nodeSelector": {HOSTNAME_LABEL: stage.node},
        "serviceAccountName": f"{NAME}-stage",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # SIGTERM ends the worker's loop at once; no reason to wait 30 s on a re-plan.
        "terminationGracePeriodSeconds": 5,
        "securityContext": _pod_security(),
        "initContainers": [fetch], "containers": [worker], "volumes": volumes,
    }
    template = {"metadata": {"labels": labels, "annotations": {ANNOTATION_SHA: model.sha256}},
                "spec": pod_spec}
    annotations = {ANNOTATION_SHA: model.sha256, ANNOTATION_SPEC: _spec_digest(template)}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(stage_name(index), settings, labels, annotations),
        "spec": {
            "replicas": 1, "revisionHistoryLimit": 2,
            # The selector is immutable, so it names the stage slot, not the epoch.
            "selector": {"matchLabels": selector},
            # One pod per stage, sized to the whole host: a surge pod would not fit on the
            # node. maxUnavailable=1 replaces it without waiting for the old pod to be gone
            # (Recreate would wait forever for a pod on a dead node).
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": template,
        },
    }


def stage_service(index: int, settings: K8sSettings) -> Manifest:
    labels = {**base_labels("stage", settings), **epoch_labels(settings),
              LABEL_STAGE: str(index)}
    # The selector includes the epoch: a stage's name resolves only to the current epoch's pod.
    selector = {LABEL_NAME: NAME, LABEL_COMPONENT: "stage", LABEL_STAGE: str(index),
                LABEL_EPOCH: str(settings.epoch)}
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(stage_name(index), settings, labels),
            "spec": {"clusterIP": "None", "selector": selector,
                     "ports": [{"name": "data", "port": settings.data_port(),
                                "targetPort": "data", "protocol": "TCP"}]}}


# --- the controller ------------------------------------------------------------------------

# What a controller may be started from: every field but the per-epoch ones (the controller
# numbers the epochs and makes fresh keys for each) and how the controller itself is run.
_SETTINGS_NOT_IN_JSON = {"epoch", "curve_keys", "controller_command"}


def settings_to_json(settings: K8sSettings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(K8sSettings):
        if f.name in _SETTINGS_NOT_IN_JSON:
            continue
        value = getattr(settings, f.name)
        if f.name == "nodes":
            value = {name: {"cpu": r.cpu, "memory_bytes": r.memory_bytes}
                     for name, r in value.items()}
        elif f.name == "extra_labels":
            value = dict(value)
        out[f.name] = value
    return out


def settings_from_json(data: Any) -> K8sSettings:
    """The inverse of settings_to_json; ValueError names what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("settings must be a JSON object")
    known = {f.name for f in fields(K8sSettings)} - _SETTINGS_NOT_IN_JSON
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown settings fields {unknown}")
    nodes = data.get("nodes")
    if not isinstance(nodes, dict) or not nodes:
        raise ValueError("settings need nodes: {name: {cpu, memory_bytes}}")
    try:
        resources = {str(name): NodeResources(float(r["cpu"]), int(r["memory_bytes"]))
                     for name, r in nodes.items()}
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"settings.nodes: {exc}") from exc
    return K8sSettings(**{**data, "nodes": resources})


def controller_inputs_name() -> str:
    return f"{NAME}-controller-inputs"


_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class ControllerInputs:
    """What the controller starts from besides the settings: the planner instance (JSON),
    the first epoch's plan (plan.json; None: the controller solves), and the model file's
    name and SHA-256. The model itself is too large for a ConfigMap (1 MiB): it is copied
    into the controller's models volume, and the controller waits until a file of that
    hash is there (docs/lab.md)."""

    instance: Mapping[str, Any]
    model_sha256: str
    plan: Mapping[str, Any] | None = None
    model_file: str = "model.onnx"
    algorithm: str = "auto"
    time_limit_s: float = 2.0
    # The load generator's workload (testbed.control.dispatcher.Workload JSON, workload.json); None:
    # the controller runs no workload and opens no command port.
    workload: Mapping[str, Any] | None = None
    # The driver's CurveZMQ public key: the only client the command port admits.
    driver_public: str | None = None
    # The scenario's control settings (formats.control.ControlSettings JSON; {}: defaults).
    control: Mapping[str, Any] = field(default_factory=dict)

    def files(self, settings: K8sSettings) -> dict[str, str]:
        """The input directory's files (the ConfigMap's keys)."""
        if not _FILE_NAME.match(self.model_file):
            raise ValueError(f"model_file {self.model_file!r} must be a plain file name")
        if not re.fullmatch(r"[0-9a-f]{64}", self.model_sha256):
            raise ValueError("model_sha256 must be 64 hex digits")
        control: dict[str, Any] = {
            "model_file": self.model_file, "model_sha256": self.model_sha256,
            "algorithm": self.algorithm, "time_limit_s": self.time_limit_s}
        if self.driver_public is not None:
            if not re.fullmatch(r"[0-9A-Za-z.:+=^!/*?&<>()\[\]{}@%$#-]{40}", self.driver_public):
                raise ValueError("driver_public must be a 40-character Z85 CurveZMQ key")
            control["driver_public"] = self.driver_public
        if self.control:
            control["control"] = dict(self.control)
        out = {"settings.json": json.dumps(settings_to_json(settings), indent=1),
               "instance.json": json.dumps(dict(self.instance)),
               "controller.json": json.dumps(control, indent=1)}
        if self.plan is not None:
            out["plan.json"] = json.dumps(dict(self.plan), indent=1)
        if self.workload is not None:
            out["workload.json"] = json.dumps(dict(self.workload), indent=1)
        return out


def load_controller_inputs(directory: str | Path) -> tuple[K8sSettings, ControllerInputs]:
    """Read an input directory written from ControllerInputs.files (the mounted ConfigMap,
    or the same files on disk). ValueError or OSError names what is wrong."""
    directory = Path(directory)
    settings = settings_from_json(json.loads((directory / "settings.json").read_text()))
    control = json.loads((directory / "controller.json").read_text())
    required = {"model_file", "model_sha256", "algorithm", "time_limit_s"}
    if not isinstance(control, dict) or not required <= set(control) <= required | {
            "driver_public", "control"}:
        raise ValueError("controller.json needs exactly model_file, model_sha256, algorithm, "
                         "time_limit_s (and optionally driver_public, control)")
    try:
        settings_json = ControlSettings.from_json(control.get("control", {}),
                                                  "controller.json").to_json()
    except InputError as exc:
        raise ValueError(str(exc)) from exc
    plan_path = directory / "plan.json"
    workload_path = directory / "workload.json"
    inputs = ControllerInputs(
        instance=json.loads((directory / "instance.json").read_text()),
        model_sha256=control["model_sha256"],
        plan=json.loads(plan_path.read_text()) if plan_path.exists() else None,
        model_file=control["model_file"], algorithm=control["algorithm"],
        time_limit_s=float(control["time_limit_s"]),
        workload=json.loads(workload_path.read_text()) if workload_path.exists() else None,
        driver_public=control.get("driver_public"),
        control=settings_json if "control" in control else {})
    inputs.files(settings)          # the same checks as when they were written
    return settings, inputs


def controller_inputs_manifest(inputs: ControllerInputs, settings: K8sSettings) -> Manifest:
    data = inputs.files(settings)
    size = sum(len(k) + len(v.encode()) for k, v in data.items())
    if size > CONFIG_MAP_LIMIT:
        raise ValueError(f"the controller's inputs are {size} bytes, more than a ConfigMap "
                         f"holds ({CONFIG_MAP_LIMIT})")
    # Not immutable: a new run re-applies it, and the controller reads it once at start.
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(controller_inputs_name(), settings,
                              base_labels("controller", settings)),
            "data": data}


CONTROLLER_KEY_DIR = "/etc/edgepipe/controller-curve"


def controller_secret_manifest(keys: Any, settings: K8sSettings) -> Manifest:
    """The controller's own CurveZMQ keypair, for every epoch: the sink, the heartbeat
    receiver and the command port are CURVE servers with it. Made by the driver (which then
    knows the public key it talks to), mounted only into the controller's pod."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(controller_secret_name(), settings,
                              base_labels("controller", settings)),
            "stringData": {"controller.secret": keys.secret.decode()}}


def controller_manifests(settings: K8sSettings, inputs: ControllerInputs | None = None,
                         controller_keys: Any = None) -> list[Manifest]:
    """The controller's Deployment and Service, and its inputs ConfigMap when given (the
    Deployment mounts it either way: the pod starts once the ConfigMap exists). With
    CurveZMQ and `controller_keys` (a security.KeyPair), its Secret, mounted and passed as
    --keypair; without, the controller makes a keypair of its own."""
    name = controller_name()
    # No epoch labels: the controller outlives epochs (it is the one that changes them).
    labels = base_labels("controller", settings)
    selector = {LABEL_NAME: NAME, LABEL_COMPONENT: "controller"}
    keyed = settings.curve and controller_keys is not None
    command = list(settings.controller_command or [
        "python3", "-m", "testbed.k8s.loop", "--backend", "k3s",
        "--namespace", settings.namespace, "--models", CONTROLLER_MODELS_DIR,
        "--inputs", CONTROLLER_INPUT_DIR,
        *(["--keypair", f"{CONTROLLER_KEY_DIR}/controller.secret"] if keyed else [])])
    budget = NodeResources(settings.controller_cpu, settings.controller_memory_bytes)
    if settings.controller_node and settings.controller_node in settings.nodes:
        budget = settings.nodes[settings.controller_node]
    pod_spec: dict[str, Any] = {
        "serviceAccountName": name,
        "enableServiceLinks": False,
        "securityContext": _pod_security(),
        "containers": [{
            "name": "controller", "image": settings.controller_image,
            "imagePullPolicy": settings.image_pull_policy,
            "command": command,
            "ports": [{"name": "control", "containerPort": settings.control_port},
                      {"name": "models", "containerPort": settings.model_port},
                      {"name": "sink", "containerPort": settings.sink_port},
                      {"name": "command", "containerPort": settings.command_port}],
            "resources": _resources(budget.cpu, budget.memory_bytes),
            "volumeMounts": [{"name": "models", "mountPath": CONTROLLER_MODELS_DIR},
                             {"name": "inputs", "mountPath": CONTROLLER_INPUT_DIR,
                              "readOnly": True},
                             {"name": "tmp", "mountPath": "/tmp"}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "models"},
                               "periodSeconds": 2},
            "securityContext": _restricted_container_security(),
        }],
        # The root filesystem is read-only: the model, its split stages, scratch files here.
        "volumes": [{"name": "models", "emptyDir": {}},
                    {"name": "inputs", "configMap": {"name": controller_inputs_name()}},
                    {"name": "tmp", "emptyDir": {}}],
    }
    if settings.controller_node:
        pod_spec["nodeSelector"] = {HOSTNAME_LABEL: settings.controller_node}
    secret = []
    if keyed:
        secret = [controller_secret_manifest(controller_keys, settings)]
        pod_spec["volumes"].append({"name": "curve", "secret": {
            "secretName": controller_secret_name(), "defaultMode": 0o440}})
        pod_spec["containers"][0]["volumeMounts"].append(
            {"name": "curve", "mountPath": CONTROLLER_KEY_DIR, "readOnly": True})
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(name, settings, labels),
        "spec": {"replicas": 1, "selector": {"matchLabels": selector},
                 # Exactly one controller at any time: it owns the epochs.
                 "strategy": {"type": "Recreate"},
                 "template": {"metadata": {"labels": {**labels, **selector}},
                              "spec": pod_spec}},
    }
    # Headless like the stages' (one pod; its name resolves to the pod's IP): no Service
    # proxy is needed, so it works on clusters without kube-proxy (the emulated one).
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(name, settings, labels),
        "spec": {"clusterIP": "None", "selector": selector,
                 "ports": [{"name": "control", "port": settings.control_port,
                            "targetPort": "control"},
                           {"name": "models", "port": settings.model_port,
                            "targetPort": "models"},
                           {"name": "sink", "port": settings.sink_port, "targetPort": "sink"}]},
    }
    config = [controller_inputs_manifest(inputs, settings)] if inputs is not None else []
    return [*secret, *config, deployment, service]


# --- all of it -----------------------------------------------------------------------------

def _check_inputs(plan: Plan, stages: Sequence[StageModel]) -> None:
    if len(plan.stages) != len(stages):
        raise ValueError(f"the plan has {len(plan.stages)} stages, the split has {len(stages)}")
    nodes = [s.node for s in plan.stages]
    if len(set(nodes)) != len(nodes):
        raise ValueError("a node holds more than one stage")
    for node in nodes:
        _check_dns_label(node, "node name")
    for model in stages:
        if not re.fullmatch(r"[0-9a-f]{64}", model.sha256):
            raise ValueError(f"{model.file}: sha256 must be 64 hex digits")


def epoch_manifests(plan: Plan, stages: Sequence[StageModel],
                    settings: K8sSettings) -> list[Manifest]:
    """What changes with every epoch: config, keys, stage Deployments and Services."""
    _check_inputs(plan, stages)
    out: list[Manifest] = []
    keys = _curve_keys(settings, len(plan.stages)) if settings.curve else None
    public = {name: pair.public.decode() for name, pair in keys.items()} if keys else None
    out.append(config_map_manifest(plan, stages, settings, public))
    if keys is not None:
        out.append(curve_secret_manifest(keys, settings))
    for i in range(len(plan.stages)):
        out.append(stage_deployment(i, plan, stages, settings))
        out.append(stage_service(i, settings))
    return out


def manifests(plan: Plan, stages: Sequence[StageModel], settings: K8sSettings,
              inputs: ControllerInputs | None = None) -> list[Manifest]:
    """Every object of a deployment, in apply order."""
    policy = [network_policy_manifest(settings)] if settings.network_policy else []
    controller_keys = None
    if settings.curve:
        # one controller keypair for its Secret and for this epoch's public keys
        settings = replace(settings, curve_keys=_curve_keys(settings, len(plan.stages)))
        assert settings.curve_keys is not None
        controller_keys = settings.curve_keys["controller"]
    return [namespace_manifest(settings), *rbac_manifests(settings), *policy,
            *controller_manifests(settings, inputs, controller_keys),
            *epoch_manifests(plan, stages, settings)]


def _file_for(manifest: Manifest) -> str:
    kind = manifest["kind"]
    name = manifest["metadata"]["name"]
    if kind == "Namespace":
        return "00-namespace.yaml"
    if kind in ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"):
        return "01-rbac.yaml"
    if kind == "NetworkPolicy":
        return "02-network-policy.yaml"
    if name in (controller_inputs_name(), controller_secret_name()):
        return "10-controller.yaml"
    if kind in ("ConfigMap",):
        return "03-config.yaml"
    if kind == "Secret":
        return "04-curve-secret.yaml"
    if name == controller_name():
        return "10-controller.yaml"
    match = re.fullmatch(rf"{NAME}-stage-(\d+)", name)
    if match:
        return f"20-stage-{int(match.group(1)):02d}.yaml"
    return "90-other.yaml"


def write_manifests(plan: Plan, stages: Sequence[StageModel], settings: K8sSettings,
                    out_dir: str | Path, inputs: ControllerInputs | None = None) -> list[Path]:
    """Write every manifest to OUT_DIR/k8s/*.yaml (files sorted in apply order, several
    documents per file); `kubectl apply -f OUT_DIR/k8s/` deploys them. Returns the files."""
    target = Path(out_dir) / "k8s"
    target.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Manifest]] = {}
    for manifest in manifests(plan, stages, settings, inputs):
        groups.setdefault(_file_for(manifest), []).append(manifest)
    written = []
    for filename in sorted(groups):
        path = target / filename
        text = yaml.safe_dump_all(groups[filename], sort_keys=False, default_flow_style=False)
        if any(m["kind"] == "Secret" for m in groups[filename]):
            # Holds secret keys: owner-only, created with that mode (no window of 0644).
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(text)
            os.chmod(path, 0o600)
        else:
            path.write_text(text)
        written.append(path)
    return written


def resources_from_topology(hosts: Mapping[str, Any]) -> dict[str, NodeResources]:
    """NodeResources from topology hosts (objects with `cpu` in cores and `memory_bytes`,
    or dicts with those keys)."""
    out = {}
    for name, host in hosts.items():
        get = host.get if isinstance(host, Mapping) else lambda k, h=host: getattr(h, k)
        out[name] = NodeResources(float(get("cpu")), int(get("memory_bytes")))
    return out


def settings_for_topology(topology: Any, **overrides: Any) -> K8sSettings:
    """K8sSettings for a formats.topology.Topology: every host's budget, the controller on
    the dispatcher host. `overrides` sets any other field (epoch, model_version, image...)."""
    dispatcher = next((h.name for h in topology.hosts.values() if h.role == "dispatcher"), None)
    fields: dict[str, Any] = {"nodes": resources_from_topology(topology.hosts),
                              "controller_node": dispatcher}
    fields.update(overrides)
    return K8sSettings(**fields)
