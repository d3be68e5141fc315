"""The runtime end to end without root: controller (+ dispatcher) and two agents with their
workers on loopback, each on its own 127.0.0.x address, serving a tiny 2-stage model whose
cut carries two tensors (one passed through). One run (module fixture, a few seconds of
closed-loop load) is checked from several sides: every request answered and correct, a
worker fed garbage frames keeps serving, a corrupted cached model is caught by its SHA-256
and fetched again, and everything exits cleanly."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import zmq
from onnx import TensorProto, helper, numpy_helper

from stage_image.wire import CHUNK_BYTES, encode_control, encode_tensors
from tests.processes import agent_workers

ROOT = Path(__file__).resolve().parent.parent
HOSTS = {"edge1": "127.0.0.21", "edge2": "127.0.0.22"}
DISPATCHER_IP = "127.0.0.23"
# ports in 32000-32499 (this module; test_recovery uses 32500-32999); the offset keeps two
# concurrent test runs apart
PORT = 32000 + (os.getpid() % 24) * 20
DURATION_S = 3.0


# -- a tiny model, split by hand --------------------------------------------------------------

def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_tiny(root: Path) -> dict[str, Path]:
    """y = relu(x W1) W2 + x W3. Cut after the relu: the cut carries h *and* x, and stage 0
    passes x through unchanged (like a transformer's attention mask)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "W2")
    w3 = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W3")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    mm1 = helper.make_node("MatMul", ["x", "W1"], ["a"])
    relu = helper.make_node("Relu", ["a"], ["h"])
    mm2 = helper.make_node("MatMul", ["h", "W2"], ["b"])
    mm3 = helper.make_node("MatMul", ["x", "W3"], ["c"])
    add = helper.make_node("Add", ["b", "c"], ["y"])
    stages = root / "stages"
    stages.mkdir(parents=True)
    paths = {"model": root / "tiny.onnx", "stages": stages}
    onnx.save(_model([mm1, relu, mm2, mm3, add], [x], [y], [w1, w2, w3]), paths["model"])
    onnx.save(_model([mm1, relu], [x], [h], [w1]), stages / "stage_00.onnx")
    onnx.save(_model([mm2, mm3, add], [h, x], [y], [w2, w3]), stages / "stage_01.onnx")
    (stages / "stages.json").write_text(json.dumps([
        {"file": "stage_00.onnx", "inputs": ["x"], "outputs": ["h", "x"]},
        {"file": "stage_01.onnx", "inputs": ["h", "x"], "outputs": ["y"]}]))
    instance = {
        "segments": [{"compute_ms": 0.02, "memory_bytes": 4096, "output_bytes": 192},
                     {"compute_ms": 0.02, "memory_bytes": 4096, "output_bytes": 32}],
        "input_bytes": 64,
        "nodes": [{"name": h, "speed": 1.0, "memory_bytes": 1 << 30} for h in HOSTS],
        "source": "dispatcher",
        "bandwidth_mbps": [["dispatcher", "edge1", 1000.0], ["dispatcher", "edge2", 1000.0],
                           ["edge1", "edge2", 1000.0]]}
    paths["instance"] = root / "instance.json"
    paths["instance"].write_text(json.dumps(instance))
    paths["plan"] = root / "plan.json"
    paths["plan"].write_text(json.dumps({"algorithm": "given", "stages": [
        {"segments": [0, 1], "node": "edge1"}, {"segments": [1, 2], "node": "edge2"}]}))
    return paths


# -- processes and the driver's side of the control socket ------------------------------------

class Client:
    """The driver's REQ socket (re-created after a timeout, as REQ requires)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ctx = zmq.Context.instance()
        self.sock = self._socket()

    def _socket(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 2000)
        sock.connect(self.address)
        return sock

    def __call__(self, cmd: str, **fields: Any) -> dict[str, Any]:
        self.sock.send_json({"cmd": cmd, **fields})
        try:
            return self.sock.recv_json()
        except zmq.Again:
            self.sock.close(0)
            self.sock = self._socket()
            raise

    def wait_for(self, states: set[str], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                status = self("status")
            except zmq.Again:
                continue
            if status["state"] in states or status["state"] == "failed":
                return status
            time.sleep(0.1)
        raise AssertionError(f"state never reached {states}; last status {status}")


def start(argv: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    return subprocess.Popen([sys.executable, *argv], stdout=subprocess.DEVNULL,
                            stderr=open(log, "wb"), cwd=ROOT, env=env)


def garbage_for(address: str) -> None:
    """Feed stage 0 everything a worker must survive."""
    good_x = np.zeros((1, 16), np.float32)
    header = {"kind": "tensor", "rid": 10**9, "epoch": 1, "version": 1, "sent": 0.0,
              "tensors": [{"name": "x", "dtype": "float32", "shape": [1, 16], "nbytes": 64}]}

    def variant(**changes: Any) -> bytes:
        tensor = {**header["tensors"][0], **changes.pop("tensor", {})}
        return json.dumps({**header, **changes, "tensors": [tensor]}).encode()

    messages = [
        [b"this is not json"],
        [b"\x80\x81\x82", good_x.tobytes()],
        [variant(tensor={"dtype": "complex128"}), good_x.tobytes()],
        [variant(tensor={"shape": [1 << 30, 1 << 30]}), good_x.tobytes()],
        [variant(tensor={"nbytes": 63}), good_x.tobytes()],
        [variant(), good_x.tobytes(), good_x.tobytes()],
        [variant(), good_x.tobytes()[:-4]],
        [variant(tensor={"name": "not_x"}), good_x.tobytes()],
        [variant(tensor={"dtype": "int32"}), np.zeros((1, 16), np.int32).tobytes()],
        [variant(tensor={"shape": [2, 8]}), good_x.tobytes()],     # ORT refuses the shape
        encode_tensors(10**9 + 1, 99, 1, 0.0, {"x": good_x}),        # stale epoch
    ]
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(address)
    for message in messages * 3:
        sock.send_multipart(message, copy=False)
    sock.close()       # linger: all of it is delivered


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("loopback")
    paths = build_tiny(root)
    run_dir = root / "run"
    config = {
        "run_dir": str(run_dir), "model": str(paths["model"]),
        "instance": str(paths["instance"]), "hosts": HOSTS, "dispatcher_ip": DISPATCHER_IP,
        "plan": str(paths["plan"]), "stages_dir": str(paths["stages"]),
        "control_port": PORT, "sink_port": PORT + 1, "data_port_base": PORT + 2,
        "data_port_span": 10, "control_ipc": f"ipc://{root}/control.sock",
        "heartbeat_ms": 100, "suspect_after_missed": 10, "replan": False,
        "workload": {"mode": "closed", "concurrency": 4, "duration_s": DURATION_S,
                     "pool_size": 8, "seed": 3, "timeout_s": 3.0, "drain_timeout_s": 5.0},
    }
    (root / "controller.json").write_text(json.dumps(config))

    # a corrupted copy of stage 1 already sits in edge2's cache, under its true hash
    import hashlib

    sha1 = hashlib.sha256((paths["stages"] / "stage_01.onnx").read_bytes()).hexdigest()
    (root / "edge2" / "models").mkdir(parents=True)
    (root / "edge2" / "models" / f"{sha1}.onnx").write_bytes(b"definitely not that model")

    procs: dict[str, subprocess.Popen] = {}
    started = time.monotonic()
    try:
        procs["controller"] = start(["-m", "testbed.control.controller",
                                     str(root / "controller.json")],
                                    root / "controller.log")
        for host, ip in HOSTS.items():
            procs[host] = start(["-m", "stage_image.agent", "--host", host, "--controller",
                                 f"tcp://{DISPATCHER_IP}:{PORT}", "--data-dir",
                                 str(root / host), "--ip", ip, "--heartbeat-ms", "100"],
                                root / f"agent_{host}.log")
        client = Client(config["control_ipc"])
        ready = client.wait_for({"ready"}, 30)
        assert ready["state"] == "ready", ready
        deploy_s = time.monotonic() - started

        garbage_for(ready["endpoints"][0]["address"])
        assert client("start_workload")["ok"]
        time.sleep(0.5)
        midway = client("status")
        done = client.wait_for({"done"}, DURATION_S + 15)
        stop = client("stop")
        codes = {}
        codes["controller"] = procs["controller"].wait(10)
        # the agents act on the final stop(-1): their workers exit and are reaped
        deadline = time.monotonic() + 5
        while True:
            agent_children = {h: agent_workers(procs[h].pid) for h in HOSTS}
            if not any(agent_children.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for host in HOSTS:
            procs[host].send_signal(signal.SIGTERM)
            codes[host] = procs[host].wait(10)
        return {"root": root, "run_dir": run_dir, "ready": ready, "midway": midway,
                "done": done, "stop": stop, "codes": codes, "deploy_s": deploy_s,
                "agent_children": agent_children, "sha1": sha1}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def events(run: dict[str, Any]) -> list[dict[str, Any]]:
    lines = (run["run_dir"] / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


# -- the checks -------------------------------------------------------------------------------

def test_every_request_answered_once_and_correct(run):
    done = run["done"]
    assert done["state"] == "done"
    assert done["completed"] > 0
    assert done["completed"] == done["sent"]
    assert (done["lost"], done["mismatched"], done["duplicates"]) == (0, 0, 0)
    assert run["midway"]["state"] == "running"
    assert run["midway"]["throughput_1s"] > 0
    assert run["ready"]["epoch"] == 1
    assert [e["host"] for e in run["ready"]["endpoints"]] == ["edge1", "edge2"]


def test_requests_csv_has_one_row_per_request(run):
    with (run["run_dir"] / "requests.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["rid", "input", "epoch", "version", "sent", "done", "latency_ms",
                             "attempts", "status", "mismatched"]
    assert len(rows) == run["done"]["sent"]
    assert sorted(int(r["rid"]) for r in rows) == list(range(len(rows)))
    assert {r["status"] for r in rows} == {"completed"}
    assert {r["mismatched"] for r in rows} == {"0"}
    assert {r["epoch"] for r in rows} == {"1"}
    assert {int(r["input"]) for r in rows} == set(range(8))       # the whole pool is used
    assert all(float(r["done"]) >= float(r["sent"]) for r in rows)


def test_control_plane_events(run):
    kinds = [e["type"] for e in events(run)]
    for expected in ("controller.started", "agent.hello", "plan.computed", "deploy.sent",
                     "model.sent", "worker.ready", "epoch.ready", "plan.deployed",
                     "workload.started", "workload.done", "controller.stopped"):
        assert expected in kinds, expected
    assert "node.suspected" not in kinds
    assert "worker.failed" not in kinds
    deployed = next(e for e in events(run) if e["type"] == "plan.deployed")
    assert deployed["predicted_throughput_rps"] > 0
    assert all(isinstance(e["t"], float) for e in events(run))


def test_worker_fed_garbage_keeps_serving(run):
    (path,) = (run["root"] / "edge1" / "logs").glob("worker_*.log")
    log = path.read_text()
    for expected in ("bad frame dropped", "of epoch 99 dropped", "carries ['not_x']",
                     "onnxruntime refused it", "stats "):
        assert expected in log, expected
    assert "suppressed" in log or log.count("bad frame dropped") >= 1
    stats = [line for line in log.splitlines() if "exiting: frames=" in line]
    assert stats, log[-2000:]
    # the same process served the whole workload after the garbage
    assert run["done"]["completed"] > 0
    assert "worker.failed" not in [e["type"] for e in events(run)]


def test_corrupted_cached_model_is_fetched_again(run):
    kinds = [(e["type"], e.get("host")) for e in events(run)]
    assert ("model.corrupt", "edge2") in kinds
    assert ("model.sent", "edge2") in kinds
    agent_log = (run["root"] / "agent_edge2.log").read_text()
    assert "failed its SHA-256 check" in agent_log
    cached = run["root"] / "edge2" / "models" / f"{run['sha1']}.onnx"
    import hashlib

    assert hashlib.sha256(cached.read_bytes()).hexdigest() == run["sha1"]


def test_everything_exits_cleanly(run):
    assert run["stop"] == {"ok": True}
    assert run["codes"] == {"controller": 0, "edge1": 0, "edge2": 0}
    # the controller's final stop(-1) left the agents without workers
    assert run["agent_children"] == {"edge1": [], "edge2": []}


def test_agent_reads_worker_load_lines():
    """`load FRAMES MS` from a worker's stdout becomes the heartbeat's load; anything else
    that starts like one is ignored, not trusted."""
    from stage_image.agent import parse_load

    assert parse_load("load 12 63.250") == (12, 63.25)
    assert parse_load("load 0 0.000") == (0, 0.0)
    for bad in ("load", "load 3", "load x 1.0", "load 3 nan", "load -1 2.0", "load 3 1e9",
                "load 3 2.0 extra"):
        assert parse_load(bad) is None, bad


# -- the agent's disk errors ------------------------------------------------------------------

def test_agent_reports_disk_full_instead_of_crashing(tmp_path):
    """A chunk that cannot be written (ENOSPC: the partial file is /dev/full) fails the
    worker with the reason; the agent carries on and frees the partial file."""
    from stage_image import agent as agent_mod

    args = agent_mod.parse_args(["--host", "edge9", "--controller", f"tcp://127.0.0.25:{PORT + 19}",
                                 "--data-dir", str(tmp_path), "--ip", "127.0.0.25"])
    agent = agent_mod.Agent(args, agent_mod.logging.getLogger("test-agent"))
    sent: list[tuple[str, dict[str, Any]]] = []
    agent.send = lambda kind, **fields: sent.append((kind, fields))   # type: ignore[method-assign]
    try:
        sha = "cd" * 32
        (tmp_path / "models").mkdir()
        (tmp_path / "models" / f"{sha}.part").symlink_to("/dev/full")
        agent.on_deploy({"epoch": 1, "stage": 0, "version": 1, "sha256": sha, "size": 3,
                         "port": PORT + 18, "next": "tcp://127.0.0.1:1", "inputs": ["x"],
                         "outputs": ["y"]})
        assert sent[-1] == ("fetch", {"sha256": sha, "offset": 0})
        agent.on_chunk({"sha256": sha, "offset": 0, "total": 3}, memoryview(b"abc"))
        kind, fields = sent[-1]
        assert kind == "worker"
        assert fields["state"] == "failed" and fields["reason"] == "disk"
        assert fields["detail"].startswith("ENOSPC")
        assert not (tmp_path / "models" / f"{sha}.part").exists()
        agent.heartbeat()
        assert sent[-1][1]["workers"] == [{"port": PORT + 18, "sha256": sha,
                                           "state": "failed", "standby": False, "routes": [],
                                           "load": None}]
        # the model directory being a file: reported, not raised
        sha2 = "ef" * 32
        (tmp_path / "models2").write_text("")
        agent.models_dir = tmp_path / "models2"
        agent.on_deploy({"epoch": 2, "stage": 0, "version": 1, "sha256": sha2, "size": 3,
                         "port": PORT + 18, "next": "tcp://127.0.0.1:1", "inputs": ["x"],
                         "outputs": ["y"]})
        assert sent[-1][1]["state"] == "failed" and sent[-1][1]["reason"] == "disk"
    finally:
        agent.sock.close(0)
        agent.ctx.term()


# -- standbys load in the background ----------------------------------------------------------

def paced_agent(tmp_path, monkeypatch, share: str, *extra: str) -> tuple[
        Any, Any, list[float], list[tuple[str, dict[str, Any]]]]:
    """An agent with --standby-share `share` (and `extra` arguments) on a fake clock
    (`clock[0]`), whose messages to the controller are collected in `sent` instead of sent."""
    from stage_image import agent as agent_mod

    clock = [100.0]
    monkeypatch.setattr(agent_mod.time, "monotonic", lambda: clock[0])
    args = agent_mod.parse_args(["--host", "edge9", "--controller", f"tcp://127.0.0.25:{PORT + 19}",
                                 "--data-dir", str(tmp_path), "--ip", "127.0.0.25",
                                 "--standby-share", share, *extra])
    agent = agent_mod.Agent(args, agent_mod.logging.getLogger("test-agent"))
    sent: list[tuple[str, dict[str, Any]]] = []
    agent.send = lambda kind, **fields: sent.append((kind, fields))   # type: ignore[method-assign]
    return agent, args, clock, sent


def test_paced_standby_models_come_smallest_first(tmp_path, monkeypatch):
    """Paced standby models come one at a time, the one with the fewest bytes left first,
    whatever order they were asked in: the most standbys are loaded at every moment."""
    agent, _, clock, sent = paced_agent(tmp_path, monkeypatch, "0.5")
    chunk = CHUNK_BYTES
    # the models are all-zero bytes under their true hashes: each passes its check in the
    # agent's verifier thread whenever that runs (a failed one would be asked again)
    big, small = (hashlib.sha256(bytes(n * chunk)).hexdigest() for n in (8, 3))
    serving = "c3" * 32
    sizes = {big: 8 * chunk, small: 3 * chunk}
    monkeypatch.setattr(agent, "start_worker", lambda rec: None)   # only fetching is tested
    try:
        agent.on_deploy({"version": 1, "sha256": serving, "size": chunk, "port": PORT + 29,
                         "inputs": ["x"], "outputs": ["y"], "epoch": 1, "stage": 0,
                         "next": "tcp://127.0.0.1:1"})          # its chunk never comes
        for port, sha in ((PORT + 30, big), (PORT + 31, small)):
            agent.on_deploy({"version": 1, "sha256": sha, "size": sizes[sha], "port": port,
                             "inputs": ["x"], "outputs": ["y"]})
        got: list[str] = []
        for _ in range(200):
            asks = [(f["sha256"], f["offset"]) for kind, f in sent
                    if kind == "fetch" and f["sha256"] != serving]
            sent.clear()
            clock[0] += 0.1                                    # each round trip: 0.1 s
            for sha, offset in asks:
                got.append(sha)
                agent.on_chunk({"sha256": sha, "offset": offset, "total": sizes[sha]},
                               memoryview(bytes(chunk)))
            agent.check_deadlines(clock[0])
        # the first asks learn both sizes; then the small model's two chunks, then the big
        assert got[:2] == [big, small] and got[2:4] == [small, small], got
        assert got.count(big) == 8 and set(got[4:]) == {big}
    finally:
        agent.sock.close(0)
        agent.ctx.term()


def test_staged_models_are_fetched_kept_and_then_deployed_without_a_transfer(tmp_path,
                                                                           monkeypatch):
    """`stage` fetches a model with no worker; a deploy of it later finds it on disk and
    asks for nothing; a model dropped from the list while it is fetched is given up."""
    agent, args, clock, sent = paced_agent(tmp_path, monkeypatch, "1")
    chunk = CHUNK_BYTES
    kept, dropped = (hashlib.sha256(bytes(n * chunk)).hexdigest() for n in (2, 3))
    started: list[int] = []
    monkeypatch.setattr(agent, "start_worker", lambda rec: started.append(rec.port))

    def asked() -> list[tuple[str, int]]:
        found = [(f["sha256"], f["offset"]) for kind, f in sent if kind == "fetch"]
        sent.clear()
        return found

    try:
        agent.on_message(encode_control("stage", models=[
            {"sha256": kept, "size": 2 * chunk}, {"sha256": dropped, "size": 3 * chunk}]))
        assert sorted(asked()) == sorted([(kept, 0), (dropped, 0)])
        agent.on_chunk({"sha256": kept, "offset": 0, "total": 2 * chunk},
                       memoryview(bytes(chunk)))
        assert asked() == [(kept, chunk)]
        agent.on_chunk({"sha256": kept, "offset": chunk, "total": 2 * chunk},
                       memoryview(bytes(chunk)))
        for _ in range(100):                        # the verifier thread checks it
            agent.check_deadlines(clock[0])
            if agent.model_path(kept).exists():
                break
            time.sleep(0.02)
        assert agent.model_path(kept).stat().st_size == 2 * chunk and started == []
        # the list without `dropped`: its fetch (its first ask unanswered) is given up at
        # the fetch timeout, not asked again, its partial file deleted
        agent.on_message(encode_control("stage", models=[{"sha256": kept, "size": 2 * chunk}]))
        clock[0] += args.fetch_timeout_s + 1
        agent.check_deadlines(clock[0])
        assert asked() == []
        assert dropped not in agent.fetches
        assert not (agent.models_dir / f"{dropped}.part").exists()
        # the loss happened: a stage of the new epoch on this host needs no transfer
        agent.on_deploy({"version": 1, "sha256": kept, "size": 2 * chunk, "port": PORT + 44,
                         "inputs": ["x"], "outputs": ["y"], "epoch": 2, "stage": 0,
                         "next": "tcp://127.0.0.1:1"})
        for _ in range(100):
            agent.check_deadlines(clock[0])
            if started:
                break
            time.sleep(0.02)
        assert started == [PORT + 44] and asked() == []
    finally:
        agent.sock.close(0)
        agent.ctx.term()


def test_a_standby_waits_for_the_launcher_and_a_serving_worker_does_not(tmp_path,
                                                                        monkeypatch):
    """A standby whose model is here starts once the launcher can fork it (the controller
    prices it as a forked worker); a serving worker starts at once; if the launcher dies
    first, the standby starts on its own."""
    from stage_image.agent import WorkerRecord

    agent, _, clock, _ = paced_agent(tmp_path, monkeypatch, "1")

    class Launcher:
        ready, running = False, True

        def usable(self) -> bool:
            return self.ready and self.running

        def alive(self) -> bool:
            return self.running

        def stop(self) -> None:
            self.running = False

    launcher = Launcher()
    started: list[int] = []
    monkeypatch.setattr(agent, "launcher", launcher)
    monkeypatch.setattr(agent, "start_worker", lambda rec: started.append(rec.port))
    try:
        recs = {port: WorkerRecord(port, 1, f"{port:064x}", 1, ["x"], ["y"], standby=standby)
                for port, standby in ((PORT + 40, True), (PORT + 41, False), (PORT + 42, True))}
        agent.workers.update(recs)
        for rec in recs.values():
            agent.start_when_forkable(rec)
        agent.check_deadlines(clock[0])
        assert started == [PORT + 41]                       # the serving one only
        launcher.ready = True
        agent.check_deadlines(clock[0])
        assert sorted(started) == [PORT + 40, PORT + 41, PORT + 42]
        launcher.ready, started[:] = False, []
        late = WorkerRecord(PORT + 43, 1, "ab" * 32, 1, ["x"], ["y"], standby=True)
        agent.workers[late.port] = late
        agent.start_when_forkable(late)
        assert started == []
        launcher.running = False                             # the launcher died meanwhile
        agent.check_deadlines(clock[0])
        assert started == [PORT + 43]
    finally:
        agent.sock.close(0)
        agent.ctx.term()


def test_standby_models_are_paced_and_serving_ones_are_not(tmp_path, monkeypatch):
    """Beside a serving worker, a standby's model comes one chunk at a time for the whole
    host, each ask after a pause three times the last chunk's round trip (--standby-share
    0.25); once a route makes it serve, the rest comes a window at a time at once. A host
    that serves nothing fetches standbys' models a window at a time."""
    agent, args, clock, sent = paced_agent(tmp_path, monkeypatch, "0.25")
    chunk, total = CHUNK_BYTES, 6 * CHUNK_BYTES
    a, b, c = "a1" * 32, "b2" * 32, "c3" * 32

    def asked() -> list[tuple[str, int]]:
        found = [(f["sha256"], f["offset"]) for kind, f in sent if kind == "fetch"]
        sent.clear()
        return found

    def prepare(sha: str, port: int, epoch: int | None = None) -> None:
        route = {} if epoch is None else {"epoch": epoch, "stage": 0, "next": "tcp://127.0.0.1:1"}
        agent.on_deploy({"version": 1, "sha256": sha, "size": total, "port": port,
                         "inputs": ["x"], "outputs": ["y"], **route})

    def arrives(sha: str, offset: int) -> None:
        agent.on_chunk({"sha256": sha, "offset": offset, "total": total},
                       memoryview(bytes(chunk)))

    try:
        prepare(c, PORT + 29)                       # nothing serves yet: a spare host
        arrives(c, 0)
        assert asked() == [(c, 0), (c, chunk), (c, 2 * chunk), (c, 3 * chunk), (c, 4 * chunk)]
        prepare(c, PORT + 29, epoch=1)              # now it serves
        prepare(a, PORT + 30)
        prepare(b, PORT + 31)
        assert asked() == [(a, 0), (b, 0)]          # the first asks learn the sizes
        clock[0] += 0.1
        arrives(a, 0)
        assert asked() == []                        # b's first chunk is still in flight
        arrives(b, 0)
        assert asked() == []                        # paused: 3 x 0.1 s
        clock[0] += 0.29
        agent.check_deadlines(clock[0])
        assert asked() == []
        clock[0] += 0.02
        agent.check_deadlines(clock[0])
        (first,) = asked()                          # one chunk for the whole host
        agent.check_deadlines(clock[0])
        assert asked() == []
        clock[0] += args.fetch_timeout_s - 0.1      # the ask is recent: no stall to re-ask
        agent.check_deadlines(clock[0])
        assert [ask for ask in asked() if ask[0] != c] == []    # (c's chunks never came)
        # a route for a's standby: it serves now, its model is no longer paced
        prepare(a, PORT + 30, epoch=1)
        if first[0] == b:
            arrives(b, chunk)
            assert asked() == []                    # b is paced, a waits for its turn
            agent.check_deadlines(clock[0])
            assert asked()[0][0] == a
        else:
            arrives(a, chunk)
            assert sorted(asked()) == [(a, 2 * chunk), (a, 3 * chunk), (a, 4 * chunk),
                                       (a, 5 * chunk)]      # a window (4) at once
    finally:
        agent.sock.close(0)
        agent.ctx.term()


