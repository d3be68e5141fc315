"""Per-frame CPU of the data plane outside onnxruntime: the real dispatcher (load generator
+ sink) feeds two real stage workers,

    dispatcher --600 KB--> A (Identity) --600 KB--> B (GlobalAveragePool) --12 B--> sink

in a closed loop, every result checked, and the CPU each process spends per frame is read
from the kernel (/proc/PID/task/*/schedstat: every thread, ZeroMQ's I/O thread included),
also printed per kind of thread (`python`: the main loop and pyzmq's zero-copy collector;
`ZMQbg/IO/0`: ZeroMQ's I/O thread, which does the socket reads and writes).
A stage's overhead is that CPU minus what its bare `session.run` takes on the same input in
this process (what the profiler charges as compute): the cost model's `frame_overhead_ms`.
The dispatcher's figure is all of it (encode, send, receive, decode, result check).

    .venv/bin/python benchmarks/frame_overhead.py [--frames 1500] [--cpu 0.2]
        [--auth plain|token|curve]
        [--mininet [--bandwidth 100Mbit]] [--port 35000] [--hold-s 0] [--json OUT]

`--auth` secures every hop with per-run keys, each worker admitting only its upstream's key
and the sink only the last stage's (ZAP): `token` authenticates each connection and sends
frames in the clear (the embedded backend's default), `curve` encrypts every frame (the k3s
backend's, and the embedded one's before); `plain` (default) is `--plaintext`.

By default everything runs on loopback in this process's namespace. `--cpu C` (root,
cgroup v1) runs each worker under a CFS quota of C cores. `--mininet` (root) runs the same
pipeline in Mininet hosts (the workers on `--cpu` cores, 0.2 by default, behind shaped links;
the dispatcher inside its own host, started by this script) and adds each host's cgroup
CPU per frame, which also holds what the kernel charges the host for its packets: over a
shaped veth a frame costs more than on loopback (ZeroMQ's I/O thread wakes for every paced
burst of packets). `--hold-s S` keeps the load running S more seconds after the
measurement, so a profiler can attach (`py-spy record --pid ...`, `perf record -p ...`);
the workers' PIDs are printed. Timing noise from other processes is large on a shared
machine: compare two versions by running them at the same time, several times.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import zmq
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stage_image.security import Gate, KeyPair, start_gates  # noqa: E402
from stage_image.worker import make_session  # noqa: E402
from testbed.control.dispatcher import (  # noqa: E402
    Dispatcher,
    Head,
    Route,
    Workload,
    compute_references,
    seeded_pool,
)

SHAPE = [1, 3, 224, 224]            # float32: 602112 bytes, resnet's input
CPU_ROOT = Path("/sys/fs/cgroup/cpu")
CPUACCT_ROOT = Path("/sys/fs/cgroup/cpuacct")


def build_models(root: Path) -> dict[str, Path]:
    """Stage A passes the image on (600 KB in and out), stage B reduces it to 3 floats; the
    full model is both, so the dispatcher checks every result against a reference."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, SHAPE)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 1, 1])
    ident = helper.make_node("Identity", ["x"], ["h"])
    pool = helper.make_node("GlobalAveragePool", ["h"], ["y"])
    paths = {}
    for name, nodes, ins, outs in (("a", [ident], [x], [h]), ("b", [pool], [h], [y]),
                                   ("full", [ident, pool], [x], [y])):
        model = helper.make_model(helper.make_graph(nodes, name, ins, outs),
                                  opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        paths[name] = root / f"{name}.onnx"
        onnx.save(model, paths[name])
    return paths


def thread_ns(pid: int) -> dict[str, int]:
    """CPU time of every live thread of a process, in ns, by thread (`comm` + tid): the
    main loop, ZeroMQ's I/O thread (ZMQbg/IO/0), pyzmq's zero-copy garbage collector."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            out[f"{name}/{task.name}"] = int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            pass                        # a thread that ended meanwhile
    return out


def by_thread(before: dict[str, int], after: dict[str, int], frames: int) -> dict[str, float]:
    """CPU ms per frame of each thread kind (tids dropped: `python`, `ZMQbg/IO/0`, ...)."""
    out: dict[str, float] = {}
    for key, ns in after.items():
        kind = key.rsplit("/", 1)[0]
        out[kind] = out.get(kind, 0.0) + (ns - before.get(key, 0)) / frames / 1e6
    return {kind: round(ms, 4) for kind, ms in out.items() if ms >= 0.0005}


def bare_run_ms(model: Path, feeds: dict[str, np.ndarray], runs: int = 300) -> float:
    """CPU ms of one `session.run` in this thread, as the worker calls it."""
    sess = make_session(str(model))
    names = [o.name for o in sess.get_outputs()]
    for _ in range(20):
        sess.run(names, feeds)
    start = time.thread_time_ns()
    for _ in range(runs):
        sess.run(names, feeds)
    return (time.thread_time_ns() - start) / runs / 1e6


class Quota:
    """A cgroup v1 CPU group with a CFS quota, removed when the benchmark ends."""

    def __init__(self, name: str, cores: float) -> None:
        self.path = CPU_ROOT / name
        self.path.mkdir()
        (self.path / "cpu.cfs_period_us").write_text("100000")
        (self.path / "cpu.cfs_quota_us").write_text(str(int(cores * 100000)))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        for pid in (self.path / "cgroup.procs").read_text().split():
            (CPU_ROOT / "cgroup.procs").write_text(pid)
        self.path.rmdir()


def make_keys(tmp: Path, auth: str) -> dict[str, KeyPair] | None:
    """Per-run keys of A, B and the dispatcher (`--auth`), saved for the `--inside` side."""
    if auth == "plain":
        return None
    keys = {name: KeyPair.generate() for name in ("A", "B", "dispatcher")}
    (tmp / "keys.json").write_text(json.dumps({n: k.to_json() for n, k in keys.items()}))
    return keys


def load_keys(tmp: Path) -> dict[str, KeyPair] | None:
    path = tmp / "keys.json"
    if not path.exists():
        return None
    return {n: KeyPair.from_secret(k["secret"]) for n, k in json.loads(path.read_text()).items()}


def worker_config(tmp: Path, name: str, model: Path, bind: str, nxt: str,
                  inputs: list[str], outputs: list[str],
                  keys: dict[str, KeyPair] | None, auth: str) -> Path:
    """A worker of epoch 1; with keys, it admits only its upstream (the dispatcher for A, A
    for B) and encrypts to the next hop (B, or the dispatcher's sink), as an agent sets it."""
    route: dict[str, Any] = {"stage": 0, "next": nxt}
    extra: dict[str, Any] = {}
    if keys is not None:
        upstream, downstream = {"A": ("dispatcher", "B"), "B": ("A", "dispatcher")}[name]
        route.update(public=keys[downstream].public.decode(),
                     upstream=[keys[upstream].public.decode()])
        extra = {"curve_secret": keys[name].secret.decode(), "upstream_gate": True,
                 "data_auth": auth}
    config = tmp / f"{name}.json"
    config.write_text(json.dumps({"host": name, "version": 1, "model": str(model),
                                  "bind": bind, "inputs": inputs, "outputs": outputs,
                                  "routes": {"1": route}, "stats_every_s": 3600.0,
                                  **extra}))
    return config


def measure(models: dict[str, Path], head: str, sink: str, pids: dict[str, int],
            args: argparse.Namespace, keys: dict[str, KeyPair] | None) -> dict[str, float]:
    """The dispatcher's side: closed-loop load through the workers, every result checked;
    CPU per frame of each process over the measured frames (and when they were)."""
    log = logging.getLogger("dispatcher")
    ctx = zmq.Context(1)
    gates = None
    if keys is not None:        # the sink admits the last stage only, as the controller's
        gates = start_gates(ctx, {"sink": Gate([keys["B"].public], own=keys["dispatcher"])})
    dispatcher = Dispatcher(ctx, sink, lambda *a, **k: None, log,
                            keys=keys["dispatcher"] if keys else None,
                            zap_domain="sink" if keys else None,
                            data_auth="curve" if args.auth == "plain" else args.auth)
    workload = Workload(concurrency=args.concurrency, duration_s=3600.0, pool_size=8)
    pool = seeded_pool(models["full"], workload)
    dispatcher.set_pool(pool)
    dispatcher.add_version(1, compute_references(models["full"], pool))
    public = keys["A"].public.decode() if keys else None
    dispatcher.switch(Route(1, 1, [Head(head, public)], ["x"]), replay=False)
    dispatcher.start(workload)
    poller = zmq.Poller()
    poller.register(dispatcher.sink, zmq.POLLIN)

    def serve_until(count: int) -> None:
        while dispatcher.completed < count:
            now = time.monotonic()
            dispatcher.pump(now)
            poller.poll(int(1000 * min(dispatcher.next_wakeup(now), 0.01)) or 1)
            dispatcher.on_sink()

    try:
        serve_until(args.warmup)
        pids = {**pids, "dispatcher": os.getpid()}
        before = {name: thread_ns(pid) for name, pid in pids.items()}
        done0, wall0, start = dispatcher.completed, time.monotonic(), time.time()
        serve_until(args.warmup + args.frames)
        after = {name: thread_ns(pid) for name, pid in pids.items()}
        end = time.time()
        frames, wall = dispatcher.completed - done0, time.monotonic() - wall0
        if args.hold_s:
            print(f"holding the load {args.hold_s:.0f} s for a profiler", file=sys.stderr,
                  flush=True)
            hold_from, hold_until = dispatcher.completed, time.monotonic() + args.hold_s
            while time.monotonic() < hold_until:
                serve_until(dispatcher.completed + 1)
            print(f"held: {(dispatcher.completed - hold_from) / args.hold_s:.1f} frames/s",
                  file=sys.stderr, flush=True)
        counts = dispatcher.counts()
    finally:
        dispatcher.close()
        if gates is not None:
            gates.stop()
        ctx.term()
    if counts["mismatched"] or counts["bad_results"]:
        raise RuntimeError(f"wrong results: {counts}")
    out: dict[str, Any] = {"frames": frames, "rps": frames / wall, "start": start,
                             "end": end}
    for name in pids:
        threads = by_thread(before[name], after[name], frames)
        out[f"{name}_cpu_ms"] = sum(threads.values())
        out[f"{name}_threads"] = threads
    return out


def add_compute(result: dict[str, float], models: dict[str, Path], image: np.ndarray) -> None:
    """Overhead = CPU per frame - the bare `session.run` on the same input."""
    bare = {"A": bare_run_ms(models["a"], {"x": image}),
            "B": bare_run_ms(models["b"], {"h": image}), "dispatcher": 0.0}
    for name, ms in bare.items():
        result[f"{name}_ort_ms"] = ms
        result[f"{name}_overhead_ms"] = result[f"{name}_cpu_ms"] - ms
        if f"{name}_host_cpu_ms" in result:
            result[f"{name}_host_overhead_ms"] = result[f"{name}_host_cpu_ms"] - ms


def wait_ready(procs: dict[str, subprocess.Popen[bytes]], logs: dict[str, Path]) -> None:
    deadline = time.monotonic() + 120
    while not all("ready" in logs[n].read_text().split() for n in procs):
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"worker {name} exited: see {logs[name]}")
        if time.monotonic() > deadline:
            raise RuntimeError("workers did not start in 120 s")
        time.sleep(0.2)


def run_local(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    models = build_models(tmp)
    keys = make_keys(tmp, args.auth)
    addr = {k: f"tcp://127.0.0.1:{args.port + i}" for i, k in enumerate(("a", "b", "sink"))}
    configs = {"A": worker_config(tmp, "A", models["a"], addr["a"], addr["b"], ["x"], ["h"],
                                  keys, args.auth),
               "B": worker_config(tmp, "B", models["b"], addr["b"], addr["sink"], ["h"],
                                  ["y"], keys, args.auth)}
    logs = {name: tmp / f"{name}.log" for name in configs}
    procs = {name: subprocess.Popen([sys.executable, "-m", "stage_image.worker",
                                     str(config)], cwd=ROOT, stdin=subprocess.DEVNULL,
                                    stdout=logs[name].open("wb"), stderr=subprocess.STDOUT)
             for name, config in configs.items()}
    quotas = []
    try:
        if args.cpu:
            for name, proc in procs.items():
                quota = Quota(f"edgepipe-overhead-{os.getpid()}-{name}", args.cpu)
                quotas.append(quota)
                quota.add(proc.pid)
        wait_ready(procs, logs)
        print("pids: " + " ".join(f"{n}={p.pid}" for n, p in procs.items())
              + f" dispatcher={os.getpid()}", file=sys.stderr, flush=True)
        result = measure(models, addr["a"], addr["sink"],
                         {name: proc.pid for name, proc in procs.items()}, args, keys)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(10)
        for quota in quotas:
            quota.remove()
    return result


def run_mininet(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """The same pipeline in Mininet hosts: A and B on `--cpu` cores (0.2 by default) behind
    `--bandwidth` links, the dispatcher on 0.5 core behind 1 Gbit; CPU is read per process
    and per host cgroup (which also holds what the kernel charges the host for its
    packets)."""
    from formats.topology import load_topology
    from testbed.emulation.network import EmulatedNetwork

    cpu = args.cpu or 0.2
    topology_path = tmp / "topology.yaml"
    topology_path.write_text(
        "name: overhead\n"
        f"defaults:\n  host: {{cpu: {cpu}, memory: 512MiB, disk: 64MiB}}\n"
        f"  link: {{bandwidth: {args.bandwidth}}}\n"
        "hosts:\n  dispatcher: {role: dispatcher, cpu: 0.5, memory: 1GiB}\n"
        "  edgea: {}\n  edgeb: {}\nswitches: [s1]\nlinks:\n"
        "  - {endpoints: [dispatcher, s1], bandwidth: 1Gbit}\n"
        "  - {endpoints: [edgea, s1]}\n  - {endpoints: [edgeb, s1]}\n")
    models = build_models(tmp)
    keys = make_keys(tmp, args.auth)
    with EmulatedNetwork(load_topology(topology_path), run_dir=tmp / "run") as net:
        addr = {"a": f"tcp://{net.ip('edgea')}:{args.port}",
                "b": f"tcp://{net.ip('edgeb')}:{args.port}",
                "sink": f"tcp://{net.ip('dispatcher')}:{args.port}"}
        configs = {"A": worker_config(tmp, "A", models["a"], addr["a"], addr["b"], ["x"],
                                      ["h"], keys, args.auth),
                   "B": worker_config(tmp, "B", models["b"], addr["b"], addr["sink"], ["h"],
                                      ["y"], keys, args.auth)}
        hosts = {"A": "edgea", "B": "edgeb", "dispatcher": "dispatcher"}
        logs = {name: tmp / f"{name}.log" for name in hosts}
        procs = {name: net.popen_python(hosts[name], ["-m", "stage_image.worker", str(config)],
                                        logs[name]) for name, config in configs.items()}
        wait_ready(procs, logs)
        result_path = tmp / "result.json"
        inner = [str(Path(__file__).resolve()), "--inside", str(tmp), "--head", addr["a"],
                 "--sink", addr["sink"], "--json", str(result_path),
                 "--pids", ",".join(f"{n}={p.pid}" for n, p in procs.items()),
                 "--frames", str(args.frames), "--warmup", str(args.warmup),
                 "--concurrency", str(args.concurrency), "--hold-s", str(args.hold_s),
                 "--auth", args.auth]
        print("pids: " + " ".join(f"{n}={p.pid}" for n, p in procs.items()), file=sys.stderr,
              flush=True)
        # the hosts' cgroups are read from here (a host's own mount namespace hides them)
        sampler = HostSampler({name: net.names[host] for name, host in hosts.items()})
        dispatcher = net.popen_python("dispatcher", inner, logs["dispatcher"])
        with sampler:
            code = dispatcher.wait()
        if code != 0 or not result_path.exists():
            raise RuntimeError(f"the dispatcher failed: {logs['dispatcher'].read_text()[-2000:]}")
    result = json.loads(result_path.read_text())
    for name in hosts:
        used = sampler.at(name, result["end"]) - sampler.at(name, result["start"])
        result[f"{name}_host_cpu_ms"] = used / result["frames"] / 1e6
    return result


class HostSampler:
    """cpuacct.usage of some cgroups every 50 ms from a thread, interpolated at given times
    (the measured window is known only to the dispatcher inside its host)."""

    def __init__(self, groups: dict[str, str]) -> None:
        self.paths = {name: CPUACCT_ROOT / group / "cpuacct.usage"
                      for name, group in groups.items()}
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.time(), {name: int(path.read_text())
                                               for name, path in self.paths.items()}))
            if self.stop.wait(0.05):
                return

    def __enter__(self) -> HostSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def at(self, name: str, when: float) -> float:
        times = [t for t, _ in self.samples]
        i = min(max(bisect.bisect_left(times, when), 1), len(times) - 1)
        (t0, a), (t1, b) = self.samples[i - 1], self.samples[i]
        return a[name] + (b[name] - a[name]) * (when - t0) / max(t1 - t0, 1e-9)


def pairs(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if item)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1500, help="measured frames")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--cpu", type=float, default=0.0,
                        help="CFS quota per worker in cores (root); 0 = none (--mininet: 0.2)")
    parser.add_argument("--auth", choices=("plain", "token", "curve"), default="plain",
                        help="keys and allow-lists on every hop: token (the default of runs) "
                             "or curve (every frame encrypted)")
    parser.add_argument("--mininet", action="store_true",
                        help="workers and dispatcher in Mininet hosts (root)")
    parser.add_argument("--bandwidth", default="100Mbit", help="--mininet: the edge links")
    parser.add_argument("--port", type=int, default=35000, help="three ports from here")
    parser.add_argument("--hold-s", type=float, default=0.0)
    parser.add_argument("--json", help="also write the figures here")
    # the dispatcher's side of --mininet, run inside the dispatcher host
    parser.add_argument("--inside", help=argparse.SUPPRESS)
    parser.add_argument("--head", help=argparse.SUPPRESS)
    parser.add_argument("--sink", help=argparse.SUPPRESS)
    parser.add_argument("--pids", type=pairs, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        models = {name: Path(args.inside) / f"{name}.onnx" for name in ("a", "b", "full")}
        result = measure(models, args.head, args.sink,
                         {name: int(pid) for name, pid in args.pids.items()}, args,
                         load_keys(Path(args.inside)))
        Path(args.json).write_text(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory(prefix="edgepipe-overhead-") as tmp:
        result = (run_mininet if args.mininet else run_local)(args, Path(tmp))
        image = seeded_pool(Path(tmp) / "full.onnx", Workload(pool_size=1))[0]["x"]
        add_compute(result, build_models(Path(tmp)), image)
    where = (f"Mininet hosts of {args.cpu or 0.2} core, {args.bandwidth} links" if args.mininet
             else f"loopback, workers at {args.cpu} core" if args.cpu else "loopback")
    where = f"{args.auth}, {where}"
    print(f"{result['frames']} frames at {result['rps']:.1f}/s ({where})")
    print(f"{'process':12} {'cpu ms/frame':>13} {'onnxruntime':>12} {'overhead':>9}"
          + (f" {'host cpu ms':>12} {'host overhead':>14}" if args.mininet else ""))
    for name in ("A", "B", "dispatcher"):
        line = (f"{name:12} {result[name + '_cpu_ms']:>13.3f} {result[name + '_ort_ms']:>12.3f} "
                f"{result[name + '_overhead_ms']:>9.3f}")
        if args.mininet:
            line += (f" {result[name + '_host_cpu_ms']:>12.3f} "
                     f"{result[name + '_host_overhead_ms']:>14.3f}")
        print(line)
    for name in ("A", "B", "dispatcher"):
        print(f"  {name} by thread (ms/frame): "
              + " ".join(f"{k}={v:.3f}" for k, v in sorted(result[name + "_threads"].items())))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
