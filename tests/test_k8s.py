"""Kubernetes manifests and the k3s backend's decisions, offline.

Every generated manifest is validated with kubernetes-validate (official schemas, strict:
unknown fields are errors) against Kubernetes 1.30 and the newest version the package knows,
and parsed into the official client's model classes. The backend's decisions are tested on
real client model objects, and its thin API layer against a fake API server on loopback."""

from __future__ import annotations

import http.server
import json
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes import client
from kubernetes_validate import utils as kv_utils

from partitioner.instance import Instance, Node, Plan, Segment, Stage
from stage_image import fetch_model
from testbed.k8s import manifests as k8s
from testbed.k8s.backend import (
    K3sBackend,
    ModelServer,
    NodeHealth,
    epoch_ready,
    node_ready,
    node_usable,
    pods_to_force_delete,
    rollout_actions,
    stale_epoch_objects,
)
from testbed.k8s.manifests import K8sSettings, NodeResources, StageModel

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
NEWEST = max(set(kv_utils.all_versions()), key=lambda v: tuple(int(x) for x in v.split(".")))
VERSIONS = ["1.30.0", NEWEST]

TOPOLOGY = {"edge1": NodeResources(0.1, 256 * MiB), "edge2": NodeResources(0.05, 128 * MiB),
            "edge3": NodeResources(0.5, 512 * MiB), "dispatcher": NodeResources(0.5, 1024 * MiB)}


def instance() -> Instance:
    segments = [Segment(10.0, 8 * MiB, 100_000), Segment(20.0, 16 * MiB, 50_000),
                Segment(5.0, 4 * MiB, 4_000)]
    nodes = [Node(n, r.cpu, r.memory_bytes - 96 * MiB) for n, r in TOPOLOGY.items()
             if n != "dispatcher"]
    bandwidth = {(a, b): 100.0 for a in TOPOLOGY for b in TOPOLOGY if a < b}
    return Instance(segments, 600_000, nodes, "dispatcher", bandwidth)


def plan(stages: list[Stage]) -> Plan:
    return Plan.of(instance(), stages, "optimal", True)


def models(n: int) -> list[StageModel]:
    return [StageModel(f"stage_{i:02d}.onnx", [f"t{i}"], [f"t{i + 1}"], f"{i:x}" * 64,
                       1_000_000 + i) for i in range(n)]


PLAN_A = [Stage(0, 2, "edge1"), Stage(2, 3, "edge3")]
PLAN_B = [Stage(0, 1, "edge3"), Stage(1, 2, "edge1"), Stage(2, 3, "edge2")]


def settings(epoch: int = 1, **kw: Any) -> K8sSettings:
    return K8sSettings(nodes=TOPOLOGY, epoch=epoch, controller_node="dispatcher", **kw)


@pytest.fixture(scope="module")
def all_manifests() -> list[dict[str, Any]]:
    return k8s.manifests(plan(PLAN_A), models(2), settings())


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def epoch_secrets(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in by_kind(manifests, "Secret")
            if m["metadata"]["name"] != k8s.controller_secret_name()]


# --- schema and client models --------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(all_manifests, version: str) -> None:
    for manifest in all_manifests:
        # Raises ValidationError on any schema violation or unknown field (strict).
        kubernetes_validate.validate(manifest, version, strict=True)
    # And a broken one is caught, so the check above means something.
    broken = json.loads(json.dumps(by_kind(all_manifests, "Deployment")[0]))
    broken["spec"]["template"]["spec"]["nodeSelektor"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_manifests_parse_into_client_models(all_manifests) -> None:
    for manifest in all_manifests:
        group = manifest["apiVersion"].split("/")[-1].capitalize()
        model = getattr(client, f"{group}{manifest['kind']}")
        obj = model.from_dict(manifest)
        assert obj.metadata.name == manifest["metadata"]["name"]


def test_namespaced_objects_are_in_the_namespace(all_manifests) -> None:
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for manifest in all_manifests:
        if manifest["kind"] in cluster_scoped:
            assert "namespace" not in manifest["metadata"]
        else:
            assert manifest["metadata"]["namespace"] == "edgepipe"


# --- placement and resources ---------------------------------------------------------------

def stage_deployments(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in by_kind(manifests, "Deployment")
            if m["metadata"]["labels"][k8s.LABEL_COMPONENT] == "stage"]


def test_node_selectors_name_the_planned_nodes(all_manifests) -> None:
    deployments = stage_deployments(all_manifests)
    assert [d["metadata"]["name"] for d in deployments] == ["edgepipe-stage-0",
                                                            "edgepipe-stage-1"]
    for deployment, stage in zip(deployments, PLAN_A):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"kubernetes.io/hostname": stage.node}
        assert deployment["spec"]["replicas"] == 1
    controller = [d for d in by_kind(all_manifests, "Deployment")
                  if d["metadata"]["name"] == "edgepipe-controller"][0]
    assert controller["spec"]["template"]["spec"]["nodeSelector"] == {
        "kubernetes.io/hostname": "dispatcher"}