def test_the_paced_share_grows_into_what_the_frames_leave_of_the_link():
    from stage_image.agent import LINK_SHARE_MAX, standby_link_share

    link = 50e6 / 8                                    # 50 Mbit/s in bytes a second
    assert standby_link_share(0.1, link, 0.6 * link) == pytest.approx(0.2)   # 1 - 0.6 - 0.2
    assert standby_link_share(0.1, link, 0.85 * link) == 0.1     # busy link: the floor
    assert standby_link_share(0.1, link, 0.0) == LINK_SHARE_MAX  # idle link: at most half
    assert standby_link_share(0.3, 0.0, 0.0) == 0.3              # unknown rate: the floor


def test_received_bytes_sum_the_namespaces_interfaces_but_loopback(tmp_path):
    from stage_image.agent import received_bytes

    dev = tmp_path / "dev"
    dev.write_text(
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes ...\n"
        "    lo: 9000000     100    0    0    0     0          0         0  9000000 0\n"
        "edge1-eth0: 1500     10    0    0    0     0          0         0  700 0\n"
        "  eth1:  250        2    0    0    0     0          0         0  0 0\n")
    assert received_bytes(str(dev)) == 1750
    assert received_bytes(str(tmp_path / "missing")) is None


def test_a_paced_chunk_pauses_for_its_share_of_the_links_bytes():
    from stage_image.agent import chunk_pause_s

    link = 100e6 / 8
    # 1 MiB at a tenth of 100 Mbit/s is one every 0.84 s: a round trip of 0.28 s (the frames
    # take most of the link) leaves 0.56 s, where a tenth of the time would pause 2.5 s
    assert chunk_pause_s(0.28, CHUNK_BYTES, 0.1, link) == pytest.approx(0.559, abs=1e-3)
    assert chunk_pause_s(0.28, CHUNK_BYTES, 0.1, 0.0) == pytest.approx(2.52)  # rate unknown
    assert chunk_pause_s(1.0, CHUNK_BYTES, 0.1, link) == 0.0     # slower than the share
    # an idle link at half: a pause as long as the chunk's own time on the wire
    assert chunk_pause_s(CHUNK_BYTES / link, CHUNK_BYTES, 0.5, link) == \
        pytest.approx(CHUNK_BYTES / link)


