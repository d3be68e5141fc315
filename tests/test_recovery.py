"""Fault tolerance without root: the controller (+ dispatcher) and agents with their workers on
loopback, each "node" on its own 127.0.0.x address and in its own process group, so a node
can crash (SIGKILL to the group), be cut off and come back (SIGSTOP/SIGCONT: its TCP
connections stay up and go silent, like a partition) or restart (a new agent). A small chain
model gives plans of several stages. Each test checks the outcome a user sees (every request
answered once, correctly, against the version that served it) and the control-plane decisions
in events.jsonl (suspicion, re-plan, reuse, rejoin hold and margin, infeasible and back,
version switch and rollback). The rules themselves (testbed.control.policy) are unit-tested
first."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import zmq
from onnx import TensorProto, helper, numpy_helper

from partitioner.instance import Instance, Node, Plan, Segment, Stage
from testbed.control import policy
from testbed.experiment.results import read_events
from tests.processes import agent_workers, serves_port

ROOT = Path(__file__).resolve().parent.parent
DISPATCHER_IP = "127.0.0.31"
NODE_IPS = {f"edge{i}": f"127.0.0.{31 + i}" for i in range(1, 6)}
# ports in 32500-32949 (test_runtime_loopback uses 32000-32499): a block of 40 per test,
# two concurrent runs apart
PORT_BASE = 32500 + (os.getpid() % 2) * 250


# -- the rules, as pure functions -------------------------------------------------------------

def _instance(nodes: dict[str, float], segments: int = 6, memory: int = 1 << 30) -> Instance:
    return Instance([Segment(10.0, 100, 1000) for _ in range(segments)], 1000,
                    [Node(n, speed, memory) for n, speed in nodes.items()], "dispatcher",
                    {("dispatcher", n): 1000.0 for n in nodes}
                    | {(a, b): 1000.0 for a in nodes for b in nodes if a < b})


def test_repair_keeps_cuts_and_moves_only_lost_stages():
    inst = _instance({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0})
    base = Plan.of(inst, [Stage(0, 2, "a"), Stage(2, 4, "b"), Stage(4, 6, "c")], "auto", True)
    live = _instance({"a": 1.0, "c": 1.0, "d": 1.0})          # b is lost
    repairs = policy.repair_candidates(live, base)
    assert [[(s.first, s.end, s.node) for s in p.stages] for p in repairs] == [
        [(0, 2, "a"), (2, 4, "d"), (4, 6, "c")]]
    assert policy.repair_candidates(_instance({"a": 1.0, "c": 1.0}), base) == []


def test_reuse_rule_prefers_running_stages_within_tolerance():
    inst = _instance({"a": 1.0, "b": 1.0, "c": 1.0})
    fast = Plan.of(inst, [Stage(0, 3, "a"), Stage(3, 6, "b")], "auto", True)      # 30 ms
    held_plan = Plan.of(inst, [Stage(0, 2, "c"), Stage(2, 6, "b")], "x", False)   # 40 ms
    near = Plan.of(inst, [Stage(0, 3, "c"), Stage(3, 6, "a")], "x", False)        # 30 ms
    held = {policy.Held("c", 0, 3, 1), policy.Held("a", 3, 6, 1)}
    # `near` is as fast as the best and re-uses both stages: chosen
    choice = policy.choose([fast, near, held_plan], 1, held, 0.05)
    assert choice.plan is near and choice.reused == 2 and choice.within == 2
    # a plan 33% slower is never chosen for its reuse
    only_slow = {policy.Held("c", 0, 2, 1), policy.Held("b", 2, 6, 1)}
    assert policy.choose([fast, held_plan], 1, only_slow, 0.05).plan is fast
    assert policy.choose([fast, held_plan], 1, only_slow, 0.40).plan is held_plan
    # another version's workers are not re-used
    assert policy.choose([fast, near], 2, held, 0.05).reused == 0


def test_snapped_candidates_move_cuts_onto_loaded_stages():
    """One warm standby for two losses: a contingency plan whose cut is one cheap segment
    from a standby another loss's plan placed on the same node moves its cut there."""
    inst = _instance({"a": 1.0, "b": 1.0, "c": 1.0})
    inst.segments[3] = Segment(0.5, 100, 1000)
    solved = Plan.of(inst, [Stage(0, 3, "a"), Stage(3, 6, "c")], "auto", True)   # 30 ms
    standby = policy.Held("c", 4, 6, 1)
    snapped = policy.snapped_candidates(inst, [solved], 1, {standby})
    assert [[(s.first, s.end, s.node) for s in p.stages] for p in snapped] == [
        [(0, 4, "a"), (4, 6, "c")]]
    assert snapped[0].bottleneck_ms == pytest.approx(30.5)
    choice = policy.choose([solved, *snapped], 1, {standby}, 0.05)
    assert choice.plan is snapped[0] and choice.reused == 1
    # nothing to snap to: another version's stage, a node the plan does not use, or a
    # variant that re-uses no more than the plan itself
    assert policy.snapped_candidates(inst, [solved], 2, {standby}) == []
    assert policy.snapped_candidates(inst, [solved], 1, {policy.Held("b", 4, 6, 1)}) == []
    assert policy.snapped_candidates(inst, [solved], 1, {policy.Held("a", 0, 3, 1)}) == []