def test_limits_match_the_topology(all_manifests) -> None:
    expected = {"edge1": ("100m", "256Mi"), "edge3": ("500m", "512Mi")}
    for deployment, stage in zip(stage_deployments(all_manifests), PLAN_A):
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["initContainers"] + pod["containers"]:
            resources = container["resources"]
            cpu, memory = expected[stage.node]
            assert resources["limits"] == {"cpu": cpu, "memory": memory}
            assert resources["requests"] == resources["limits"]     # Guaranteed QoS


def test_a_stage_that_does_not_fit_its_host_is_refused() -> None:
    small = dict(TOPOLOGY, edge2=NodeResources(0.05, 99 * MiB))   # stage 2: 4 + 96 MiB
    with pytest.raises(ValueError, match="needs .* MiB on edge2"):
        k8s.manifests(plan(PLAN_B), models(3), K8sSettings(nodes=small))
    with pytest.raises(ValueError, match="no resources"):
        k8s.manifests(plan(PLAN_A), models(2), K8sSettings(nodes={"edge1": TOPOLOGY["edge1"]}))


def test_pipeline_addresses_chain_to_the_sink(all_manifests) -> None:
    config = by_kind(all_manifests, "ConfigMap")[0]
    stage0 = json.loads(config["data"]["stage-0.json"])
    stage1 = json.loads(config["data"]["stage-1.json"])
    port = 20001
    assert stage0["next"] == f"tcp://edgepipe-stage-1.edgepipe.svc.cluster.local:{port}"
    assert stage1["next"] == "tcp://edgepipe-controller.edgepipe.svc.cluster.local:19000"
    assert stage0["bind"] == f"tcp://*:{port}" and stage0["host"] == "edge1"
    assert set(stage0) == {"host", "epoch", "stage", "version", "model", "bind", "next",
                           "inputs", "outputs", "heartbeat", "heartbeat_ms", "upstream",
                           "upstream_gate"}       # stage_image.worker.WorkerConfig
    # stage pods beat to the controller Service's control port (testbed/k8s/loop.py)
    assert stage0["heartbeat"] == "tcp://edgepipe-controller.edgepipe.svc.cluster.local:18000"
    assert config["immutable"] is True


def test_each_stage_admits_frames_from_its_upstream_only() -> None:
    """As in the embedded backend (testbed.control.auth.senders): stage 0 admits the
    dispatcher (the controller's key), every later stage the stage before it; without
    CurveZMQ there is no list (and no gate)."""
    keys = k8s.generate_deployment_keys(k8s.endpoint_names(3))
    public = {name: pair.public.decode() for name, pair in keys.items()}
    config = by_kind(k8s.epoch_manifests(plan(PLAN_B), models(3),
                                         settings(curve_keys=keys)), "ConfigMap")[0]
    stages = [json.loads(config["data"][f"stage-{i}.json"]) for i in range(3)]
    assert [s["upstream"] for s in stages] == [
        [public["controller"]], [public["stage-0"]], [public["stage-1"]]]
    assert all(s["upstream_gate"] is True for s in stages)
    assert k8s.sender_keys(plan(PLAN_B), None, public) == [public["stage-2"]]   # the sink's
    plain = by_kind(k8s.epoch_manifests(plan(PLAN_B), models(3), settings(curve=False)),
                    "ConfigMap")[0]
    assert not {"upstream", "upstream_gate"} & set(json.loads(plain["data"]["stage-1.json"]))


def test_services_select_their_stage_pods_of_this_epoch(all_manifests) -> None:
    services = {s["metadata"]["name"]: s for s in by_kind(all_manifests, "Service")}
    for deployment in stage_deployments(all_manifests):
        service = services[deployment["metadata"]["name"]]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"]["selector"][k8s.LABEL_EPOCH] == "1"
        assert service["spec"]["clusterIP"] == "None"


