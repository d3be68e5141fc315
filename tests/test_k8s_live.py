"""`run_scenario.py SCENARIO --backend k3s` (testbed/experiment/k3s_live.py) and the controller's
workload
(testbed/k8s/workload.py), without a cluster and without root.

Everything up to the cluster is real: the driver's code path (kubeconfig, official client,
server-side apply, the controller pod's command port through a real WebSocket port-forward,
CurveZMQ, faults through the API, the results directory and the SLO exit code), the control
loop (K3sController) with its dispatcher, and real stage workers (onnxruntime, ZeroMQ) on
loopback. In place of the cluster: tests/fake_k8s.FakeCluster, and a small "kubelet" here
that starts a stage worker for every stage pod the fake API holds (its config from the
epoch's ConfigMap and Secret, Service names mapped to loopback addresses) and kills it when
the pod goes, and runs the controller when its pod appears.
Addresses: 127.0.0.61-64; ports: 47000-47999.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubernetes_validate import utils as kv_utils

from formats.control import ControlSettings
from stage_image.security import KeyPair
from testbed.experiment import driver
from testbed.k8s import manifests as k8s
from testbed.k8s.backend import K3sBackend, ModelServer
from testbed.k8s.loop import K3sController
from tests.fake_k8s import FakeCluster, serve_fake_cluster
from tests.test_k8s_control import build_chain

ROOT = Path(__file__).resolve().parent.parent
NEWEST = max(set(kv_utils.all_versions()), key=lambda v: tuple(int(x) for x in v.split(".")))
IPS = {"dispatcher": "127.0.0.61", "edge1": "127.0.0.62", "edge2": "127.0.0.63",
       "edge3": "127.0.0.64"}
CONTROLLER_IP = IPS["dispatcher"]
# the controller's ports on loopback (the pod's 18000, 18080, 19000, 18001)
HEARTBEAT, MODELS, SINK, COMMAND = 47010, 47011, 47012, 47013
API_PORT = 47001
CLOSED_PORT = 47999          # nothing listens there: "no cluster"
SERVICE = re.compile(r"tcp://([a-z0-9-]+)\.edgepipe\.svc\.cluster\.local:(\d+)")


def data_port(pod_port: int) -> int:
    return 47100 + (pod_port - 20000) % 800


class Kubelet:
    """Runs what the fake API says runs: the controller (in a thread of this process) and
    one real stage worker process per stage pod."""

    def __init__(self, cluster: FakeCluster, api: Any, work: Path) -> None:
        self.cluster, self.api, self.work = cluster, api, work
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.controller: K3sController | None = None
        self.loop: threading.Thread | None = None
        self.stop = threading.Event()
        self.errors: list[str] = []
        cluster.forward = self.forward
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    # -- Service names -> loopback --------------------------------------------------------

    def stage_nodes(self, epoch: int) -> list[str]:
        config = self.cluster.get("configmaps", f"edgepipe-e{epoch}-stages")
        assert config is not None, f"no config of epoch {epoch}"
        return [s["node"] for s in json.loads(config["data"]["stages.json"])]

    def address(self, epoch: int, text: str) -> str:
        def sub(match: re.Match[str]) -> str:
            name, port = match.group(1), int(match.group(2))
            if name == "edgepipe-controller":
                return f"tcp://{CONTROLLER_IP}:" + str({18000: HEARTBEAT, 19000: SINK}[port])
            stage = int(name.rsplit("-", 1)[1])
            return f"tcp://{IPS[self.stage_nodes(epoch)[stage]]}:{data_port(port)}"
        return SERVICE.sub(sub, text)

    def forward(self, pod: str, port: int) -> tuple[str, int]:
        assert pod.startswith("edgepipe-controller") and port == 18001, (pod, port)
        return CONTROLLER_IP, COMMAND

    @staticmethod
    def stage0(settings: k8s.K8sSettings, node: str) -> str:
        return f"tcp://{IPS[node]}:{data_port(settings.data_port())}"

    # -- the reconciler ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                self._reconcile()
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def _reconcile(self) -> None:
        pods = {name: pod for name, pod in self.cluster.objects["pods"].items()
                if "deletionTimestamp" not in pod["metadata"]}
        for name, pod in list(pods.items()):
            labels = pod["metadata"]["labels"]
            if labels[k8s.LABEL_COMPONENT] == "controller" and self.controller is None:
                self._start_controller()
            elif labels[k8s.LABEL_COMPONENT] == "stage" and name not in self.workers:
                self.workers[name] = self._start_worker(
                    int(labels[k8s.LABEL_EPOCH]), int(labels[k8s.LABEL_STAGE]), name)
        for name, process in self.workers.items():
            if name not in pods and process.poll() is None:
                process.kill()            # the pod is gone: a crash, or its epoch is over

    def _start_controller(self) -> None:
        inputs_map = self.cluster.get("configmaps", k8s.controller_inputs_name())
        secret = self.cluster.get("secrets", k8s.controller_secret_name())
        assert inputs_map is not None and secret is not None
        inputs_dir = self.work / "controller-inputs"
        inputs_dir.mkdir(parents=True)
        for key, text in inputs_map["data"].items():
            (inputs_dir / key).write_text(text)
        settings, inputs = k8s.load_controller_inputs(inputs_dir)
        models = self.work / "controller-models"
        self.controller = K3sController(
            settings, inputs, models, models / inputs.model_file,
            ControlSettings(heartbeat_ms=settings.heartbeat_ms or 200.0, suspect_after_missed=5,
                   rejoin_hold_s=60.0),
            logging.getLogger("k3s-live-controller"),
            backend=K3sBackend(settings, api=self.api),
            model_server=ModelServer(CONTROLLER_IP, MODELS),
            heartbeat_bind=f"tcp://{CONTROLLER_IP}:{HEARTBEAT}",
            keys=KeyPair.from_secret(secret["stringData"]["controller.secret"]),
            sink_bind=f"tcp://{CONTROLLER_IP}:{SINK}",
            command_bind=f"tcp://{CONTROLLER_IP}:{COMMAND}", stage0_address=self.stage0)
        self.loop = threading.Thread(target=self.controller.run, daemon=True)
        self.loop.start()

    def _start_worker(self, epoch: int, stage: int, name: str) -> subprocess.Popen[bytes]:
        config_map = self.cluster.get("configmaps", f"edgepipe-e{epoch}-stages")
        secret = self.cluster.get("secrets", f"edgepipe-e{epoch}-curve")
        assert config_map is not None and secret is not None
        config = json.loads(config_map["data"][f"stage-{stage}.json"])
        node = config["host"]
        pod_dir = self.work / name
        (pod_dir / "curve").mkdir(parents=True)
        # the init container's job: the stage model from the controller, checked
        entry = json.loads(config_map["data"]["stages.json"])[stage]
        url = f"http://{CONTROLLER_IP}:{MODELS}/models/{entry['sha256']}.onnx"
        with urllib.request.urlopen(url, timeout=30) as response:
            (pod_dir / "stage.onnx").write_bytes(response.read())
        bind_port = int(config["bind"].rsplit(":", 1)[1])
        config.update(model=str(pod_dir / "stage.onnx"),
                      bind=f"tcp://{IPS[node]}:{data_port(bind_port)}",
                      next=self.address(epoch, config["next"]),
                      heartbeat=self.address(epoch, config["heartbeat"]))
        (pod_dir / "stage.json").write_text(json.dumps(config))
        (pod_dir / "curve-public.json").write_text(config_map["data"]["curve-public.json"])
        (pod_dir / "curve" / "own.secret").write_text(
            secret["stringData"][f"stage-{stage}.secret"])
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "EDGEPIPE_CURVE_DIR": str(pod_dir / "curve")}
        with open(pod_dir / "worker.log", "w") as log:
            return subprocess.Popen([sys.executable, "-m", "stage_image.worker",
                                     str(pod_dir / "stage.json")], cwd=ROOT, env=env,
                                    stdout=subprocess.DEVNULL, stderr=log)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        if self.controller is not None:
            self.controller.stop()
        if self.loop is not None:
            self.loop.join(30)
        for process in self.workers.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.workers.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def write_scenario(root: Path, steps: str, model: Path) -> Path:
    (root / "topology.yaml").write_text(
        "name: k3s-live\n"
        "defaults:\n  host: {cpu: 0.2, memory: 512MiB, disk: 64MiB}\n"
        "  link: {bandwidth: 1Gbit}\n"
        "hosts:\n  dispatcher: {role: dispatcher, cpu: 0.5, memory: 1GiB}\n"
        "  edge1: {cpu: 1.0}\n  edge2: {}\n  edge3: {}\n"
        "switches: [s1]\n"
        "links:\n  - {endpoints: [dispatcher, s1]}\n  - {endpoints: [edge1, s1]}\n"
        "  - {endpoints: [edge2, s1]}\n  - {endpoints: [edge3, s1]}\n")
    path = root / "scenario.yaml"
    path.write_text(
        "name: k3s-live\ntopology: topology.yaml\n"
        f"model: {{path: {model}}}\nplanner: {{algorithm: optimal}}\nbackend: k3s\n"
        "workload: {mode: closed, concurrency: 2, duration: 8s, warmup: 1s, seed: 3}\n"
        + (f"steps:\n{steps}" if steps else "steps: []\n") +
        "slo: {lost: 0, mismatched: 0}\n")
    return path


def write_kubeconfig(path: Path, port: int) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: fake, cluster: {{server: 'http://127.0.0.61:{port}'}}}}]\n"
        "users: [{name: fake, user: {}}]\n"
        "contexts: [{name: fake, context: {cluster: fake, user: fake}}]\n"
        "current-context: fake\n")
    return path


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[FakeCluster, Any, Path]]:
    with serve_fake_cluster(API_PORT) as (cluster, api):
        yield cluster, api, write_kubeconfig(tmp_path / "kubeconfig", API_PORT)


# --- the driver's refusals ------------------------------------------------------------------

def test_a_fault_k3s_cannot_do_is_refused_before_the_cluster_is_touched(
        tmp_path: Path, live: tuple[FakeCluster, Any, Path], capsys) -> None:
    cluster, _, kubeconfig = live
    build_chain(tmp_path / "chain.onnx")
    scenario = write_scenario(tmp_path, "  - {at: 2s, action: node.pause, target: edge2}\n",
                              tmp_path / "chain.onnx")
    code = driver.main([str(scenario), "--kubeconfig", str(kubeconfig),
                        "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "node.pause is not supported by the k3s backend" in err and "scenario.yaml:" in err
    assert cluster.requests == []


def test_no_reachable_cluster_is_a_clear_error(tmp_path: Path, capsys,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    build_chain(tmp_path / "chain.onnx")
    scenario = write_scenario(tmp_path, "", tmp_path / "chain.onnx")
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", CLOSED_PORT)
    out = tmp_path / "out"
    assert driver.main([str(scenario), "--kubeconfig", str(kubeconfig),
                        "--out", str(out)]) == 2
    assert "no Kubernetes API reachable at http://127.0.0.61:47999" in capsys.readouterr().err
    assert not (out / "plan.json").exists()           # nothing prepared, nothing applied
    monkeypatch.delenv("KUBECONFIG", raising=False)
    assert driver.main([str(scenario), "--out", str(out)]) == 2
    assert "--kubeconfig PATH or $KUBECONFIG" in capsys.readouterr().err


# --- the whole run against the fake API server ----------------------------------------------

def test_a_scenario_runs_on_the_fake_cluster_through_a_node_crash(
        tmp_path: Path, live: tuple[FakeCluster, Any, Path]) -> None:
    """Apply, the controller pod's command port through a WebSocket port-forward, the model
    uploaded, epoch 1 served by real workers, edge1 crashed through the API (its stage pod
    deleted, the node tainted NoExecute) under load, the new epoch taken over with the
    unanswered requests replayed, the results fetched, the SLOs met, the namespace deleted."""
    cluster, api, kubeconfig = live
    model = tmp_path / "chain.onnx"
    build_chain(model)
    scenario = write_scenario(tmp_path, "  - {at: 3s, action: node.crash, target: edge1}\n",
                              model)
    kubelet = Kubelet(cluster, api, tmp_path / "kubelet")
    out = tmp_path / "out"
    try:
        code = driver.main([str(scenario), "--kubeconfig", str(kubeconfig), "--out", str(out)])
    finally:
        kubelet.close()
    assert not kubelet.errors, kubelet.errors
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0, summary["slo"]
    assert summary["backend"] == "k3s"
    requests = summary["requests"]
    assert requests["sent"] > 10 and requests["completed"] == requests["sent"]
    assert requests["lost"] == 0 and requests["mismatched"] == 0
    rows = (out / "requests.csv").read_text().splitlines()
    assert len(rows) == requests["sent"] + 1

    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    kinds = [e["type"] for e in events]
    switched = [e for e in events if e["type"] == "dispatcher.switched"]
    assert [e["epoch"] for e in switched][:1] == [7]        # after the fake's leftover 6
    assert "model.received" in kinds and "references.ready" in kinds
    crash = next(e for e in events if e["type"] == "fault.injected")
    assert crash["action"] == "node.crash" and crash["detail"]["killed"]
    # edge1 (the fastest host) served epoch 7; the pipeline moved off it at once (the API's
    # taint) and the new epoch took over what was in flight
    assert switched[0]["heads"] == [f"tcp://{IPS['edge1']}:{data_port(20007)}"]
    suspected = [e for e in events if e["type"] == "node.suspected" and e["host"] == "edge1"]
    assert suspected and suspected[0]["source"] == "api" and suspected[0]["serving"]
    later = [e for e in events if e["type"] == "plan.deployed" and e["epoch"] > 7]
    assert later and "edge1" not in later[0]["hosts"]
    assert [e["epoch"] for e in switched] == [7, later[0]["epoch"]]
    assert summary["faults"][0]["detected_s"] is not None
    # what reached the API
    methods = {(m, k) for m, k, _, _ in cluster.requests}
    for expected in [("PATCH", "namespaces"), ("PATCH", "clusterroles"),
                     ("PATCH", "secrets"), ("PATCH", "deployments"),
                     ("PORTFORWARD", "pods"), ("DELETE", "namespaces"),
                     ("DELETE", "clusterrolebindings")]:
        assert expected in methods, expected
    for kind in ("namespaces", "serviceaccounts", "roles", "rolebindings", "clusterroles",
                 "clusterrolebindings", "networkpolicies", "configmaps", "secrets",
                 "deployments", "services"):
        for body in cluster.applied(kind):
            kubernetes_validate.validate(body, NEWEST, strict=True)
    (inputs,) = [b for b in cluster.applied("configmaps")
                 if b["metadata"]["name"] == k8s.controller_inputs_name()]
    assert json.loads(inputs["data"]["workload.json"])["seed"] == 3
    taints = [b["spec"]["taints"] for b in cluster.applied("nodes")]
    assert any(t["key"] == "edgepipe/crashed" and t["effect"] == "NoExecute"
               for t in taints[0])
    assert taints[-1] == []                    # healed at the end
    forced = [q for m, k, name, q in cluster.requests
              if m == "DELETE" and k == "pods" and "gracePeriodSeconds=0" in str(q)]
    assert forced


def _unused(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((CONTROLLER_IP, port)) != 0


def test_only_the_driver_key_may_command(tmp_path: Path) -> None:
    """The command port admits the driver's key only (the stages know the controller's
    public key too); a wrong model is refused and not moved into place."""
    from testbed.control.dispatcher import Workload
    from testbed.experiment.run import ControlClient
    from testbed.k8s.workload import WorkloadHost

    controller, driver_keys = KeyPair.generate(), KeyPair.generate()
    assert _unused(COMMAND + 10)
    host = WorkloadHost(Workload(), tmp_path, tmp_path / "model.onnx", "0" * 64,
                        tmp_path / "events.jsonl", lambda *a, **k: None,
                        logging.getLogger("test"), lambda: {"state": "planning"},
                        f"tcp://{CONTROLLER_IP}:{SINK + 10}",
                        f"tcp://{CONTROLLER_IP}:{COMMAND + 10}", controller,
                        driver_keys.public.decode()).start()
    address = f"tcp://{CONTROLLER_IP}:{COMMAND + 10}"
    good = ControlClient(address, 3000, (driver_keys, controller.public.decode()))
    intruder = ControlClient(address, 1000, (KeyPair.generate(), controller.public.decode()))
    try:
        assert good.call("status")["state"] == "waiting_model"
        assert intruder.call("status") is None
        reply = good.call("put_model", b"not the model", offset=0, total=13)
        assert not reply["ok"] and "SHA-256" in reply["error"]
        assert not (tmp_path / "model.onnx").exists()
        assert good.call("fetch", file="../../etc/passwd", offset=0)["ok"] is False
    finally:
        good.close()
        intruder.close()
        host.stop()