def _remote_instance() -> Instance:
    """Three fast nodes, one of them ("r") behind a 10 Mbit link from the model server; every
    segment's weights are 4 MB (3.2 s each over that link)."""
    segments = [Segment(10.0, 8_000_000, 1000, model_bytes=4_000_000) for _ in range(6)]
    nodes = {"a": 1.0, "b": 0.5, "r": 1.0}
    bandwidth = {("dispatcher", n): 1000.0 for n in nodes} | {("dispatcher", "r"): 10.0}
    bandwidth |= {(x, y): 1000.0 for x in nodes for y in nodes if x < y}
    return Instance(segments, 1000, [Node(n, v, 1 << 30) for n, v in nodes.items()],
                    "dispatcher", bandwidth)


def test_deploy_estimate_is_the_slowest_new_stage():
    inst = _remote_instance()
    plan = Plan.of(inst, [Stage(0, 2, "a"), Stage(2, 4, "r"), Stage(4, 6, "b")], "auto", True)
    # r: 8 MB over 10 Mbit (6.4 s) + 0.3 s + 8 MB at 100 MB a core-second (0.08 s)
    assert policy.stage_deploy_s(inst, plan.stages[1]) == pytest.approx(6.78)
    assert policy.deploy_estimate_s(inst, plan, 1, set()) == pytest.approx(6.78)
    assert policy.slowest_new_node(inst, plan, 1, set()) == "r"
    loaded = {policy.Held("r", 2, 4, 1)}          # a worker holds r's stage: b is slowest now
    assert policy.slowest_new_node(inst, plan, 1, loaded) == "b"
    assert policy.deploy_estimate_s(inst, plan, 1, loaded) == pytest.approx(
        8e6 * 8 / 1e9 + 0.3 + 8e6 / (100e6 * 0.5))
    every = {policy.Held(s.node, s.first, s.end, 1) for s in plan.stages}
    assert policy.deploy_estimate_s(inst, plan, 1, every) == 0.0
    assert policy.slowest_new_node(inst, plan, 1, every) is None


def test_quick_bridge_serves_first_only_when_much_sooner_and_not_much_slower():
    inst = _remote_instance()
    best = Plan.of(inst, [Stage(0, 2, "a"), Stage(2, 4, "r"), Stage(4, 6, "b")], "auto", True)
    bridge = Plan.of(inst, [Stage(0, 3, "a"), Stage(3, 6, "b")], "auto", True)   # 60 ms
    slow = Plan.of(inst, [Stage(0, 6, "b")], "auto", True)                         # 120 ms

    def estimate(plan: Plan) -> float:
        return policy.deploy_estimate_s(inst, plan, 1, set())

    assert best.bottleneck_ms < bridge.bottleneck_ms < slow.bottleneck_ms
    assert policy.quick_bridge([best, bridge, slow], best, estimate) is bridge
    # under half the rate of the plan it would stand in for: not a bridge
    assert policy.quick_bridge([best, slow], best, estimate) is None
    # r's stage already loaded: the best plan serves at once, nothing to bridge
    held = {policy.Held("r", 2, 4, 1)}
    assert policy.quick_bridge([best, bridge], best, lambda p: policy.deploy_estimate_s(
        inst, p, 1, held)) is None


def test_planner_bridges_a_failure_only(tmp_path):
    """After a failure the planner deploys a plan without the slow-to-reach node first and
    names the better one it stands in for; a rejoin (nothing is down) waits for the best."""
    from testbed.control.planning import PlanRequest, VersionInfo
    from testbed.control.sim.world import SimPlanner

    inst = _remote_instance()
    info = VersionInfo(1, tmp_path / "m.onnx", "ab" * 32, inst, "m")
    planner = SimPlanner(tmp_path, "optimal", 2.0, 0, 0.05)
    live = frozenset({"a", "b", "r"})
    failure = planner.prepare(PlanRequest("failure", "lost", info, live))
    assert failure.bridged is not None and "r" in {s.node for s in failure.bridged.stages}
    assert "r" not in {s.node for s in failure.plan.stages}
    assert failure.deploy_estimate_s <= policy.deploy_estimate_s(
        inst, failure.bridged, 1, set()) - policy.QUICK_GAIN_S
    summary = failure.summary()
    assert summary["bridged"]["hosts"] == [s.node for s in failure.bridged.stages]
    assert summary["deploy_estimate_s"] == round(failure.deploy_estimate_s, 2)
    rejoin = planner.prepare(PlanRequest("rejoin", "back", info, live))
    assert rejoin.bridged is None and rejoin.plan.bottleneck_ms < failure.plan.bottleneck_ms