def test_paced_chunks_pause_by_the_share_the_link_leaves(tmp_path, monkeypatch):
    """With --link-mbps the agent measures, once a second, what its link receives besides
    model chunks, and paces standby chunks to the share that leaves (at least
    --standby-share): at 20% of a 50 Mbit/s link taken by frames, half its bytes (a chunk
    every 0.34 s), where the fixed 0.1 would allow one every 1.68 s."""
    from stage_image import agent as agent_mod

    agent, _, clock, sent = paced_agent(tmp_path, monkeypatch, "0.1", "--link-mbps", "50")
    link = 50e6 / 8
    counter = [10_000_000]
    monkeypatch.setattr(agent_mod, "received_bytes", lambda: counter[0])
    chunk, total = CHUNK_BYTES, 4 * CHUNK_BYTES
    a, serving = "a1" * 32, "c3" * 32
    try:
        agent.measure_link(clock[0])
        assert agent.link_share == 0.1                       # one sample: nothing known yet
        for _ in range(6):                                   # frames: 20% of the link
            clock[0] += 1.0
            counter[0] += int(0.2 * link)
            agent.measure_link(clock[0])
        assert agent.link_share == pytest.approx(0.5, abs=0.02)
        agent.on_deploy({"version": 1, "sha256": serving, "size": chunk, "port": PORT + 32,
                         "inputs": ["x"], "outputs": ["y"], "epoch": 1, "stage": 0,
                         "next": "tcp://127.0.0.1:1"})       # serves: standbys are paced
        agent.on_deploy({"version": 1, "sha256": a, "size": total, "port": PORT + 33,
                         "inputs": ["x"], "outputs": ["y"]})
        sent.clear()
        clock[0] += 0.2                                      # a's first chunk: 0.2 s
        agent.on_chunk({"sha256": a, "offset": 0, "total": total}, memoryview(bytes(chunk)))
        pause = chunk / (0.5 * link) - 0.2                   # 0.14 s
        clock[0] += pause - 0.01
        agent.check_deadlines(clock[0])
        assert [f for kind, f in sent if kind == "fetch" and f["sha256"] == a] == []
        clock[0] += 0.02
        agent.check_deadlines(clock[0])
        assert [f["offset"] for kind, f in sent if kind == "fetch" and f["sha256"] == a] \
            == [chunk]
        # the chunk's own bytes are not taken for frames: the share holds
        counter[0] += chunk + int(0.2 * link)
        clock[0] += 1.0
        agent.measure_link(clock[0])
        assert agent.link_share == pytest.approx(0.5, abs=0.02)
    finally:
        agent.sock.close(0)
        agent.ctx.term()


