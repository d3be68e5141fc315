"""The k3s backend's control loop (testbed/k8s/loop.py), without a cluster and without root.

- The decision core on the official client's model objects (V1Node, V1Pod) and on plans from
  the real planner: a crash found by heartbeat silence, NotReady alone, Ready again while the
  stage's heartbeats stay silent, the rejoin hold and margin, infeasible then retried.
- A re-plan turned into manifests by testbed.k8s.manifests that name only live nodes and validate
  offline (kubernetes-validate, strict).
- A real stage worker (stage_image.worker, loopback, ephemeral ports, CURVE on as in a pod)
  whose heartbeats the real receiver accepts, while malformed frames are rejected.
- The whole loop (K3sController) against a fake API server on loopback: a stage's heartbeats
  stop, the loop re-plans, applies the new epoch, force-deletes the pod stuck on the dead
  node and prunes old epochs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import numpy as np
import onnx
import pytest
import zmq
from kubernetes import client
from kubernetes_validate import utils as kv_utils
from onnx import TensorProto, helper, numpy_helper

from formats.control import ControlSettings
from partitioner import cuts
from partitioner.algorithms import solve
from partitioner.instance import InfeasibleError, Instance, Node, Plan, Segment, Stage
from stage_image.security import KeyPair, apply_client, apply_server
from stage_image.wire import MAX_STAGE_HEARTBEAT_BYTES, FrameError, encode_control
from testbed.control.core.actions import Event
from testbed.control.planning import Planner, PlanRequest, VersionInfo, restrict, sha256_file
from testbed.experiment.results import read_events
from testbed.k8s import manifests as k8s
from testbed.k8s.backend import K3sBackend, ModelServer, latest_epoch
from testbed.k8s.decider import Decider, Deploy, ForceDelete, Prune, Replan
from testbed.k8s.loop import (
    HeartbeatReceiver,
    K3sController,
    epoch_settings,
    initial_request,
    model_ready,
    parse_heartbeat,
    stage_models,
)
from testbed.k8s.manifests import ControllerInputs, K8sSettings, NodeResources
from tests.fake_k8s import node, serve_fake_cluster

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
NEWEST = max(set(kv_utils.all_versions()), key=lambda v: tuple(int(x) for x in v.split(".")))
EDGES = ("edge1", "edge2", "edge3")


# --- helpers: client model objects, instances, plans ---------------------------------------

def pod(stage: int, epoch: int, host: str, ready: bool = True) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(
            name=f"edgepipe-stage-{stage}-e{epoch}",
            labels={k8s.LABEL_NAME: "edgepipe", k8s.LABEL_COMPONENT: "stage",
                    k8s.LABEL_STAGE: str(stage), k8s.LABEL_EPOCH: str(epoch)}),
        spec=client.V1PodSpec(node_name=host, containers=[client.V1Container(name="worker")]),
        status=client.V1PodStatus(phase="Running", conditions=[
            client.V1PodCondition(type="Ready", status="True" if ready else "False")]))


def small_instance(speeds: dict[str, float] | None = None,
                   memory: dict[str, int] | None = None,
                   segment_memory: int = 8 * MiB) -> Instance:
    speeds = speeds or dict.fromkeys(EDGES, 1.0)
    memory = memory or dict.fromkeys(EDGES, 256 * MiB)
    nodes = [Node(n, speeds[n], memory[n]) for n in EDGES]
    bandwidth = {(a, b): 1000.0 for a in ("dispatcher", *EDGES) for b in EDGES if a < b}
    return Instance([Segment(10.0, segment_memory, 1000), Segment(10.0, segment_memory, 100)],
                    1000, nodes, "dispatcher", bandwidth)


def plan_on(instance: Instance, first: str, second: str) -> Plan:
    return Plan.of(instance, [Stage(0, 1, first), Stage(1, 2, second)], "given", False)


def of(actions: list[Any], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def events(actions: list[Any], kind: str) -> list[Event]:
    return [a for a in actions if isinstance(a, Event) and a.kind == kind]


def deployed_decider(plan: Plan, timing: ControlSettings | None = None, at: float = 0.0,
                     candidates: tuple[str, ...] = EDGES) -> Decider:
    """A Decider whose first epoch runs `plan`, every pod Ready, from time `at`."""
    decider = Decider(candidates, timing or ControlSettings())
    decider.nodes_listed([node(n) for n in (*candidates, "dispatcher")])
    (replan,) = of(decider.tick(at), Replan)
    assert replan.kind == "initial" and replan.live == frozenset(candidates)
    (deploy,) = of(decider.planned("initial", plan, at), Deploy)
    assert deploy.epoch == 1
    assert of(decider.deployed(1, at), Prune) == [Prune(1)]
    for index, stage in enumerate(plan.stages):
        decider.pod_event("ADDED", pod(index, 1, stage.node))
    assert events(decider.tick(at), "plan.deployed")
    return decider


def beat_all(decider: Decider, plan: Plan, at: float, skip: frozenset[str] = frozenset()) -> None:
    for index, stage in enumerate(plan.stages):
        if stage.node not in skip:
            assert decider.heartbeat(stage.node, decider.epoch, index, at)


# --- the decision core ---------------------------------------------------------------------

def test_heartbeat_silence_replans_within_the_detection_time() -> None:
    timing = ControlSettings(heartbeat_ms=200, suspect_after_missed=3)
    instance = small_instance()
    plan = plan_on(instance, "edge1", "edge3")
    decider = deployed_decider(plan, timing)
    t, last_edge1 = 0.0, None
    replan_at = None
    while t < 5.0 and replan_at is None:
        t = round(t + 0.05, 3)
        if abs(t / 0.2 - round(t / 0.2)) < 1e-9:         # every heartbeat interval
            beat_all(decider, plan, t, skip=frozenset({"edge1"}) if t > 1.0 else frozenset())
            if t <= 1.0:
                last_edge1 = t
        actions = decider.tick(t)
        suspected = events(actions, "node.suspected")
        if suspected:
            assert [e.fields["host"] for e in suspected] == ["edge1"]
            assert suspected[0].fields["source"] == "heartbeat"
        if of(actions, Replan):
            replan_at = t
            (replan,) = of(actions, Replan)
    assert last_edge1 == 1.0 and replan_at is not None
    # detected after 3 missed beats (0.6 s), within one loop step, never before
    assert 0.6 < replan_at - last_edge1 <= 0.6 + 0.05 + 1e-9
    assert replan.kind == "failure" and replan.live == {"edge2", "edge3"}
    assert replan.base is plan
    # the new epoch, then the pod stuck on the dead node, then the old epochs
    new = plan_on(instance, "edge2", "edge3")
    (deploy,) = of(decider.planned("failure", new, t), Deploy)
    assert deploy.epoch == 2
    assert decider.deployed(2, t) == [ForceDelete(frozenset({"edge1"})), Prune(2)]


def test_not_ready_alone_is_dead() -> None:
    plan = plan_on(small_instance(), "edge1", "edge3")
    decider = deployed_decider(plan)
    beat_all(decider, plan, 0.1)
    assert not decider.tick(0.15)
    # heartbeats keep coming, but the API says NotReady: dead at once
    decider.node_event("MODIFIED", node("edge1", ready="False"))
    beat_all(decider, plan, 0.2)
    actions = decider.tick(0.2)
    (suspected,) = events(actions, "node.suspected")
    assert suspected.fields == {"host": "edge1", "source": "api", "reason": "NotReady (API)",
                                "serving": True}
    (replan,) = of(actions, Replan)
    assert replan.live == {"edge2", "edge3"}
    # a cordoned spare is not used either
    decider.node_event("MODIFIED", node("edge2", unschedulable=True))
    assert events(decider.tick(0.25), "node.suspected")[0].fields["reason"] == "cordoned (API)"
    assert decider.usable() == {"edge3"}


def test_back_ready_but_heartbeats_silent_is_still_dead() -> None:
    # two nodes, each can hold one segment only: losing either leaves no plan
    instance = small_instance(memory={"edge1": 12 * MiB, "edge2": 12 * MiB, "edge3": 4 * MiB},
                              segment_memory=10 * MiB)
    plan = solve(restrict(instance, {"edge1", "edge2"}))
    assert {s.node for s in plan.stages} == {"edge1", "edge2"}
    decider = deployed_decider(plan, candidates=("edge1", "edge2"))
    beat_all(decider, plan, 0.1)
    decider.node_event("MODIFIED", node("edge1", ready="Unknown"))
    (replan,) = of(decider.tick(0.2), Replan)
    with pytest.raises(InfeasibleError) as problem:
        solve(restrict(instance, set(replan.live)))
    actions = decider.plan_failed(replan.kind, str(problem.value), 0.3, infeasible=True)
    assert events(actions, "plan.infeasible")[0].fields["live"] == ["edge2"]
    assert of(actions, ForceDelete) == [ForceDelete(frozenset({"edge1"}))]
    # the API says Ready again, but its stage has not beaten since: still dead, no re-plan
    decider.node_event("MODIFIED", node("edge1"))
    for step in range(1, 40):
        t = 0.3 + step * 0.05
        if step % 4 == 0:
            beat_all(decider, plan, t, skip=frozenset({"edge1"}))
        actions = decider.tick(t)
        assert not events(actions, "node.returned") and not of(actions, Replan)
    assert "edge1" in decider.dead and decider.usable() == {"edge2"}
    # its pod (recreated by the Deployment) beats for the epoch in force: whole again
    beat_all(decider, plan, 2.3)
    actions = decider.tick(2.3)
    assert [e.kind for e in actions if isinstance(e, Event)] == [
        "node.returned", "node.stable", "replan.requested"]      # no hold while waiting
    (retry,) = of(actions, Replan)
    assert retry.live == {"edge1", "edge2"}
    kept = decider.planned(retry.kind, solve(restrict(instance, set(retry.live))), 2.4)
    assert [e.kind for e in kept] == ["plan.kept"] and decider.waiting is None


def _returned_and_stable(margin: float) -> tuple[Decider, Instance, list[Any]]:
    """edge1 dies while serving, the stage moves to the slower edge2, edge1 comes back."""
    instance = small_instance(speeds={"edge1": 1.0, "edge2": 0.5, "edge3": 1.0})
    fast = plan_on(instance, "edge1", "edge3")          # bottleneck 10 ms
    slow = plan_on(instance, "edge2", "edge3")          # bottleneck 20 ms
    decider = deployed_decider(fast, ControlSettings(rejoin_hold_s=5.0, rejoin_margin=margin), 0.0)
    decider.node_event("MODIFIED", node("edge1", ready="False"))
    (replan,) = of(decider.tick(10.0), Replan)
    assert of(decider.planned(replan.kind, slow, 10.1), Deploy)[0].epoch == 2
    decider.deployed(2, 10.2)
    decider.node_event("MODIFIED", node("edge1"))
    returned = decider.tick(20.0)
    assert events(returned, "node.returned")[0].fields["hold_s"] == 5.0
    # stable only after the hold; a new suspicion meanwhile restarts it
    decider.node_event("MODIFIED", node("edge1", ready="False"))
    decider.tick(22.0)
    decider.node_event("MODIFIED", node("edge1"))
    decider.tick(23.0)
    t = 23.0
    while t < 27.85:
        t = round(t + 0.1, 3)
        actions = decider.tick(t)
        assert not of(actions, Replan), t
        assert "edge1" not in decider.usable()
    actions = decider.tick(28.0)
    assert [e.kind for e in actions if isinstance(e, Event)] == ["node.stable",
                                                                "replan.requested"]
    (rejoin,) = of(actions, Replan)
    assert rejoin.kind == "rejoin" and "edge1" in rejoin.live
    return decider, instance, [rejoin, fast, slow]


def test_rejoin_only_after_the_hold_and_by_the_margin() -> None:
    # 10 ms instead of 20 ms is better by 50%: with a 10% margin it moves back
    decider, _, (rejoin, fast, _slow) = _returned_and_stable(margin=0.10)
    actions = decider.planned(rejoin.kind, fast, 28.1)
    assert events(actions, "rejoin.accepted")[0].fields["current_bottleneck_ms"] == 20.0
    assert of(actions, Deploy)[0].epoch == 3
    # with a 60% margin the same candidate is not enough
    decider, _, (rejoin, fast, slow) = _returned_and_stable(margin=0.60)
    actions = decider.planned(rejoin.kind, fast, 28.1)
    assert [e.kind for e in actions] == ["rejoin.declined"] and decider.plan is slow
    assert decider.epoch == 2


def test_a_node_found_dead_by_its_heartbeats_needs_a_sign_of_life() -> None:
    """Moved away from, a crashed node is not expected to beat any more, and the API still
    says Ready for tens of seconds: that alone must not bring it back."""
    def crashed() -> Decider:
        plan = plan_on(small_instance(), "edge1", "edge3")
        decider = deployed_decider(plan, ControlSettings(rejoin_hold_s=5.0, api_grace_s=60.0))
        beat_all(decider, plan, 0.2)
        replans: list[Replan] = []
        for step in range(1, 17):           # the loop ticks often; edge3 beats on
            t = round(0.2 + step * 0.05, 3)
            if step % 4 == 0:
                beat_all(decider, plan, t, skip=frozenset({"edge1"}))
            replans += of(decider.tick(t), Replan)
        assert len(replans) == 1 and decider.dead["edge1"].source == "heartbeat"
        decider.planned(replans[0].kind, plan_on(small_instance(), "edge2", "edge3"), 1.0)
        decider.deployed(2, 1.0)
        return decider

    def first_return(decider: Decider, start: float, until: float) -> float | None:
        t = start
        while t < until:
            t = round(t + 0.25, 3)
            if events(decider.tick(t), "node.returned"):
                return t
        return None

    # the API never sees it down: only after its grace period is the node alive again
    decider = crashed()
    assert first_return(decider, 1.0, 60.75) is None
    assert first_return(decider, 60.75, 62.0) == 61.0
    # the API sees it go NotReady (its grace period) and Ready again: back at once
    decider = crashed()
    decider.node_event("MODIFIED", node("edge1", ready="Unknown"))
    decider.tick(40.0)
    decider.node_event("MODIFIED", node("edge1"))
    assert events(decider.tick(45.0), "node.returned")[0].fields["hold_s"] == 5.0


def test_infeasible_when_memory_does_not_fit_then_retried_when_a_node_returns() -> None:
    # edge1 holds both segments, edge2 one, edge3 none: every plan needs edge1
    instance = small_instance(memory={"edge1": 130 * MiB, "edge2": 70 * MiB, "edge3": 30 * MiB},
                              segment_memory=60 * MiB)
    decider = Decider(EDGES)
    decider.nodes_listed([node(n) for n in EDGES])

    def run_plan(replan: Replan, now: float) -> list[Any]:
        try:
            plan = solve(restrict(instance, set(replan.live)))
        except InfeasibleError as exc:
            return decider.plan_failed(replan.kind, str(exc), now, infeasible=True)
        return decider.planned(replan.kind, plan, now)

    (deploy,) = of(run_plan(of(decider.tick(0.0), Replan)[0], 0.0), Deploy)
    assert "edge1" in {s.node for s in deploy.plan.stages}
    decider.deployed(deploy.epoch, 0.1)
    decider.node_event("MODIFIED", node("edge1", ready="False"))
    (replan,) = of(decider.tick(1.0), Replan)
    infeasible = run_plan(replan, 1.1)
    (event,) = events(infeasible, "plan.infeasible")
    assert "memory" in event.fields["reason"] and event.fields["live"] == ["edge2", "edge3"]
    # waiting, not spinning: no re-plan while nothing changes
    assert all(not of(decider.tick(1.1 + i * 0.05), Replan) for i in range(1, 100))
    decider.node_event("MODIFIED", node("edge1"))
    (retry,) = of(decider.tick(6.2), Replan)
    assert retry.live == set(EDGES)
    outcome = run_plan(retry, 6.3)
    assert not events(outcome, "plan.infeasible") and decider.waiting is None


def test_a_stage_that_never_serves_fails_after_the_deploy_timeout() -> None:
    plan = plan_on(small_instance(), "edge1", "edge3")
    decider = Decider(EDGES, ControlSettings(deploy_timeout_s=30.0))
    decider.nodes_listed([node(n) for n in EDGES])
    decider.planned("initial", plan, 0.0)
    decider.deployed(1, 0.0)
    decider.pod_event("ADDED", pod(1, 1, "edge3"))
    decider.pod_event("ADDED", pod(0, 1, "edge1", ready=False))     # e.g. an OOM loop
    for t in (1.0, 10.0, 29.9):
        assert not events(decider.tick(t), "node.suspected")
    actions = decider.tick(30.1)
    assert events(actions, "node.suspected")[0].fields["source"] == "deploy"
    assert of(actions, Replan)[0].live == {"edge2", "edge3"}


def test_our_own_stall_is_not_taken_for_silence() -> None:
    plan = plan_on(small_instance(), "edge1", "edge3")
    decider = deployed_decider(plan)
    beat_all(decider, plan, 0.1)
    assert not decider.tick(0.15)
    # the loop did not run for 2 s: nobody could have been heard meanwhile
    actions = decider.tick(2.15)
    assert [a.kind for a in actions] == ["controller.stalled"]
    assert not events(decider.tick(2.2), "node.suspected")


def test_only_beats_of_the_epoch_in_force_count() -> None:
    plan = plan_on(small_instance(), "edge1", "edge3")
    decider = deployed_decider(plan)
    assert decider.heartbeat("edge1", 1, 0, 0.1)
    assert not decider.heartbeat("edge1", 2, 0, 0.1)         # a future (or foreign) epoch
    assert not decider.heartbeat("edge1", 1, 1, 0.1)         # not the stage it holds
    assert not decider.heartbeat("edge2", 1, 0, 0.1)         # not in the plan
    assert not decider.heartbeat("edge1", 1, 7, 0.1)


def test_a_restarted_controller_continues_after_the_latest_epoch() -> None:
    def obj(epoch: str, name: str = "x") -> client.V1ConfigMap:
        return client.V1ConfigMap(metadata=client.V1ObjectMeta(
            name=name, labels={k8s.LABEL_NAME: "edgepipe", k8s.LABEL_EPOCH: epoch}))
    foreign = client.V1ConfigMap(metadata=client.V1ObjectMeta(
        name="other", labels={k8s.LABEL_NAME: "other", k8s.LABEL_EPOCH: "99"}))
    assert latest_epoch([obj("3"), obj("12"), obj("bad"), foreign]) == 12
    assert latest_epoch([]) == 0


# --- a tiny model the real planner and splitter work on ------------------------------------

def build_chain(path: Path) -> int:
    """x -> (MatMul, Relu) x 3 -> MatMul -> y; returns its number of segments."""
    rng = np.random.default_rng(0)
    dims = [16, 32, 32, 32, 8]
    inits, nodes, prev = [], [], "x"
    for i in range(4):
        inits.append(numpy_helper.from_array(
            rng.standard_normal((dims[i], dims[i + 1])).astype(np.float32), f"W{i}"))
        out = "y" if i == 3 else f"m{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [out]))
        prev = out
        if i < 3:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            prev = f"r{i}"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return cuts.analyze(model).segment_count


def chain_instance(segments: int) -> Instance:
    # heavy compute, fast links: the best plan spreads the chain over all three nodes
    return Instance([Segment(10.0, 1 * MiB, 128) for _ in range(segments)], 64,
                    [Node(n, 1.0, 64 * MiB) for n in EDGES], "dispatcher",
                    {(a, b): 1000.0 for a in ("dispatcher", *EDGES) for b in EDGES if a < b})


SETTINGS_NODES = {**{n: NodeResources(0.5, 256 * MiB) for n in EDGES},
                  "dispatcher": NodeResources(0.5, 512 * MiB)}


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("k3h-chain")
    model = root / "chain.onnx"
    instance = chain_instance(build_chain(model))
    return {"root": root, "model": model, "instance": instance,
            "version": VersionInfo(1, model, sha256_file(model), instance, str(model))}


def test_a_replan_gives_manifests_on_live_nodes_only(chain: dict[str, Any], tmp_path) -> None:
    planner = Planner(tmp_path, "auto", 2.0, 0, 0.05)
    decider = Decider(EDGES)
    decider.nodes_listed([node(n) for n in (*EDGES, "dispatcher")])
    (first,) = of(decider.tick(0.0), Replan)
    prepared = planner.prepare(initial_request(chain["version"], first.live, first.reason, None))
    (deploy,) = of(decider.planned(first.kind, prepared.plan, 0.0), Deploy)
    assert {s.node for s in deploy.plan.stages} == set(EDGES)
    decider.deployed(deploy.epoch, 0.1)
    lost = deploy.plan.stages[1].node
    decider.node_event("MODIFIED", node(lost, ready="False"))
    (replan,) = of(decider.tick(1.0), Replan)
    prepared = planner.prepare(PlanRequest(replan.kind, replan.reason, chain["version"],
                                           replan.live, replan.base))
    (deploy,) = of(decider.planned(replan.kind, prepared.plan, 1.1), Deploy)
    live = set(EDGES) - {lost}
    assert deploy.epoch == 2 and {s.node for s in deploy.plan.stages} <= live

    models, directory = stage_models(prepared)
    controller_keys = KeyPair.generate()
    settings = epoch_settings(K8sSettings(nodes=SETTINGS_NODES, controller_node="dispatcher"),
                              deploy.epoch, len(models), controller_keys)
    manifests = k8s.epoch_manifests(deploy.plan, models, settings)
    for manifest in manifests:
        for version in ("1.30.0", NEWEST):
            kubernetes_validate.validate(manifest, version, strict=True)
    deployments = [m for m in manifests if m["kind"] == "Deployment"]
    assert len(deployments) == len(deploy.plan.stages)
    for deployment, stage in zip(deployments, deploy.plan.stages):
        pod_spec = deployment["spec"]["template"]["spec"]
        assert pod_spec["nodeSelector"] == {"kubernetes.io/hostname": stage.node}
        assert deployment["metadata"]["labels"][k8s.LABEL_EPOCH] == "2"
    assert lost not in json.dumps(manifests)        # not in any selector, label or config
    (config,) = [m for m in manifests if m["kind"] == "ConfigMap"]
    worker = json.loads(config["data"]["stage-0.json"])
    assert worker["epoch"] == 2 and worker["heartbeat"].endswith(":18000")
    # the workers encrypt their heartbeats to the key the receiver serves with
    assert json.loads(config["data"]["curve-public.json"])["controller"] == \
        controller_keys.public.decode()
    # the files the model server will hand out are the split's, with the hashes named
    for model in models:
        assert sha256_file(directory / model.file) == model.sha256


# --- heartbeats: a real worker, the real receiver ------------------------------------------

def build_relu(path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def wait_until(condition: Any, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return bool(condition())


def test_parse_heartbeat_rejects_what_is_not_one() -> None:
    good = encode_control("stage_heartbeat", host="edge1", epoch=3, stage=0, seq=1)
    assert parse_heartbeat(good, 1.0).host == "edge1"
    bad = [
        [b"\xff\xfe"], [b"not json"], [b"[]"], [json.dumps({"type": "stage_heartbeat"}).encode()],
        encode_control("heartbeat", host="edge1", seq=1, workers=[]),   # the agent's kind
        [b'{"type":"stage_heartbeat","host":"edge1","epoch":3,"stage":0,"seq":1,"x":1}'],
        [b'{"type":"stage_heartbeat","host":"../etc","epoch":3,"stage":0,"seq":1}'],
        [b'{"type":"stage_heartbeat","host":"edge1","epoch":0,"stage":0,"seq":1}'],
        [b'{"type":"stage_heartbeat","host":"edge1","epoch":true,"stage":0,"seq":1}'],
        [b'{"type":"stage_heartbeat","host":"edge1","epoch":3,"stage":-1,"seq":1}'],
        [b'{"type":"stage_heartbeat","host":"edge1","epoch":NaN,"stage":0,"seq":1}'],
        [b'{"type":"stage_heartbeat","host":"edge1","host":"edge2","epoch":3,"stage":0,'
         b'"seq":1}'],
        [good[0], b"extra part"],
        [good[0] + b" " * MAX_STAGE_HEARTBEAT_BYTES],
    ]
    for frames in bad:
        with pytest.raises(FrameError):
            parse_heartbeat(frames, 1.0)


@pytest.fixture
def worker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("k3h-worker")


def test_a_real_worker_heartbeats_to_the_receiver(worker_dir: Path) -> None:
    """The pod's path: the worker reads its CURVE keys as mounted by testbed.k8s.manifests
    (EDGEPIPE_CURVE_DIR, curve-public.json beside the config) and beats to the controller,
    whose receiver is a CURVE server with the controller's keypair."""
    import logging
    controller_keys, own = KeyPair.generate(), KeyPair.generate()
    beats: list[Any] = []
    receiver = HeartbeatReceiver("tcp://127.0.0.1:*", beats.append,
                                 logging.getLogger("test"), controller_keys).start()
    build_relu(worker_dir / "stage.onnx")
    curve_dir = worker_dir / "curve"
    curve_dir.mkdir()
    (curve_dir / "own.secret").write_text(own.secret.decode())
    (worker_dir / "curve-public.json").write_text(json.dumps(
        {"stage-0": own.public.decode(), "controller": controller_keys.public.decode()}))
    config = {"host": "edge1", "epoch": 3, "stage": 0, "version": 1,
              "model": str(worker_dir / "stage.onnx"), "bind": "tcp://127.0.0.1:*",
              "next": "tcp://127.0.0.1:9", "inputs": ["x"], "outputs": ["y"],
              "heartbeat": receiver.address, "heartbeat_ms": 50}
    (worker_dir / "stage.json").write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "EDGEPIPE_CURVE_DIR": str(curve_dir)}
    log = worker_dir / "worker.log"
    with open(log, "w") as stderr:
        worker = subprocess.Popen([sys.executable, "-m", "stage_image.worker",
                                   str(worker_dir / "stage.json")], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=stderr)
    ctx = zmq.Context()
    try:
        assert wait_until(lambda: len(beats) >= 5, 60), log.read_text()[-2000:]
        assert {(b.host, b.epoch, b.stage) for b in beats} == {("edge1", 3, 0)}
        seqs = [b.seq for b in beats]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

        # garbage from a client that does know the key: every frame refused, none fatal
        garbage = ctx.socket(zmq.PUSH)
        garbage.linger = 0
        apply_client(garbage, KeyPair.generate(), controller_keys.public)
        garbage.connect(receiver.address)
        frames = [[b"not json"], [b'{"type":"stage_heartbeat","host":"edge1"}'],
                  encode_control("hello", host="edge1", pid=1),
                  [b'{"type":"stage_heartbeat","host":"edge1","epoch":3,"stage":0,"seq":1,'
                   b'"evil":"__import__(\'os\')"}'],
                  encode_control("stage_heartbeat", host="edge2", epoch=3, stage=0, seq=1)
                  + [b"trailer"]]
        for parts in frames:
            garbage.send_multipart(parts)
        assert wait_until(lambda: receiver.rejected == len(frames), 10)
        # a frame over the size limit never reaches us (ZeroMQ drops the peer)
        garbage.send(b"x" * (MAX_STAGE_HEARTBEAT_BYTES + 1))
        # a client without the controller's public key cannot even connect
        intruder = ctx.socket(zmq.PUSH)
        intruder.linger = 0
        intruder.connect(receiver.address)
        intruder.send_multipart(encode_control("stage_heartbeat", host="intruder", epoch=3,
                                               stage=0, seq=1))
        before = len(beats)
        assert wait_until(lambda: len(beats) >= before + 5, 10)      # the worker still beats
        assert all(b.host == "edge1" for b in beats)
        assert receiver.rejected == len(frames)
        garbage.close()
        intruder.close()

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0, log.read_text()[-2000:]
        time.sleep(0.3)                        # beats already on their way arrive
        stopped = len(beats)
        time.sleep(0.3)
        assert len(beats) == stopped           # no beats from a stopped worker
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        ctx.term()
        receiver.stop()