def test_version_instance_keeps_the_cluster_cost_model(tmp_path):
    """A re-plan prices stages like the initial plan: same nodes, bandwidth and per-frame
    overhead (losing the overhead once made re-plans prefer other cuts than the first plan)."""
    from testbed.control.planning import restrict, version_instance
    from testbed.control.repository import Manifest

    base = _instance({"a": 0.5, "b": 1.0})
    base.frame_overhead_ms = 3.5
    manifest = Manifest(2, tmp_path, "0" * 64, 1, 0.0, "test",
                        [Segment(5.0, 10, 100)] * 3, 400, 15.0, 1000)
    inst = version_instance(base, manifest, base_reserve=3000)
    assert inst.frame_overhead_ms == 3.5
    assert inst.bandwidth_mbps == base.bandwidth_mbps and inst.input_bytes == 400
    assert [(n.name, n.speed, n.memory_bytes) for n in inst.nodes] == [
        ("a", 0.5, (1 << 30) + 2000), ("b", 1.0, (1 << 30) + 2000)]
    from partitioner.instance import plan_cost

    assert plan_cost(inst, [Stage(0, 3, "a")]).compute_ms == [pytest.approx((15.0 + 3.5) / 0.5)]
    live = restrict(inst, {"b"})                    # the re-plan after losing a
    assert [n.name for n in live.nodes] == ["b"] and live.frame_overhead_ms == 3.5
    assert set(live.bandwidth_mbps) == {("dispatcher", "b")}


def test_rejoin_margin():
    inst = _instance({"a": 1.0, "b": 1.0, "c": 1.0})
    current = Plan.of(inst, [Stage(0, 3, "a"), Stage(3, 6, "b")], "x", False)    # 30 ms
    same = Plan.of(inst, [Stage(0, 3, "c"), Stage(3, 6, "b")], "x", False)       # 30 ms
    better = Plan.of(inst, [Stage(0, 2, "a"), Stage(2, 4, "b"), Stage(4, 6, "c")], "x",
                     False)                                                       # 20 ms
    assert not policy.better_by_margin(same, current, 0.10)      # a returned equal node: no
    assert policy.better_by_margin(better, current, 0.10)
    assert not policy.better_by_margin(better, current, 0.40)


# -- a model and a cluster on loopback --------------------------------------------------------