def test_workers_are_moved_to_the_cpu_group_of_their_role(tmp_path):
    """With --standby-cpu-cgroup, the agent caps that group at --standby-share of the host's
    quota; a standby's process goes to it while a worker of the host serves, and to its
    parent (the host's own group) when it is given a route or nothing on the host serves."""
    from stage_image import agent as agent_mod

    host_group = tmp_path / "cpu-host"
    standby_group = host_group / "standby"
    standby_group.mkdir(parents=True)
    for group in (host_group, standby_group):
        (group / "cpu.cfs_quota_us").write_text("20000\n")
    args = agent_mod.parse_args(["--host", "edge9", "--controller", f"tcp://127.0.0.25:{PORT + 19}",
                                 "--data-dir", str(tmp_path), "--ip", "127.0.0.25",
                                 "--standby-cpu-cgroup", str(standby_group),
                                 "--standby-share", "0.25"])
    agent = agent_mod.Agent(args, agent_mod.logging.getLogger("test-agent"))
    agent.send = lambda kind, **fields: None   # type: ignore[method-assign]
    agent.limit_standbys()
    assert (standby_group / "cpu.cfs_quota_us").read_text() == "5000\n"
    assert (host_group / "cpu.cfs_quota_us").read_text() == "20000\n"
    sha = "c3" * 32
    sleeper = subprocess.Popen(["sleep", "30"], stdin=subprocess.PIPE)

    def member(group: Path) -> bool:
        procs = group / "cgroup.procs"
        return procs.exists() and procs.read_text() == f"{sleeper.pid}\n"

    try:
        standby = agent_mod.WorkerRecord(PORT + 32, 1, sha, 3, ["x"], ["y"], standby=True)
        standby.proc = sleeper
        agent.workers[standby.port] = standby
        agent.place_workers()
        assert member(host_group) and not member(standby_group)     # a spare host
        serving = agent_mod.WorkerRecord(PORT + 33, 1, "d4" * 32, 3, ["x"], ["y"])
        serving.routes[1] = (0, "tcp://127.0.0.1:1", None, ())
        agent.workers[serving.port] = serving
        agent.place_workers()
        assert member(standby_group)
        agent.on_deploy({"epoch": 1, "stage": 1, "next": "tcp://127.0.0.1:1", "version": 1,
                         "sha256": sha, "size": 3, "port": standby.port, "inputs": ["x"],
                         "outputs": ["y"]})
        assert member(host_group)
    finally:
        sleeper.kill()
        sleeper.wait()
        agent.sock.close(0)
        agent.ctx.term()