# --- allow-lists: a stage pod and the sink admit the keys the manifests name ------------------

def _keyed_push(ctx: zmq.Context, address: str, own: KeyPair, server_public: bytes) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.linger = 0
    apply_client(sock, own, server_public)
    sock.connect(address)
    return sock


def _try_send(sock: zmq.Socket, frames: list[Any]) -> None:
    """Queue without waiting: a refused handshake leaves nothing to send to."""
    try:
        sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
    except zmq.Again:
        pass


def test_a_stage_pod_admits_frames_from_its_upstream_only(worker_dir: Path) -> None:
    """Stage 1 of a k3s epoch, started as its pod would be (its config from the epoch's
    ConfigMap, its own secret key mounted): frames from stage 0's key are computed and
    forwarded; frames from the controller's key (a key of the same deployment, not stage 1's
    upstream) and from a stranger's never get in."""
    from stage_image.wire import encode_tensors
    from tests.test_k8s import PLAN_B, models, plan
    from tests.test_k8s import settings as epoch_settings_of

    keys = k8s.generate_deployment_keys(k8s.endpoint_names(3))
    manifests = k8s.epoch_manifests(plan(PLAN_B), models(3), epoch_settings_of(curve_keys=keys))
    (config_map,) = [m for m in manifests if m["kind"] == "ConfigMap"]
    config = json.loads(config_map["data"]["stage-1.json"])
    assert config["upstream"] == [keys["stage-0"].public.decode()]
    ctx = zmq.Context()
    # stage 2 as the next hop: a CURVE server with stage 2's key, admitting anyone
    downstream = ctx.socket(zmq.PULL)
    downstream.linger = 0
    apply_server(downstream, keys["stage-2"])
    next_port = downstream.bind_to_random_port("tcp://127.0.0.1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    build_relu(worker_dir / "stage.onnx")
    # only the addresses and the model change: loopback instead of Services, a relu stage
    config.update(model=str(worker_dir / "stage.onnx"), bind=f"tcp://127.0.0.1:{port}",
                  next=f"tcp://127.0.0.1:{next_port}", inputs=["x"], outputs=["y"])
    for field in ("heartbeat", "heartbeat_ms"):
        config.pop(field, None)
    pod_dir = worker_dir / "pod1"
    (pod_dir / "curve").mkdir(parents=True)
    (pod_dir / "stage.json").write_text(json.dumps(config))
    (pod_dir / "curve-public.json").write_text(config_map["data"]["curve-public.json"])
    (pod_dir / "curve" / "own.secret").write_text(keys["stage-1"].secret.decode())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "EDGEPIPE_CURVE_DIR": str(pod_dir / "curve")}
    log = pod_dir / "worker.log"
    with open(log, "w") as stderr:
        worker = subprocess.Popen([sys.executable, "-m", "stage_image.worker",
                                   str(pod_dir / "stage.json")], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=stderr)
    senders = []
    try:
        address, public = config["bind"], keys["stage-1"].public

        def frame(rid: int) -> list[Any]:
            return encode_tensors(rid, config["epoch"], config["version"], 0.0,
                                  {"x": np.ones((1, 4), np.float32)})

        for rid, own in enumerate((keys["controller"], KeyPair.generate(), keys["stage-2"])):
            senders.append(_keyed_push(ctx, address, own, public))
            for _ in range(20):
                _try_send(senders[-1], frame(100 + rid))
        senders.append(_keyed_push(ctx, address, keys["stage-0"], public))
        senders[-1].send_multipart(frame(7), copy=False)
        received: list[int] = []
        poller = zmq.Poller()
        poller.register(downstream, zmq.POLLIN)

        def drain() -> bool:
            while poller.poll(50):
                received.append(json.loads(downstream.recv_multipart()[0])["rid"])
            return bool(received)

        assert wait_until(drain, 60), log.read_text()[-2000:]
        time.sleep(0.5)             # anything else admitted would be on its way by now
        drain()
        assert received == [7]
    finally:
        for sock in senders:
            sock.close(0)
        downstream.close(0)
        ctx.term()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def test_the_k3s_sink_admits_the_keys_the_loop_admits(tmp_path: Path) -> None:
    """The controller pod's sink (testbed.k8s.workload) with CurveZMQ: a result from a key
    the loop admitted (an epoch's last stage) reaches the dispatcher; one from any other key
    (an earlier stage, a stranger) never does, nor from the last stage once it is dropped."""
    import logging

    from stage_image.wire import encode_tensors
    from testbed.control.dispatcher import Workload
    from testbed.k8s.workload import WorkloadHost

    controller, last, first = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    host = WorkloadHost(Workload(), tmp_path, tmp_path / "model.onnx", "0" * 64,
                        tmp_path / "events.jsonl", lambda *a, **k: None,
                        logging.getLogger("test"), lambda: {"state": "planning"},
                        "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", controller,
                        KeyPair.generate().public.decode()).start()
    ctx = zmq.Context()
    senders = []
    result = encode_tensors(3, 1, 1, 0.0, {"y": np.zeros((1, 4), np.float32)})
    try:
        host.admit([last.public.decode()])
        for own in (first, KeyPair.generate()):
            senders.append(_keyed_push(ctx, host.sink_address, own, controller.public))
            for _ in range(20):
                _try_send(senders[-1], result)
        senders.append(_keyed_push(ctx, host.sink_address, last, controller.public))
        senders[-1].send_multipart(result, copy=False)
        # no request was sent: an admitted result is counted as unknown
        assert wait_until(lambda: host.dispatcher.unknown_results >= 1, 30)
        time.sleep(0.5)             # anything else admitted would be counted by now
        assert host.dispatcher.unknown_results == 1
        host.admit([])              # the epoch pruned: a new connection is refused
        senders.append(_keyed_push(ctx, host.sink_address, last, controller.public))
        for _ in range(20):
            _try_send(senders[-1], result)
        time.sleep(0.5)
        assert host.dispatcher.unknown_results == 1
    finally:
        for sock in senders:
            sock.close(0)
        ctx.term()
        host.stop()