def test_init_container_fetches_and_checks_the_model(all_manifests) -> None:
    deployment = stage_deployments(all_manifests)[1]
    init = deployment["spec"]["template"]["spec"]["initContainers"][0]
    sha = models(2)[1].sha256
    assert init["command"][:3] == ["python3", "-m", "stage_image.fetch_model"]
    assert init["command"][3].endswith(f"/models/{sha}.onnx")
    assert init["command"][4] == sha


def test_epoch_and_version_labels(all_manifests) -> None:
    for manifest in (by_kind(all_manifests, "ConfigMap") + epoch_secrets(all_manifests)
                     + stage_deployments(all_manifests)):
        assert manifest["metadata"]["labels"][k8s.LABEL_EPOCH] == "1"
        assert manifest["metadata"]["labels"][k8s.LABEL_VERSION] == "1"


# --- access rights -------------------------------------------------------------------------

def test_no_wildcard_rights(all_manifests) -> None:
    for role in by_kind(all_manifests, "Role") + by_kind(all_manifests, "ClusterRole"):
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(key, []), (role["metadata"]["name"], rule)
            assert "escalate" not in rule["verbs"] and "bind" not in rule["verbs"]


def test_cluster_role_reads_nodes_only(all_manifests) -> None:
    (cluster_role,) = by_kind(all_manifests, "ClusterRole")
    assert cluster_role["rules"] == [{"apiGroups": [""], "resources": ["nodes"],
                                      "verbs": ["get", "list", "watch"]}]
    (binding,) = by_kind(all_manifests, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "edgepipe-controller",
                                    "namespace": "edgepipe"}]


def test_stage_pods_have_no_api_token_and_run_restricted(all_manifests) -> None:
    for deployment in stage_deployments(all_manifests):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["initContainers"] + pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_each_pod_mounts_only_its_own_curve_key(all_manifests) -> None:
    (secret,) = epoch_secrets(all_manifests)
    assert set(secret["stringData"]) == {"stage-0.secret", "stage-1.secret",
                                         "controller.secret"}
    for index, deployment in enumerate(stage_deployments(all_manifests)):
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["curve"]["secret"]["items"] == [
            {"key": f"stage-{index}.secret", "path": "own.secret"}]
    plain = k8s.manifests(plan(PLAN_A), models(2), settings(curve=False))
    assert not by_kind(plain, "Secret")