def build_chain(path: Path, layers: int, seed: int) -> Path:
    """y = relu(...relu(x W1)... W_n): every tensor between two nodes is a cut, so the model
    has 2 x layers segments. Each seed gives other weights (another model version)."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = f"W{i}"
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((32, 32)) / 4).astype(np.float32), w))
        nodes.append(helper.make_node("MatMul", [prev, w], [f"m{i}"]))
        out = "y" if i == layers - 1 else f"r{i}"
        nodes.append(helper.make_node("Relu", [f"m{i}"], [out]))
        prev = out
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def chain_instance(hosts: dict[str, float], segments: int, memory: int) -> dict[str, Any]:
    """Compute-heavy segments (so plans spread over nodes), 100 bytes of memory each."""
    names = list(hosts)
    return {
        "segments": [{"compute_ms": 10.0, "memory_bytes": 100, "output_bytes": 128}
                     for _ in range(segments)],
        "input_bytes": 128,
        "nodes": [{"name": h, "speed": s, "memory_bytes": memory} for h, s in hosts.items()],
        "source": "dispatcher",
        "bandwidth_mbps": [["dispatcher", h, 1000.0] for h in names]
        + [[a, b, 1000.0] for i, a in enumerate(names) for b in names[i + 1:]]}


class Cluster:
    """Controller + agents as child processes; each agent leads its own process group (its
    workers inherit it), so a whole node is signalled at once, and only our processes."""

    def __init__(self, root: Path, hosts: dict[str, float], slot: int, layers: int = 3,
                 memory: int = 1 << 30, curve: bool = False, **config: Any) -> None:
        self.root, self.hosts = root, list(hosts)
        self.port = PORT_BASE + 40 * slot
        self.model = build_chain(root / "chain.onnx", layers, seed=1)
        (root / "instance.json").write_text(json.dumps(
            chain_instance(hosts, 2 * layers, memory)))
        self.run_dir = root / "run"
        self.ipc = f"ipc://{root}/control.sock"
        self.config = {
            "run_dir": str(self.run_dir), "model": str(self.model),
            "instance": str(root / "instance.json"),
            "hosts": {h: NODE_IPS[h] for h in hosts}, "dispatcher_ip": DISPATCHER_IP,
            "control_port": self.port, "sink_port": self.port + 1,
            "data_port_base": self.port + 2, "data_port_span": 38, "control_ipc": self.ipc,
            "heartbeat_ms": 100, "suspect_after_missed": 3,
            "planner": {"algorithm": "auto", "time_limit_s": 1.0},
            "workload": {"mode": "closed", "concurrency": 4, "duration_s": 6.0,
                         "timeout_s": 2.0, "drain_timeout_s": 8.0, "pool_size": 8},
            **config}
        self.curve_public: str | None = None
        if curve:
            from stage_image.security import KeyPair, save_keypair

            keys = KeyPair.generate()
            save_keypair(root / "controller.key", keys)
            self.config["curve_keypair"] = str(root / "controller.key")
            self.curve_public = keys.public.decode()
        (root / "controller.json").write_text(json.dumps(self.config))
        self.procs: dict[str, subprocess.Popen] = {}
        self.ctx = zmq.Context.instance()
        self.sock: zmq.Socket | None = None
        self.procs["controller"] = self._spawn(
            ["-m", "testbed.control.controller", str(root / "controller.json")], "controller")
        for host in self.hosts:
            self.start_agent(host)

    def _spawn(self, argv: list[str], name: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        log = open(self.root / f"{name}.log", "ab")
        with log:
            return subprocess.Popen([sys.executable, *argv], stdout=subprocess.DEVNULL,
                                    stderr=log, cwd=ROOT, env=env, start_new_session=True)

    def start_agent(self, host: str) -> None:
        self.procs[host] = self._spawn(
            ["-m", "stage_image.agent", "--host", host, "--controller",
             f"tcp://{DISPATCHER_IP}:{self.port}", "--data-dir", str(self.root / host),
             "--ip", NODE_IPS[host], "--heartbeat-ms", "100",
             *([f"--curve-server-key={self.curve_public}"] if self.curve_public else [])],
            f"agent_{host}")

    # -- the driver's side ---------------------------------------------------------------------

    def __call__(self, cmd: str, **fields: Any) -> dict[str, Any]:
        for _ in range(3):
            if self.sock is None:
                self.sock = self.ctx.socket(zmq.REQ)
                self.sock.setsockopt(zmq.LINGER, 0)
                self.sock.setsockopt(zmq.RCVTIMEO, 3000)
                self.sock.connect(self.ipc)
            self.sock.send_json({"cmd": cmd, **fields})
            try:
                return self.sock.recv_json()
            except zmq.Again:
                self.sock.close(0)
                self.sock = None
        raise AssertionError(f"the controller does not answer {cmd}")

    def wait(self, what: str, test: Callable[[dict[str, Any]], bool],
             timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self("status")
            assert status["state"] != "failed", status
            if test(status):
                return status
            time.sleep(0.05)
        raise AssertionError(f"never {what}; last status {json.dumps(status)[:1500]}")

    def wait_event(self, kind: str, timeout: float,
                   test: Callable[[dict[str, Any]], bool] = lambda e: True,
                   ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if event["type"] == kind and test(event):
                    return event
            time.sleep(0.05)
        raise AssertionError(f"no {kind} event within {timeout}s")

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.run_dir / "events.jsonl")

    def ready(self, timeout: float = 40) -> dict[str, Any]:
        """Deployed, and the standbys (if any) loaded."""
        return self.wait("ready", lambda s: s["state"] == "ready" and all(
            x["state"] == "ready" for x in s["standbys"]), timeout)

    def requests(self) -> list[dict[str, str]]:
        with (self.run_dir / "requests.csv").open() as handle:
            return list(csv.DictReader(handle))

    # -- faults --------------------------------------------------------------------------------

    def signal_node(self, host: str, sig: int) -> None:
        os.killpg(self.procs[host].pid, sig)

    def crash(self, host: str) -> None:
        self.signal_node(host, signal.SIGKILL)
        self.procs[host].wait()

    def worker_pids(self, host: str) -> set[str]:
        return set(agent_workers(self.procs[host].pid))

    def close(self) -> dict[str, int | None]:
        try:
            if self.procs["controller"].poll() is None:
                self("stop")
                self.procs["controller"].wait(10)
        finally:
            agents = [p for h, p in self.procs.items() if h != "controller" and p.poll() is None]
            for proc in agents:
                os.killpg(proc.pid, signal.SIGCONT)     # a frozen node cannot exit
                proc.send_signal(signal.SIGTERM)        # all at once: they stop in parallel
            deadline = time.monotonic() + 5
            for proc in self.procs.values():
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            if self.sock is not None:
                self.sock.close(0)
        return {h: p.returncode for h, p in self.procs.items()}


SLOTS = ["test_worker_death_replans_reuses_and_replays", "test_crash_and_partition",
         "test_rejoin_after_hold_and_margin_without_flapping",
         "test_infeasible_until_a_node_returns", "test_model_update_switch_and_rollback",
         "test_curve_encrypts_every_hop"]


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest):
    """Start a cluster (ports by test, so the tests never share one); always torn down."""
    made: list[Cluster] = []

    def make(hosts: dict[str, float], **config: Any) -> Cluster:
        made.append(Cluster(tmp_path, hosts, SLOTS.index(request.node.originalname),
                            **config))
        return made[-1]

    yield make
    for c in made:
        c.close()


def finish(c: Cluster) -> dict[str, Any]:
    done = c.wait("done", lambda s: s["state"] == "done", 40)
    assert done["completed"] == done["sent"] > 0, done
    assert (done["lost"], done["mismatched"]) == (0, 0), done
    rows = c.requests()
    assert len(rows) == done["sent"]
    assert len({r["rid"] for r in rows}) == len(rows)        # delivered once each
    assert {r["status"] for r in rows} == {"completed"}
    assert {r["mismatched"] for r in rows} == {"0"}
    return done


def kinds(c: Cluster) -> list[str]:
    return [e["type"] for e in c.events()]


# -- the scenarios ----------------------------------------------------------------------------

def test_worker_death_replans_reuses_and_replays(cluster):
    """A worker process dies (its agent lives): reported at once, the host is left out, the
    re-plan keeps the surviving workers (same processes), the spare's standby takes the lost
    stage, and everything is answered once."""
    c = cluster({"edge1": 1.0, "edge2": 1.0, "edge3": 1.0, "edge4": 1.0})
    ready = c.ready()
    hosts = [e["host"] for e in ready["endpoints"]]
    assert len(hosts) == 3, ready["endpoints"]                # 6 segments on 3 of 4 nodes
    before = {h: c.worker_pids(h) for h in hosts}
    assert c("start_workload")["ok"]
    time.sleep(1.5)
    victim = hosts[1]
    port = next(e["port"] for e in ready["endpoints"] if e["host"] == victim)
    pid = next(p for p in c.worker_pids(victim)
               if serves_port(p, port))
    killed_at = time.time()
    os.kill(int(pid), signal.SIGKILL)
    status = c.wait("re-planned", lambda s: s["epoch"] is not None and s["epoch"] >= 2, 10)
    done = finish(c)
    assert victim not in [e["host"] for e in status["endpoints"]]
    events = c.events()
    failed = next(e for e in events if e["type"] == "worker.failed" and e["host"] == victim)
    assert failed["t"] - killed_at < 0.5                      # reported at once, no heartbeat
    deployed = next(e for e in events if e["type"] == "plan.deployed" and e["epoch"] >= 2)
    # the two survivors and the standby that waited on the spare for the lost stage
    assert deployed["reused_stages"] == 3 and deployed["replayed"] > 0
    # the two surviving stages kept their processes: no restart, no reload
    for host in hosts:
        if host != victim:
            assert before[host] <= c.worker_pids(host), host
    assert done["replays"] > 0 and done["duplicates"] >= 0


def test_crash_and_partition(cluster):
    """A node is cut off (frozen: silent, connections up) and later comes back: suspected
    within a second, replaced at once by a warm standby, and on its return its worker loses
    the retired epoch's route and stays loaded as a standby; nothing it still sends for that
    epoch is delivered. Then a
    node crashes for good: the same again. Lost 0, mismatched 0, delivered once."""
    c = cluster({"edge1": 1.0, "edge2": 1.0, "edge3": 1.0, "edge4": 1.0, "edge5": 1.0},
                rejoin_hold_s=30.0, workload={"mode": "closed", "concurrency": 4,
                                              "duration_s": 7.0, "timeout_s": 2.0,
                                              "drain_timeout_s": 8.0, "pool_size": 8})
    # one standby per stage: whichever node is lost, its stage is waiting on a spare
    ready = c.wait("standbys loaded", lambda s: s["state"] == "ready" and len(
        s["standbys"]) == 3 and all(x["state"] == "ready" for x in s["standbys"]), 40)
    hosts = [e["host"] for e in ready["endpoints"]]
    assert not {s["host"] for s in ready["standbys"]} & set(hosts)
    assert c("start_workload")["ok"]
    time.sleep(1.0)
    cut = hosts[0]
    cut_at = time.time()
    c.signal_node(cut, signal.SIGSTOP)
    second = c.wait("re-planned", lambda s: s["epoch"] is not None and s["epoch"] >= 2, 5)
    suspected = c.wait_event("node.suspected", 1, lambda e: e["host"] == cut)
    assert suspected["t"] - cut_at < 1.0
    deployed = c.wait_event("plan.deployed", 1, lambda e: e["epoch"] == second["epoch"])
    assert deployed["reused_stages"] == 3                      # two survivors + one standby
    assert deployed["t"] - suspected["t"] < 0.5                # no model shipped or loaded
    time.sleep(1.0)
    c.signal_node(cut, signal.SIGCONT)                         # the partition heals
    c.wait_event("node.returned", 3, lambda e: e["host"] == cut)
    # its worker, still loaded, is kept as a standby; it is told epoch 1 is over and gives
    # up that route
    c.wait_event("standby.readopted", 3, lambda e: e["host"] == cut)
    c.wait("epoch 1 withdrawn on the returned node", lambda s: "stop epoch 1" in (
        c.root / f"agent_{cut}.log").read_text(), 5)
    time.sleep(0.5)
    crash = [e["host"] for e in c("status")["endpoints"]][1]
    crashed_at = time.time()
    c.crash(crash)
    c.wait_event("node.suspected", 2, lambda e: e["host"] == crash)
    done = finish(c)
    events = c.events()
    assert next(e for e in events if e["type"] == "node.suspected" and e["host"] == crash
                )["t"] - crashed_at < 1.0
    final = [e for e in events if e["type"] == "plan.deployed"][-1]
    assert crash not in final["hosts"] and cut not in final["hosts"]      # held for 30 s
    agent_log = (c.root / f"agent_{cut}.log").read_text()
    assert "stop epoch 1" in agent_log
    assert done["stale_results"] >= 0
    assert "rejoin.accepted" not in kinds(c)


def test_rejoin_after_hold_and_margin_without_flapping(cluster):
    """A fast node is lost (frozen) and the pipeline moves to a slow one. It comes back,
    flaps (frozen again within the hold), and comes back for good: it is used again only
    after a full, uninterrupted hold, and only because the plan with it is better by more
    than the margin. A healthy hand-over: nothing replayed at the switch, nothing lost."""
    c = cluster({"edge1": 1.0, "edge2": 1.0, "edge3": 0.25}, rejoin_hold_s=1.5,
                rejoin_margin=0.10, standby=False,
                workload={"mode": "closed", "concurrency": 4, "duration_s": 9.0,
                          "timeout_s": 2.0, "drain_timeout_s": 8.0, "pool_size": 8})
    ready = c.ready()
    assert sorted(e["host"] for e in ready["endpoints"]) == ["edge1", "edge2"]
    assert c("start_workload")["ok"]
    time.sleep(0.8)
    c.signal_node("edge1", signal.SIGSTOP)
    c.wait("moved to edge3", lambda s: "edge3" in [e["host"] for e in s["endpoints"]], 6)
    c.signal_node("edge1", signal.SIGCONT)
    c.wait_event("node.returned", 3, lambda e: e["host"] == "edge1")
    time.sleep(0.7)                                            # within the hold: flap
    c.signal_node("edge1", signal.SIGSTOP)
    time.sleep(0.6)
    c.signal_node("edge1", signal.SIGCONT)
    back = c.wait("back on edge1", lambda s: "edge1" in [e["host"] for e in s["endpoints"]],
                  8)
    done = finish(c)
    events = c.events()
    returns = [e for e in events if e["type"] == "node.returned" and e["host"] == "edge1"]
    stable = next(e for e in events if e["type"] == "node.stable" and e["host"] == "edge1")
    assert len(returns) >= 2
    assert stable["t"] - returns[-1]["t"] >= 1.5 - 0.05     # the hold restarted at the flap
    accepted = next(e for e in events if e["type"] == "rejoin.accepted")
    assert accepted["candidate_bottleneck_ms"] <= 0.9 * accepted["current_bottleneck_ms"]
    rejoined = next(e for e in events if e["type"] == "plan.deployed" and "edge1" in e["hosts"]
                    and e["epoch"] > 1)
    assert rejoined["handover"] and rejoined["replayed"] == 0
    assert rejoined["epoch"] == back["epoch"]
    # no flapping: exactly one move away and one move back
    assert [e["epoch"] for e in events if e["type"] == "plan.deployed"] == [1, 2, 3]
    assert done["lost"] == 0


def test_infeasible_until_a_node_returns(cluster):
    """Memory allows at most 3 of 6 segments per node: with one node left no plan fits. The
    controller says so, keeps serving status, and re-plans as soon as a node returns; the
    requests waiting meanwhile are answered then."""
    c = cluster({"edge1": 1.0, "edge2": 1.0, "edge3": 1.0}, memory=350, rejoin_hold_s=30.0,
                workload={"mode": "closed", "concurrency": 4, "duration_s": 8.0,
                          "timeout_s": 1.0, "drain_timeout_s": 10.0, "pool_size": 8})
    ready = c.ready()
    hosts = [e["host"] for e in ready["endpoints"]]
    assert c("start_workload")["ok"]
    time.sleep(1.0)
    c.crash(hosts[0])
    c.wait("re-planned", lambda s: s["epoch"] is not None and s["epoch"] >= 2, 6)
    survivors = [e["host"] for e in c("status")["endpoints"]]
    c.crash(survivors[0])
    status = c.wait("infeasible", lambda s: s["degraded"] is not None
                    and "memory" in str(s["degraded"]), 5)
    infeasible = c.wait_event("plan.infeasible", 1)
    assert "memory" in infeasible["reason"] and len(infeasible["live"]) == 1
    time.sleep(1.0)
    assert c("status")["sent"] == status["sent"]              # closed loop, nothing answered
    c.start_agent(hosts[0])                                    # the node comes back
    c.wait("recovered", lambda s: s["degraded"] is None and s["throughput_1s"] > 0, 15)
    done = finish(c)
    events = c.events()
    back = next(e for e in events if e["type"] in ("agent.hello", "agent.restarted")
                and e["host"] == hosts[0] and e["t"] > infeasible["t"])
    deployed = next(e for e in events if e["type"] == "plan.deployed" and e["t"] > back["t"])
    assert deployed["t"] - back["t"] < 5.0                     # no hold while nothing runs
    assert done["replays"] > 0


def publish_chain(repo: Path, version: int, layers: int = 3) -> None:
    from testbed.control.repository import publish

    model = build_chain(repo.parent / f"chain-v{version}.onnx", layers, seed=version)

    class Profile:
        segments = [Segment(10.0, 100, 128) for _ in range(2 * layers)]
        input_bytes, total_ms, activation_reserve_bytes = 128, 60.0, 0

    publish(repo, model, version, Profile)


def test_model_update_switch_and_rollback(cluster):
    """Version 2 is published under load: found, planned, deployed beside version 1 and
    switched to without a gap; then rolled back with one command. Every result is checked
    against the version that served it, and both versions really differ."""
    c = cluster({"edge1": 1.0, "edge2": 1.0, "edge3": 1.0, "edge4": 1.0, "edge5": 1.0},
                workload={"mode": "closed", "concurrency": 4, "duration_s": 8.0,
                          "timeout_s": 2.0, "drain_timeout_s": 8.0, "pool_size": 8})
    c.ready()
    assert c("start_workload")["ok"]
    time.sleep(1.0)
    published = time.time()
    publish_chain(c.run_dir / "repository", 2)
    two = c.wait("on version 2", lambda s: s["version"] == 2, 10)
    time.sleep(1.0)
    assert c("rollback") == {"ok": True, "version": 1}
    c.wait("back on version 1", lambda s: s["version"] == 1 and s["epoch"] > two["epoch"], 10)
    done = finish(c)
    events = c.events()
    found = next(e for e in events if e["type"] == "version.found")
    assert found["version"] == 2 and found["t"] - published < 2.0
    switches = [e for e in events if e["type"] == "version.switched"]
    assert [(e["previous"], e["version"]) for e in switches] == [(1, 2), (2, 1)]
    assert all(e["handover"] for e in events if e["type"] == "plan.deployed" and e["epoch"] > 1)
    assert set(done["completed_by_version"]) == {"1", "2"}
    rows = c.requests()
    assert {r["version"] for r in rows} == {"1", "2"}
    # no gap: completions in every 0.5 s of the run
    dones = sorted(float(r["done"]) for r in rows)
    gaps = [b - a for a, b in zip(dones, dones[1:])]
    assert max(gaps) < 0.5, max(gaps)
    # the versions compute different outputs, so the per-version check is meaningful
    from testbed.control.dispatcher import (
        compute_references,
        default_generator,
        input_specs,
        make_pool,
    )

    pool = make_pool(input_specs(c.model), 2, 0, {}, default_generator({}))
    v1 = compute_references(c.model, pool)
    v2 = compute_references(c.run_dir / "repository" / "v2" / "model.onnx", pool)
    assert not np.allclose(v1[0]["y"], v2[0]["y"], atol=1e-3)


def test_curve_encrypts_every_hop(cluster):
    """CurveZMQ on: the control channel is encrypted and every data hop authenticated, a
    re-plan hands the new workers their keys, and a sender without the keys reaches no
    worker."""
    c = cluster({"edge1": 1.0, "edge2": 1.0, "edge3": 1.0, "edge4": 1.0}, curve=True,
                workload={"mode": "closed", "concurrency": 4, "duration_s": 4.0,
                          "timeout_s": 2.0, "drain_timeout_s": 8.0, "pool_size": 8})
    ready = c.ready()
    stage0 = ready["endpoints"][0]
    plain = zmq.Context.instance().socket(zmq.PUSH)
    plain.setsockopt(zmq.LINGER, 0)
    plain.setsockopt(zmq.IMMEDIATE, 1)
    plain.setsockopt(zmq.SNDTIMEO, 500)
    plain.connect(stage0["address"])
    with pytest.raises(zmq.Again):                      # no handshake: nothing is sent
        plain.send_multipart([b"not a frame", b"x"])
    plain.close(0)
    assert c("start_workload")["ok"]
    time.sleep(1.0)
    c.crash(ready["endpoints"][1]["host"])
    c.wait("re-planned", lambda s: s["epoch"] is not None and s["epoch"] >= 2, 6)
    done = finish(c)
    assert done["replays"] > 0
    logs = "".join(p.read_text() for p in c.root.glob("edge*/logs/worker_*.log"))
    assert "bad frame" not in logs


def test_worker_reads_pod_keys_under_kubernetes(tmp_path):
    """testbed.k8s.manifests mounts the pod's secret key and the endpoints' public keys: the worker
    finds the next hop's key (the next stage, or the controller's sink after the last)."""
    from stage_image.security import KeyPair
    from stage_image.worker import WorkerConfig

    keys = {name: KeyPair.generate() for name in ("stage-0", "stage-1", "controller")}
    (tmp_path / "own.secret").write_text(keys["stage-0"].secret.decode())
    (tmp_path / "curve-public.json").write_text(json.dumps(
        {name: pair.public.decode() for name, pair in keys.items()}))
    for stage, after in ((0, "stage-1"), (1, "controller")):
        cfg = WorkerConfig("edge1", 1, "m.onnx", "tcp://*:20001", ["x"], ["y"], epoch=1,
                           stage=stage, next="tcp://next:20001")
        cfg.load_pod_keys(tmp_path, tmp_path)
        assert cfg.curve_secret == keys["stage-0"].secret.decode()
        assert cfg.initial_routes()[1].public == keys[after].public.decode()


def test_repository_publishes_whole_immutable_versions(tmp_path):
    from formats.errors import InputError
    from testbed.control.repository import Watcher, list_versions, publish, read_manifest

    class Profile:
        segments = [Segment(1.0, 10, 20)]
        weight_bytes = [8]              # a ModelProfile keeps the weights' bytes apart
        input_bytes, total_ms, activation_reserve_bytes = 4, 1.0, 0

    repo = tmp_path / "repo"
    watcher = Watcher(repo)
    assert watcher.poll() == ([], [])
    model = tmp_path / "a.onnx"
    model.write_bytes(b"version one")
    first = publish(repo, model, 1, Profile)
    assert first.sha256 == read_manifest(repo / "v1").sha256 and first.model.read_bytes() == \
        b"version one"
    # the weights' bytes survive publishing: a later version's plans count disk and deploy
    assert read_manifest(repo / "v1").segments == [Segment(1.0, 10, 20, model_bytes=8)]
    assert publish(repo, model, 1, Profile).sha256 == first.sha256       # the same: a no-op
    model.write_bytes(b"other bytes")
    with pytest.raises(InputError, match="already published"):
        publish(repo, model, 1, Profile)
    found, problems = watcher.poll()
    assert [m.version for m in found] == [1] and not problems
    publish(repo, model, 2, Profile)
    assert [m.version for m in watcher.poll()[0]] == [2]                 # each reported once
    assert watcher.poll() == ([], [])
    assert sorted(list_versions(repo)) == [1, 2]
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]    # no staging left
    (repo / "v3").mkdir()                          # v2's manifest in v3: refused, by name
    (repo / "v3" / "manifest.json").write_text((repo / "v2" / "manifest.json").read_text())
    found, problems = watcher.poll()
    assert not found and "does not match the directory" in str(problems[0])


def test_an_escape_must_serve_the_quick_gain_sooner() -> None:
    gain = policy.QUICK_GAIN_S
    assert policy.escape_serves_sooner(18.5, 1.0)
    assert policy.escape_serves_sooner(10.0, 10.0 - gain)
    assert not policy.escape_serves_sooner(10.0, 10.0 - gain + 0.01)
    assert not policy.escape_serves_sooner(1.5, 0.0)      # too little left to gain the margin