# --- the whole loop against a fake API server ----------------------------------------------

@pytest.fixture
def fake_cluster() -> Iterator[tuple[Any, client.ApiClient]]:
    with serve_fake_cluster() as served:
        yield served


def test_the_loop_replans_when_a_stage_goes_silent(chain: dict[str, Any], fake_cluster,
                                                   tmp_path_factory) -> None:
    import logging
    cluster, api = fake_cluster
    work = tmp_path_factory.mktemp("k3h-loop")
    settings = K8sSettings(nodes=SETTINGS_NODES, controller_node="dispatcher",
                           heartbeat_ms=50)
    inputs = ControllerInputs(instance=chain["instance"].to_json(),
                              model_sha256=chain["version"].sha256, time_limit_s=1.0)
    (work / "model.onnx").write_bytes(chain["model"].read_bytes())
    events_path = work / "events.jsonl"
    controller = K3sController(
        settings, inputs, work, work / "model.onnx",
        # 6 x 50 ms: short, yet not so short that a busy test machine fakes a crash
        ControlSettings(heartbeat_ms=50, suspect_after_missed=6, rejoin_hold_s=0.5,
               deploy_timeout_s=60.0),
        logging.getLogger("k3h-loop"), events_path,
        backend=K3sBackend(settings, api=api),
        model_server=ModelServer("127.0.0.1", 0), heartbeat_bind="tcp://127.0.0.1:*")
    assert controller.receiver is not None and controller.keys is not None
    loop = threading.Thread(target=controller.run, daemon=True)
    loop.start()

    def deployed(epoch: int) -> dict[str, Any] | None:
        return next((e for e in read_events(events_path)
                     if e["type"] == "plan.deployed" and e["epoch"] == epoch), None)

    ctx = zmq.Context()
    beating: dict[str, tuple[int, int]] = {}        # host -> (epoch, stage)
    stop = threading.Event()

    def beat() -> None:
        sock = ctx.socket(zmq.PUSH)
        sock.linger = 0
        apply_client(sock, KeyPair.generate(), controller.keys.public)
        sock.connect(controller.receiver.address)
        seq = 0
        while not stop.wait(0.05):
            for host, (epoch, stage) in list(beating.items()):
                seq += 1
                sock.send_multipart(encode_control("stage_heartbeat", host=host, epoch=epoch,
                                                   stage=stage, seq=seq))
        sock.close()

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        assert wait_until(lambda: deployed(7) is not None, 60), read_events(events_path)
        first = deployed(7)
        hosts = first["hosts"]
        assert len(hosts) >= 2
        for stage, host in enumerate(hosts):
            beating[host] = (7, stage)
        time.sleep(0.5)         # beats of epoch 7 arrive: silence now means something
        lost = hosts[0]
        cluster.down.add(lost)
        del beating[lost]
        stopped = time.time()
        assert wait_until(lambda: deployed(8) is not None, 60), read_events(events_path)
        log = read_events(events_path)
        suspected = [e for e in log if e["type"] == "node.suspected" and e["host"] == lost]
        assert suspected[0]["source"] == "heartbeat"
        assert suspected[0]["t"] - stopped < 2.0       # 300 ms of silence, plus slack
        assert lost not in deployed(8)["hosts"]
        kinds = [e["type"] for e in log]
        assert kinds.index("replan.requested", kinds.index("node.suspected")) < \
            kinds.index("plan.deployed", kinds.index("node.suspected"))
        computed = [e for e in log if e["type"] == "plan.computed"]
        assert [e["epoch"] for e in computed] == [7, 8] and computed[1]["kind"] == "failure"
        # what reached the API: epoch 8's Deployments, valid, on live nodes only
        applied = [(kind, body) for method, kind, _, body in cluster.requests
                   if method == "PATCH"]
        for _, body in applied:
            kubernetes_validate.validate(body, NEWEST, strict=True)
        epoch8 = [body for kind, body in applied if kind == "deployments"
                  and body["metadata"]["labels"][k8s.LABEL_EPOCH] == "8"]
        selectors = {b["spec"]["template"]["spec"]["nodeSelector"]["kubernetes.io/hostname"]
                     for b in epoch8}
        assert selectors and lost not in selectors
        # the pod stuck on the dead node is force-deleted; epoch 6's ConfigMap is pruned
        assert wait_until(lambda: any(e["type"] == "pods.force_deleted"
                                      for e in read_events(events_path)), 10)
        forced = {name: query for method, kind, name, query in cluster.requests
                  if method == "DELETE" and kind == "pods"}
        assert "gracePeriodSeconds=0" in forced["edgepipe-stage-0-e7"]
        assert wait_until(lambda: any(r[:3] == ("DELETE", "configmaps", "edgepipe-e6-stages")
                                      for r in cluster.requests), 10)
        # the init containers' URL serves the stage model of the hash they check
        init = epoch8[0]["spec"]["template"]["spec"]["initContainers"][0]["command"]
        url = f"http://127.0.0.1:{controller.model_server.port}/models/{init[4]}.onnx"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200 and len(response.read()) > 0
    finally:
        stop.set()
        beater.join(5)
        controller.stop()
        loop.join(30)
        ctx.term()
    assert not loop.is_alive()
    assert read_events(events_path)[-1]["type"] == "controller.stopped"