def test_the_controller_has_its_own_key_and_a_command_port(all_manifests) -> None:
    """The driver makes the controller's keypair (it must know whom its commands go to):
    the controller's Secret holds the same key as the epoch's, mounted only into the
    controller's pod and passed as --keypair; the command port is a container port that no
    Service exposes (the driver reaches it through the API server's port-forward)."""
    (own,) = [m for m in by_kind(all_manifests, "Secret")
              if m["metadata"]["name"] == k8s.controller_secret_name()]
    (epoch,) = epoch_secrets(all_manifests)
    assert own["stringData"] == {"controller.secret": epoch["stringData"]["controller.secret"]}
    (controller,) = [m for m in by_kind(all_manifests, "Deployment")
                     if m["metadata"]["name"] == k8s.controller_name()]
    pod_spec = controller["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    key_file = container["command"][container["command"].index("--keypair") + 1]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "curve"]
    assert key_file == f"{mount['mountPath']}/controller.secret"
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    assert volumes["curve"]["secret"]["secretName"] == k8s.controller_secret_name()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["command"] == settings().command_port
    for deployment in stage_deployments(all_manifests):
        names = [v.get("secret", {}).get("secretName")
                 for v in deployment["spec"]["template"]["spec"]["volumes"]]
        assert k8s.controller_secret_name() not in names
    (service,) = [m for m in by_kind(all_manifests, "Service")
                  if m["metadata"]["name"] == k8s.controller_name()]
    assert "command" not in {p["name"] for p in service["spec"]["ports"]}
    # the command line parses as the controller's
    from testbed.k8s.loop import parse_args
    assert str(parse_args(container["command"][3:]).keypair) == key_file


# --- files ---------------------------------------------------------------------------------

def test_write_manifests(tmp_path) -> None:
    files = k8s.write_manifests(plan(PLAN_A), models(2), settings(), tmp_path)
    names = [f.name for f in files]
    assert names == sorted(names)
    assert names[0] == "00-namespace.yaml" and "20-stage-01.yaml" in names
    assert all(f.parent == tmp_path / "k8s" for f in files)
    loaded = [doc for f in files for doc in yaml.safe_load_all(f.read_text())]
    assert len(loaded) == len(k8s.manifests(plan(PLAN_A), models(2), settings()))
    for doc in loaded:
        kubernetes_validate.validate(doc, NEWEST, strict=True)
    secret_file = tmp_path / "k8s" / "04-curve-secret.yaml"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600


def test_manifests_for_a_shipped_topology(tmp_path) -> None:
    from formats.topology import load_topology
    topology = load_topology(REPO / "topologies" / "star-5.yaml")
    cfg = k8s.settings_for_topology(topology, epoch=7, model_version=2)
    assert cfg.controller_node == "dispatcher"
    edges = [h for h in topology.hosts if h != "dispatcher"][:2]
    small = Plan("given", [Stage(0, 1, edges[0]), Stage(1, 2, edges[1])], 1.0, 1.0, False)
    files = k8s.write_manifests(small, models(2), cfg, tmp_path)
    docs = [d for f in files for d in yaml.safe_load_all(f.read_text())]
    for doc in docs:
        kubernetes_validate.validate(doc, NEWEST, strict=True)
    for deployment, name in zip(stage_deployments(docs), edges):
        host = topology.hosts[name]
        limits = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits == {"cpu": k8s.cpu_quantity(host.cpu),
                          "memory": k8s.memory_quantity(host.memory_bytes)}
        assert deployment["metadata"]["labels"][k8s.LABEL_EPOCH] == "7"
        assert deployment["metadata"]["labels"][k8s.LABEL_VERSION] == "2"


def test_load_stage_models(tmp_path) -> None:
    (tmp_path / "stage_00.onnx").write_bytes(b"model bytes")
    (tmp_path / "stages.json").write_text(json.dumps(
        [{"file": "stage_00.onnx", "inputs": ["x"], "outputs": ["y"]}]))
    (model,) = k8s.load_stage_models(tmp_path)
    assert model.size == 11 and len(model.sha256) == 64 and model.outputs == ["y"]


# --- re-plan -------------------------------------------------------------------------------

def live(manifests: list[dict[str, Any]]) -> list[client.V1Deployment]:
    """What the API server would return for these Deployments."""
    return [client.V1Deployment.from_dict(m) for m in by_kind(manifests, "Deployment")]


def test_replan_patches_change_epoch_and_placement() -> None:
    first = k8s.epoch_manifests(plan(PLAN_A), models(2), settings(epoch=1))
    second = k8s.epoch_manifests(plan(PLAN_B), models(3), settings(epoch=2))
    rollout = rollout_actions(live(first), second)
    deployments = by_kind(rollout.apply, "Deployment")
    assert [d["metadata"]["name"] for d in deployments] == [
        "edgepipe-stage-0", "edgepipe-stage-1", "edgepipe-stage-2"]
    for deployment, stage in zip(deployments, PLAN_B):
        template = deployment["spec"]["template"]
        assert template["metadata"]["labels"][k8s.LABEL_EPOCH] == "2"
        assert deployment["metadata"]["labels"][k8s.LABEL_EPOCH] == "2"
        assert template["spec"]["nodeSelector"]["kubernetes.io/hostname"] == stage.node
        assert template["spec"]["containers"][0]["ports"][0]["containerPort"] == 20002
    old = {d.metadata.name: d for d in live(first)}["edgepipe-stage-0"]
    assert old.spec.template.metadata.labels[k8s.LABEL_EPOCH] == "1"
    assert by_kind(rollout.apply, "ConfigMap")[0]["metadata"]["name"] == "edgepipe-e2-stages"
    assert rollout.delete_deployments == []


def test_replan_to_fewer_stages_deletes_the_extra_slot() -> None:
    first = k8s.epoch_manifests(plan(PLAN_B), models(3), settings(epoch=3))
    second = k8s.epoch_manifests(plan(PLAN_A), models(2), settings(epoch=4))
    services = [client.V1Service.from_dict(s) for s in by_kind(first, "Service")]
    rollout = rollout_actions(live(first), second, services)
    assert rollout.delete_deployments == ["edgepipe-stage-2"]
    assert rollout.delete_services == ["edgepipe-stage-2"]


def test_unchanged_epoch_applies_no_deployment() -> None:
    keys = k8s.generate_deployment_keys(k8s.endpoint_names(2))
    same = k8s.epoch_manifests(plan(PLAN_A), models(2), settings(epoch=5, curve_keys=keys))
    again = k8s.epoch_manifests(plan(PLAN_A), models(2), settings(epoch=5, curve_keys=keys))
    assert by_kind(rollout_actions(live(same), again).apply, "Deployment") == []


def test_stale_epoch_objects() -> None:
    maps = [client.V1ConfigMap.from_dict(
        {"metadata": {"name": f"edgepipe-e{e}-stages",
                      "labels": {k8s.LABEL_NAME: "edgepipe", k8s.LABEL_EPOCH: str(e)}}})
            for e in (1, 2, 3, 4)]
    assert stale_epoch_objects(maps, current_epoch=4) == ["edgepipe-e1-stages",
                                                          "edgepipe-e2-stages"]


# --- Nodes and Pods ------------------------------------------------------------------------

def node(name: str, ready: str = "True", unschedulable: bool = False,
         taints: list[client.V1Taint] | None = None) -> client.V1Node:
    return client.V1Node(
        metadata=client.V1ObjectMeta(name=name, labels={"kubernetes.io/hostname": name}),
        spec=client.V1NodeSpec(unschedulable=unschedulable, taints=taints),
        status=client.V1NodeStatus(conditions=[
            client.V1NodeCondition(type="MemoryPressure", status="False"),
            client.V1NodeCondition(type="Ready", status=ready)]))


def test_node_readiness_from_node_objects() -> None:
    assert node_ready(node("a")) and node_usable(node("a"))
    assert not node_ready(node("a", ready="Unknown"))      # kubelet stopped reporting
    assert not node_ready(node("a", ready="False"))
    assert node_ready(node("a", unschedulable=True))
    assert not node_usable(node("a", unschedulable=True))  # cordoned
    unreachable = client.V1Taint(key="node.kubernetes.io/unreachable", effect="NoExecute")
    assert not node_usable(node("a", taints=[unreachable]))
    assert not node_ready(client.V1Node(metadata=client.V1ObjectMeta(name="x")))


def test_heartbeats_detect_a_crash_before_the_api_does() -> None:
    health = NodeHealth(heartbeat_timeout_s=1.0)
    for name in ("edge1", "edge2", "edge3"):
        health.observe_node(node(name))
    health.heartbeat("edge1", 10.0)
    health.heartbeat("edge2", 10.0)
    assert health.dead_nodes(10.5) == set()
    health.heartbeat("edge2", 11.0)
    # edge1 stopped beating: dead at once, although its Node object still says Ready.
    assert health.dead_nodes(11.6) == {"edge1"}
    # edge3 has no heartbeat source: the API decides alone.
    health.observe_node(node("edge3", ready="Unknown"))
    assert health.dead_nodes(11.6) == {"edge1", "edge3"}
    health.heartbeat("edge1", 12.0)
    assert health.alive("edge1", 12.1)


def pod(name: str, stage: int, epoch: int, node_name: str, ready: bool = True,
        terminating: bool = False) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(
            name=name, labels={k8s.LABEL_NAME: "edgepipe", k8s.LABEL_COMPONENT: "stage",
                               k8s.LABEL_STAGE: str(stage), k8s.LABEL_EPOCH: str(epoch)},
            deletion_timestamp="2026-01-01T00:00:00Z" if terminating else None),
        spec=client.V1PodSpec(node_name=node_name,
                              containers=[client.V1Container(name="worker")]),
        status=client.V1PodStatus(phase="Running", conditions=[
            client.V1PodCondition(type="Ready", status="True" if ready else "False")]))