# -- a node dies under load: suspected, re-planned over the live nodes, replayed --------------

def _planner_available() -> bool:
    try:
        from partitioner.algorithms import solve  # noqa: F401
        from partitioner.split import split_model  # noqa: F401
    except ImportError:
        return False
    return True


THREE_HOSTS = {"edge1": "127.0.0.21", "edge2": "127.0.0.22", "edge3": "127.0.0.24"}


@pytest.mark.skipif(not _planner_available(), reason="partitioner.algorithms.solve not there")
def test_node_crash_is_detected_replanned_and_replayed(tmp_path):
    paths = build_tiny(tmp_path)
    from partitioner import cuts as cutlib

    analysis = cutlib.analyze(cutlib.infer_shapes(cutlib.load(paths["model"])))
    # compute-heavy segments on equal nodes: the best plan spreads over several nodes
    instance = {
        "segments": [{"compute_ms": 10.0, "memory_bytes": 4096, "output_bytes": 192}
                     for _ in range(analysis.segment_count)],
        "input_bytes": 64,
        "nodes": [{"name": h, "speed": 1.0, "memory_bytes": 1 << 30} for h in THREE_HOSTS],
        "source": "dispatcher",
        "bandwidth_mbps": [[a, b, 1000.0] for a in ["dispatcher", *THREE_HOSTS]
                           for b in THREE_HOSTS if a < b or a == "dispatcher"]}
    paths["instance"].write_text(json.dumps(instance))
    port = PORT + 10
    config = {
        "run_dir": str(tmp_path / "run"), "model": str(paths["model"]),
        "instance": str(paths["instance"]), "hosts": THREE_HOSTS,
        "dispatcher_ip": DISPATCHER_IP, "control_port": port, "sink_port": port + 1,
        "data_port_base": port + 2, "data_port_span": 8,
        "control_ipc": f"ipc://{tmp_path}/control.sock", "heartbeat_ms": 100,
        "suspect_after_missed": 3, "replan": True,
        "planner": {"algorithm": "auto", "time_limit_s": 1.0},
        "workload": {"mode": "closed", "concurrency": 4, "duration_s": 4.0, "timeout_s": 1.0,
                     "drain_timeout_s": 5.0},
    }
    (tmp_path / "controller.json").write_text(json.dumps(config))
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["controller"] = start(["-m", "testbed.control.controller",
                                     str(tmp_path / "controller.json")],
                                    tmp_path / "controller.log")
        for host, ip in THREE_HOSTS.items():
            procs[host] = start(["-m", "stage_image.agent", "--host", host, "--controller",
                                 f"tcp://{DISPATCHER_IP}:{port}", "--data-dir",
                                 str(tmp_path / host), "--ip", ip, "--heartbeat-ms", "100"],
                                tmp_path / f"agent_{host}.log")
        client = Client(config["control_ipc"])
        ready = client.wait_for({"ready"}, 40)
        assert ready["state"] == "ready", ready
        # the last stage: the requests queued upstream of it are certainly lost with it
        victim = ready["endpoints"][-1]["host"]
        if len(ready["endpoints"]) == 1:
            pytest.skip("the planner chose a single stage")
        assert client("start_workload")["ok"]
        time.sleep(1.0)
        orphans = subprocess.run(["pgrep", "-P", str(procs[victim].pid)],
                                 capture_output=True, text=True).stdout.split()
        crashed_at = time.time()
        procs[victim].kill()                     # the node crashes: agent and worker
        procs[victim].wait()
        done = client.wait_for({"done"}, 30)
        client("stop")
        assert procs["controller"].wait(10) == 0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert (done["lost"], done["mismatched"]) == (0, 0), done
    assert done["completed"] == done["sent"] > 0
    assert done["epoch"] >= 2
    assert victim not in [e["host"] for e in done["endpoints"]]
    evs = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text()
           .splitlines()]
    suspected = [e for e in evs if e["type"] == "node.suspected" and e["host"] == victim]
    assert suspected and suspected[0]["t"] - crashed_at < 1.0       # detection under 1 s
    deployed = [e for e in evs if e["type"] == "plan.deployed"]
    assert deployed[-1]["epoch"] == done["epoch"] and victim not in deployed[-1]["hosts"]
    assert any(e["type"] == "requests.replayed" for e in evs)
    assert done["replays"] > 0
    with (tmp_path / "run" / "requests.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["epoch"] for r in rows} >= {"1", str(done["epoch"])}
    assert any(int(r["attempts"]) > 1 and r["epoch"] == str(done["epoch"]) for r in rows)
    print(f"detected after {suspected[0]['t'] - crashed_at:.2f}s, new epoch active after "
          f"{deployed[-1]['t'] - crashed_at:.2f}s")
    for pid in orphans:                          # the worker died with its agent
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status").read_text()


# -- the dispatcher's guarantees, against a deliberately unreliable fake pipeline -------------

def test_dispatcher_replays_dedupes_and_checks(tmp_path):
    """Open loop through a fake stage that drops the first attempt of some requests, answers
    some twice and corrupts some: every request completes exactly once, duplicates are
    counted, corrupted results are flagged, and an epoch switch replays what is pending."""
    import logging

    import onnxruntime as ort

    from testbed.control.dispatcher import (
        Dispatcher,
        Head,
        Route,
        Workload,
        compute_references,
        default_generator,
        input_specs,
        make_pool,
    )

    paths = build_tiny(tmp_path)
    events_seen: list[tuple[str, dict[str, Any]]] = []
    ctx = zmq.Context()
    base = PORT + 12
    dispatcher = Dispatcher(ctx, f"tcp://127.0.0.26:{base}", lambda kind, **f: events_seen.append(
        (kind, f)), logging.getLogger("test-dispatcher"))
    pool = make_pool(input_specs(paths["model"]), 8, 5, {}, default_generator({}))
    dispatcher.set_pool(pool)
    dispatcher.add_version(1, compute_references(paths["model"], pool))
    model = ort.InferenceSession(str(paths["model"]), providers=["CPUExecutionProvider"])
    stages = []
    for k in range(2):                       # stage 0 of epoch 1, then of epoch 2
        pull = ctx.socket(zmq.PULL)
        pull.bind(f"tcp://127.0.0.26:{base + 1 + k}")
        stages.append(pull)
    out = ctx.socket(zmq.PUSH)
    out.connect(f"tcp://127.0.0.26:{base}")
    dispatcher.switch(Route(1, 1, [Head(f"tcp://127.0.0.26:{base + 1}")], ["x"]))
    dispatcher.start(Workload.from_json({"mode": "open", "rate": 300.0, "duration_s": 1.0,
                                         "timeout_s": 0.5, "drain_timeout_s": 3.0}))
    from stage_image.wire import decode_tensors as decode

    seen: set[int] = set()
    dropped, doubled, corrupted, switched = set(), set(), set(), False
    try:
        deadline = time.monotonic() + 10
        while dispatcher.state != "done" and time.monotonic() < deadline:
            now = time.monotonic()
            if not switched and now - dispatcher.started_mono > 0.5:
                switched = True                     # a new epoch: stage 0 moves
                dispatcher.switch(Route(2, 1, [Head(f"tcp://127.0.0.26:{base + 2}")], ["x"]))
            dispatcher.pump(now)
            for k, pull in enumerate(stages):
                while pull.poll(0):
                    frame = decode(pull.recv_multipart(copy=False))
                    assert frame.epoch == k + 1
                    rid = frame.rid
                    if rid % 5 == 0 and rid not in seen:
                        seen.add(rid)
                        dropped.add(rid)            # lost on the way: must be replayed
                        continue
                    seen.add(rid)
                    (y,) = model.run(["y"], {"x": frame.tensors["x"]})
                    if rid % 11 == 3:
                        y = y + 1.0
                        corrupted.add(rid)
                    result = encode_tensors(rid, frame.epoch, 1, frame.sent, {"y": y})
                    out.send_multipart(result, copy=False)
                    if rid % 7 == 1 and rid not in doubled:
                        doubled.add(rid)
                        out.send_multipart(encode_tensors(rid, frame.epoch, 1, frame.sent,
                                                          {"y": y}))
            time.sleep(0.001)
            dispatcher.on_sink()
        status = dispatcher.status()
        assert dispatcher.state == "done", status
        assert status["sent"] >= 250
        assert status["completed"] == status["sent"] and status["lost"] == 0
        assert status["mismatched"] == len(corrupted) > 0
        assert status["duplicates"] == len(doubled) > 0
        assert status["replays"] >= len(dropped) > 0
        dispatcher.write_csv(tmp_path / "requests.csv")
        with (tmp_path / "requests.csv").open() as handle:
            rows = {int(r["rid"]): r for r in csv.DictReader(handle)}
        assert all(int(rows[rid]["attempts"]) >= 2 for rid in dropped)
        assert {r["epoch"] for r in rows.values()} == {"1", "2"}
        assert {rid for rid, r in rows.items() if r["mismatched"] == "1"} == corrupted
        kinds = [kind for kind, _ in events_seen]
        assert "requests.replayed" in kinds and "workload.done" in kinds
    finally:
        dispatcher.close()
        for sock in (*stages, out):
            sock.close(0)
        ctx.term()
