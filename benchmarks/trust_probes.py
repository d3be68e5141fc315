"""The probes of issue 15 ("Trust and bad input"), each run as a user or an attacker would, with
the outcome printed one line per probe: exit code and the first line of the error (or the
last line of a traceback). Run it on two checkouts to get the before/after table:

    .venv/bin/python benchmarks/trust_probes.py --repo /path/to/old/checkout   # before
    .venv/bin/python benchmarks/trust_probes.py                                # after

Probes 3-8 call the checkout's own command lines (run_scenario.py --check / --dry-run,
`python -m partitioner profile|solve`) on files made here. Probes 1-2 need this branch's code
(tests/test_hostile_peers.py's cluster, on loopback, ports 24000-24999): they run the same
attacks on a pipeline with `plaintext` (no keys: what every checkout before issue 15 ran) and
with the default per-run keys, and print both. Nothing needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

TOPOLOGY = """name: tr-star
hosts:
  dispatcher: {role: dispatcher, cpu: 0.5}
  edge1: {}
switches: [s1]
links:
  - {endpoints: [dispatcher, s1]}
  - {endpoints: [edge1, s1]%s}
"""
SCENARIO = """name: %s
topology: topo.yaml
model: {%s}
workload: {mode: closed, concurrency: %s, duration: 10s}
"""


def outcome(proc: subprocess.CompletedProcess[str] | None, timeout_s: float | None = None,
            ) -> str:
    if proc is None:
        return f"killed after {timeout_s:g} s (no answer)"
    if proc.returncode == 0 and proc.stdout.startswith("{"):
        plan = json.loads(proc.stdout)
        return (f"exit 0: a plan, bottleneck {plan['bottleneck_ms']:.4g} ms, optimal "
                f"{plan['optimal']}")
    text = (proc.stderr or "").strip().splitlines()
    if "Traceback (most recent call last):" in (proc.stderr or ""):
        return f"exit {proc.returncode}: traceback: {text[-1][:110] if text else ''}"
    errors = [line for line in text if "error" in line.lower()]
    line = errors[0] if errors else (text[-1] if text else (proc.stdout or "").strip()[:110])
    return f"exit {proc.returncode}: {line[:130]}"


class Probes:
    def __init__(self, repo: Path, work: Path) -> None:
        self.repo, self.work = repo, work
        self.python = str(repo / ".venv" / "bin" / "python")

    def run(self, argv: list[str], timeout_s: float = 120.0) -> str:
        try:
            proc = subprocess.run([self.python, *argv], cwd=self.repo, capture_output=True,
                                  text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return outcome(None, timeout_s)
        return outcome(proc)

    def scenario(self, name: str, text: bytes | None = None, link: str = "",
                 concurrency: str = "4", model: str = "zoo: resnet18",
                 topology: str | None = None) -> Path:
        folder = self.work / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "topo.yaml").write_text(topology or TOPOLOGY % link)
        path = folder / "scenario.yaml"
        if text is None:
            text = (SCENARIO % ("tr-probe", model, concurrency)).encode()
        path.write_bytes(text)
        return path

    def check(self, path: Path, *extra: str) -> str:
        return self.run(["run_scenario.py", str(path), "--check", *extra])

    def instance(self, name: str, data: object | str) -> Path:
        path = self.work / f"{name}.json"
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return path

    def solve(self, path: Path, timeout_s: float = 150.0) -> str:
        started = time.monotonic()
        result = self.run(["-m", "partitioner", "solve", str(path), "--time-limit", "2"],
                          timeout_s)
        return f"{result} [{time.monotonic() - started:.1f} s]"


def instance(segments: int, nodes: int, input_bytes: float = 602112) -> dict[str, object]:
    rng = random.Random(1)
    names = [f"e{i}" for i in range(nodes)]
    return {"segments": [{"compute_ms": rng.uniform(1, 20), "memory_bytes": 1_000_000,
                          "output_bytes": rng.randint(1000, 400_000)} for _ in range(segments)],
            "input_bytes": input_bytes,
            "nodes": [{"name": n, "speed": 1.0, "memory_bytes": 2**34} for n in names],
            "source": "d",
            "bandwidth_mbps": [["d", n, 100.0] for n in names]
            + [[a, b, 100.0] for i, a in enumerate(names) for b in names[i + 1:]]}


def models(folder: Path, python: str) -> None:
    """The broken models of probe 4, made with the checkout's onnx."""
    script = r'''
import sys, onnx
from onnx import helper as h, TensorProto as T
out = sys.argv[1]
def model(nodes, inputs, outputs, inits=()):
    return h.make_model(h.make_graph(nodes, "g", inputs, outputs, list(inits)),
                        opset_imports=[h.make_opsetid("", 17)])
X = h.make_tensor_value_info("x", T.FLOAT, [1, 4])
Y = h.make_tensor_value_info("y", T.FLOAT, [1, 4])
onnx.save(model([h.make_node("Add", ["x", "b"], ["a"]), h.make_node("Relu", ["a"], ["b"]),
                 h.make_node("Relu", ["b"], ["y"])], [X], [Y]), f"{out}/cycle.onnx")
onnx.save(model([h.make_node("Add", ["x", "w"], ["y"])], [X], [Y]), f"{out}/missing_init.onnx")
for name, loc in (("outside", "../../secret.bin"), ("absolute", "/etc/hostname")):
    w = h.make_tensor("w", T.FLOAT, [1, 4], vals=[1, 2, 3, 4])
    w.ClearField("float_data"); w.data_location = T.EXTERNAL
    e = w.external_data.add(); e.key = "location"; e.value = loc
    onnx.save(model([h.make_node("Add", ["x", "w"], ["y"])], [X], [Y], [w]),
              f"{out}/sub/{name}.onnx")
Xb = h.make_tensor_value_info("x", T.FLOAT, [1, 10**12])
Yb = h.make_tensor_value_info("y", T.FLOAT, [1, 10**12])
onnx.save(model([h.make_node("Relu", ["x"], ["y"])], [Xb], [Yb]), f"{out}/huge_dim.onnx")
open(f"{out}/empty.onnx", "wb").close()
'''
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-c", script, str(folder)], check=True)