def test_pod_decisions() -> None:
    pods = [pod("a", 0, 1, "edge1", terminating=True), pod("b", 1, 1, "edge3"),
            pod("c", 0, 2, "edge3", ready=False), pod("d", 1, 2, "edge1")]
    assert pods_to_force_delete(pods, {"edge1"}) == ["a", "d"]
    assert epoch_ready(pods, epoch=1, n_stages=2) is False     # stage 0 pod terminating
    assert epoch_ready(pods, epoch=2, n_stages=2) is False     # stage 0 not ready yet
    pods[2] = pod("c", 0, 2, "edge3")
    assert epoch_ready(pods, epoch=2, n_stages=2) is True
    foreign = client.V1Pod(metadata=client.V1ObjectMeta(name="x", labels={"app": "other"}))
    assert pods_to_force_delete([foreign], {"edge1"}) == []


# --- model server + init container fetcher -------------------------------------------------

def test_model_server_and_fetch(tmp_path) -> None:
    import hashlib
    blob = bytes(range(256)) * 5000
    (tmp_path / "stage_00.onnx").write_bytes(blob)
    sha = hashlib.sha256(blob).hexdigest()
    server = ModelServer("127.0.0.1", 0)
    server.register([StageModel("stage_00.onnx", [], [], sha, len(blob))], tmp_path)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/models/{sha}.onnx"
        dest = tmp_path / "out" / "stage.onnx"
        dest.parent.mkdir()
        assert fetch_model.fetch(url, sha, dest) == len(blob)
        assert dest.read_bytes() == blob
        with pytest.raises(fetch_model.FetchError, match="SHA-256"):
            fetch_model.fetch(url, "0" * 64, tmp_path / "out" / "bad.onnx")
        assert not (tmp_path / "out" / "bad.onnx").exists()
        assert not list((tmp_path / "out").glob("*.partial"))
        missing = f"http://127.0.0.1:{server.port}/models/{'1' * 64}.onnx"
        with pytest.raises(fetch_model.FetchError, match="404"):
            fetch_model.fetch(missing, "1" * 64, tmp_path / "out" / "missing.onnx")
    finally:
        server.stop()