def test_the_inputs_round_trip_and_the_controller_pod_reads_them(chain: dict[str, Any],
                                                                   tmp_path) -> None:
    settings = K8sSettings(nodes=SETTINGS_NODES, controller_node="dispatcher")
    plan = solve(chain["instance"])
    inputs = ControllerInputs(instance=chain["instance"].to_json(),
                              model_sha256=chain["version"].sha256, plan=plan.to_json())
    for name, text in inputs.files(settings).items():
        (tmp_path / name).write_text(text)
    assert k8s.load_controller_inputs(tmp_path) == (settings, inputs)
    stages = [k8s.StageModel(f"stage_{i:02d}.onnx", ["a"], ["b"], f"{i:x}" * 64, 10)
              for i in range(len(plan.stages))]
    manifests = k8s.manifests(plan, stages, settings, inputs)
    for manifest in manifests:
        kubernetes_validate.validate(manifest, NEWEST, strict=True)
    (config,) = [m for m in manifests if m["metadata"]["name"] == "edgepipe-controller-inputs"]
    (deployment,) = [m for m in manifests if m["metadata"]["name"] == "edgepipe-controller"
                     and m["kind"] == "Deployment"]
    pod_spec = deployment["spec"]["template"]["spec"]
    command = pod_spec["containers"][0]["command"]
    assert command[command.index("--inputs") + 1] == k8s.CONTROLLER_INPUT_DIR
    mounts = {m["name"]: m["mountPath"] for m in pod_spec["containers"][0]["volumeMounts"]}
    assert mounts["inputs"] == k8s.CONTROLLER_INPUT_DIR
    assert {v["name"]: v for v in pod_spec["volumes"]}["inputs"]["configMap"]["name"] == \
        config["metadata"]["name"]
    assert set(config["data"]) == {"settings.json", "instance.json", "controller.json",
                                   "plan.json"}
    # the command is one the controller accepts
    from testbed.k8s.loop import parse_args
    args = parse_args(command[3:])
    assert args.backend == "k3s" and str(args.inputs) == k8s.CONTROLLER_INPUT_DIR
    with pytest.raises(ValueError, match="plain file name"):
        ControllerInputs(instance={}, model_sha256="0" * 64,
                         model_file="../x.onnx").files(settings)


def test_the_controller_takes_the_model_only_whole_and_of_its_hash(tmp_path) -> None:
    import hashlib
    path = tmp_path / "model.onnx"
    whole = b"model bytes " * 1000
    sha = hashlib.sha256(whole).hexdigest()
    assert model_ready(path, sha, None) == (False, None)
    path.write_bytes(whole[:5000])                  # a copy under way
    ready, seen = model_ready(path, sha, None)
    assert not ready
    ready, seen = model_ready(path, sha, seen)      # held still, hashed: not the model
    assert not ready and seen is not None and seen[2]
    path.write_bytes(whole)
    os.utime(path, ns=(0, 10**9))                   # a new mtime even on a coarse clock
    ready, seen = model_ready(path, sha, seen)
    assert not ready                                # changed since: wait one more poll
    assert model_ready(path, sha, seen)[0]