def chain_model(path: Path, python: str, seed: int) -> None:
    """A model not profiled before (its own seed, so its own SHA-256): profiling it takes a
    few seconds, long enough to send a signal in the middle of a run."""
    script = r'''
import sys, numpy as np, onnx
from onnx import helper as h, numpy_helper, TensorProto as T
rng = np.random.default_rng(int(sys.argv[2])); nodes, inits, prev = [], [], "x"
for i in range(40):
    w = (rng.standard_normal((256, 256)) / 16).astype(np.float32)
    inits.append(numpy_helper.from_array(w, f"w{i}"))
    nodes.append(h.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
    prev = "y" if i == 39 else f"r{i}"
    nodes.append(h.make_node("Relu", [f"m{i}"], [prev]))
g = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, [1, 256])],
                 [h.make_tensor_value_info("y", T.FLOAT, [1, 256])], inits)
m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)]); m.ir_version = 8
onnx.save(m, sys.argv[1])
'''
    subprocess.run([python, "-c", script, str(path), str(seed)], check=True)


def interrupted(p: Probes, sig: int) -> str:
    """Probe 8: a run (--dry-run: no root) gets `sig` while it profiles a fresh model."""
    folder = p.work / f"signal{sig}"
    folder.mkdir(parents=True, exist_ok=True)
    chain_model(folder / "chain.onnx", p.python, seed=int(time.time()) + sig)
    path = p.scenario(f"signal{sig}", model="path: chain.onnx")
    proc = subprocess.Popen([p.python, "run_scenario.py", str(path), "--dry-run", "--out",
                             str(folder / "out")], cwd=p.repo, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = ""
    for line in proc.stderr:
        seen += line
        if "profiling" in line:
            time.sleep(0.1)
            proc.send_signal(sig)
            break
    rest = proc.communicate(timeout=120)[1]
    name = signal.Signals(sig).name
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", seen + rest)
    return f"{name}: {outcome(result)}"


def hostile(plaintext: bool) -> str:
    """Probes 1-2 on loopback: a forged hello + `worker failed` as a healthy host, forged
    results for every request id; the outcome as the run's counters."""
    sys.path.insert(0, str(HERE))
    import numpy as np
    import zmq

    from stage_image.security import KeyPair
    from stage_image.wire import encode_control, encode_tensors
    from tests import test_hostile_peers, test_recovery

    test_recovery.PORT_BASE = test_hostile_peers.PORT_BASE + (100 if plaintext else 200)
    root = Path(tempfile.mkdtemp(prefix="tr-hostile-"))
    hosts = {"edge1": 1.0, "edge2": 1.0, "edge3": 1.0}
    workload = {"mode": "closed", "concurrency": 4, "duration_s": 6.0, "timeout_s": 2.0,
                "drain_timeout_s": 8.0, "pool_size": 8}
    cluster = (test_recovery.Cluster(root, hosts, 0, workload=workload) if plaintext
               else test_hostile_peers.KeyedCluster(root, hosts, workload=workload))
    try:
        ready = cluster.ready(60)
        epoch, victim = ready["epoch"], ready["endpoints"][0]
        assert cluster("start_workload")["ok"]
        time.sleep(0.5)
        sent = cluster("status")["sent"]
        ctx = zmq.Context.instance()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.ROUTING_ID, victim["host"].encode())
        sink = ctx.socket(zmq.PUSH)
        sink.setsockopt(zmq.LINGER, 0)
        sink.setsockopt(zmq.SNDTIMEO, 200)
        if not plaintext:      # the attacker knows the public keys, holds no admitted one
            from stage_image.security import apply_client

            stranger = KeyPair.generate()
            apply_client(dealer, stranger, str(cluster.curve_public))
            _, sink_public = test_hostile_peers._worker_keys(root)
            apply_client(sink, stranger, str(sink_public))
        dealer.connect(f"tcp://{test_recovery.DISPATCHER_IP}:{cluster.port}")
        sink.connect(f"tcp://{test_recovery.DISPATCHER_IP}:{cluster.port + 1}")
        dealer.send_multipart(encode_control("hello", host=victim["host"], pid=1,
                                             ip=test_recovery.NODE_IPS[victim["host"]]))
        dealer.send_multipart(encode_control("worker", port=victim["port"], epoch=epoch,
                                             stage=0, state="failed", reason="exit",
                                             detail="forged"))
        for rid in range(sent + 200):
            try:
                sink.send_multipart(encode_tensors(rid, epoch, 1, 0.0,
                                                   {"y": np.zeros((1, 32), np.float32)}))
            except zmq.Again:
                pass
        time.sleep(1.0)
        dealer.close(0)
        sink.close(0)
        done = cluster.wait("done", lambda s: s["state"] == "done", 60)
        replans = [e.get("reason") for e in cluster.events() if e["type"] == "replan.requested"]
        restarted = sum(e["type"] == "agent.restarted" for e in cluster.events())
        return (f"epoch {epoch}->{done['epoch']}, re-plans {replans or 0}, agent.restarted "
                f"{restarted}; duplicates {done['duplicates']}, mismatched "
                f"{done['mismatched']}, bad/stale results {done['bad_results']}/"
                f"{done['stale_results']}, lost {done['lost']}")
    finally:
        cluster.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(HERE), help="the checkout to probe (3-8)")
    parser.add_argument("--skip-peers", action="store_true", help="skip probes 1-2")
    parser.add_argument("--only", help="run only the probes whose name contains this")
    args = parser.parse_args()
    repo = Path(args.repo).resolve()
    work = Path(tempfile.mkdtemp(prefix="tr-probes-"))
    p = Probes(repo, work)
    models(work / "models", p.python)
    good = (SCENARIO % ("tr-probe", "zoo: resnet18", "4")).encode()
    hosts = "".join(f"  edge{i}: {{}}\n" for i in range(1, 500))
    links = "".join(f"  - {{endpoints: [edge{i}, s1]}}\n" for i in range(1, 500))
    big = (f"name: tr-big\nhosts:\n  dispatcher: {{role: dispatcher}}\n{hosts}switches: [s1]\n"
           f"links:\n  - {{endpoints: [dispatcher, s1]}}\n{links}")
    probes: list[tuple[str, Callable[[], str]]] = [
        ("3 scenario with a non-UTF-8 byte",
         lambda: p.check(p.scenario("utf8", good.replace(b"name: ", b"# \xff\nname: ")))),
        ("3 scenario with a control character",
         lambda: p.check(p.scenario("ctrl", good.replace(b"name: ", b"# \x07\nname: ")))),
        ("3 scenario with 20,000 nested brackets",
         lambda: p.check(p.scenario("deep", good + b"steps: " + b"[" * 20000 + b"]" * 20000
                                    + b"\n"))),
        ("3 instance JSON nested 20,000 deep",
         lambda: p.solve(p.instance("deep", "[" * 20000 + "]" * 20000))),
        *[(f"4 model: {name}",
           (lambda name=name: p.run(["-m", "partitioner", "profile",
                                     str(work / "models" / f"{name}.onnx")])))
          for name in ("cycle", "missing_init", "sub/outside", "sub/absolute", "huge_dim",
                       "empty")],
        ("5 concurrency: 100000000",
         lambda: p.check(p.scenario("conc", concurrency="100000000"))),
        ("5 a 500-host topology",
         lambda: p.check(p.scenario("big", topology=big))),
        ("5 instance input_bytes: 1e300",
         lambda: p.solve(p.instance("huge", instance(10, 3, 1e300)))),
        ("5 solve 10,000 segments, --time-limit 2",
         lambda: p.solve(p.instance("seg10k", instance(10_000, 5)))),
        ("5 solve 300 segments x 200 nodes, --time-limit 2",
         lambda: p.solve(p.instance("n200", instance(300, 200)))),
        ("6 name: ../../../../../tmp/x",
         lambda: p.check(p.scenario("path", good.replace(b"tr-probe",
                                                         b"../../../../../tmp/x")))),
        ("6 name: \"a;b\"", lambda: p.check(p.scenario("semi", good.replace(
            b"tr-probe", b'"a;b"')))),
        *[(f"7 link bandwidth: {bw}",
           (lambda bw=bw: p.check(p.scenario(f"bw{bw}", link=f", bandwidth: {bw}"))))
          for bw in ("1bit", "1Tbit")],
        ("7 host disk: 1000000TiB", lambda: p.check(p.scenario(
            "disk", topology=TOPOLOGY.replace("edge1: {}", "edge1: {disk: 1000000TiB}") % ""))),
        ("8 SIGINT during a run", lambda: interrupted(p, signal.SIGINT)),
        ("8 SIGTERM during a run", lambda: interrupted(p, signal.SIGTERM)),
    ]
    if not args.skip_peers:
        probes += [("1+2 forged hello/worker failed + forged results, plaintext",
                    lambda: hostile(True)),
                   ("1+2 the same attacks, per-run keys (default)", lambda: hostile(False))]
    print(f"# probes of issue 15 on {repo} ({time.strftime('%Y-%m-%d %H:%M')})")
    for name, probe in probes:
        if args.only and args.only not in name:
            continue
        try:
            result = probe()
        except Exception as exc:    # a probe that breaks is an outcome too
            result = f"probe failed: {type(exc).__name__}: {exc}"[:160]
        print(f"{name:<52} | {result}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