# --- the thin API layer, against a fake API server -----------------------------------------

class FakeApi(http.server.BaseHTTPRequestHandler):
    requests: list[tuple[str, str, dict[str, str], Any]] = []
    node_events: list[dict[str, Any]] = []

    def do_PATCH(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeApi.requests.append(("PATCH", self.path, dict(self.headers), body))
        self._json(200, body)           # the applied object comes back

    def do_GET(self) -> None:  # noqa: N802
        FakeApi.requests.append(("GET", self.path, dict(self.headers), None))
        if self.path.startswith("/api/v1/nodes") and "watch=true" in self.path:
            payload = "".join(json.dumps(e) + "\n" for e in FakeApi.node_events).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        self._json(404, {"kind": "Status", "code": 404})

    def _json(self, status: int, data: Any) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_api() -> Iterator[client.ApiClient]:
    FakeApi.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    configuration = client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    api = client.ApiClient(configuration)
    yield api
    api.close()
    server.shutdown()
    server.server_close()


def test_apply_is_a_server_side_apply(fake_api) -> None:
    backend = K3sBackend(settings(), api=fake_api)
    deployment = stage_deployments(k8s.manifests(plan(PLAN_A), models(2), settings()))[0]
    result = backend.apply(deployment)
    method, path, headers, body = FakeApi.requests[-1]
    assert method == "PATCH"
    assert path.startswith("/apis/apps/v1/namespaces/edgepipe/deployments/edgepipe-stage-0?")
    assert "fieldManager=edgepipe-controller" in path and "force=true" in path
    assert headers["Content-Type"] == "application/apply-patch+yaml"
    assert body["spec"]["template"]["metadata"]["labels"][k8s.LABEL_EPOCH] == "1"
    assert isinstance(result, client.V1Deployment)
    backend.apply(k8s.namespace_manifest(settings()))
    assert FakeApi.requests[-1][1].startswith("/api/v1/namespaces/edgepipe?")


def test_watch_nodes_reports_transitions(fake_api) -> None:
    FakeApi.node_events = [
        {"type": "ADDED", "object": client.ApiClient().sanitize_for_serialization(node("e1"))},
        {"type": "MODIFIED", "object": client.ApiClient().sanitize_for_serialization(
            node("e1", ready="Unknown"))},
    ]
    backend = K3sBackend(settings(), api=fake_api)
    health = NodeHealth()
    seen: list[tuple[str, bool]] = []
    stop = threading.Event()

    def on_event(kind: str, n: client.V1Node) -> None:
        health.observe_node(n)
        seen.append((kind, node_ready(n)))
        if len(seen) == 2:
            stop.set()

    backend.watch_nodes(on_event, stop, timeout_s=1)
    assert seen == [("ADDED", True), ("MODIFIED", False)]
    assert health.dead_nodes(0.0) == {"e1"}
