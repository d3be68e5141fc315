"""The cost model: per-segment compute, memory and bytes of a model, and the planner instance
for a set of hosts or a topology.

Division of labour: `partitioner.cuts` gives the segments (and the bytes crossing each cut),
this module measures and estimates what each segment costs, `partitioner.algorithms` plans
on the resulting `Instance`. Profiles are cached by the model's SHA-256 (and the cut
options) in $EDGEPIPE_CACHE/profiles/, since profiling a large model takes a while.

Compute. A segment's share of the time comes from onnxruntime's profiler; its sum is scaled
to the measured latency of the fully optimised session (ORT_ENABLE_ALL, 1 intra-op thread,
no spinning: as the workers run). Two profiles are taken:
- ORT_ENABLE_BASIC, where kernels keep their ONNX node names (1:1), gives each node's cost;
- ORT_ENABLE_ALL, what the workers run, where convolutions move to the NCHWc layout and fuse
  with their activations. Its kernels map back to ONNX names ("<node>_nchwc",
  "<node>/<Fusion>"), layout reorders are charged to the kernel they feed, and a fused
  kernel's time is shared by the nodes fused into it in proportion to their BASIC costs.
The optimised attribution is used (the BASIC one only as a fallback when the optimised
kernels cannot be matched), because NCHWc speeds up early, wide convolutions far more than
late ones: measured on two-stage splits of resnet18/resnet50/mobilenetv2, scaling the BASIC
distribution uniformly misplaced the first stage's share by 0.06-0.23 (of the whole), the
optimised attribution by 0.01-0.10.

Memory (bytes a stage adds to its host's memory cgroup), measured and fitted on this machine
kind with onnxruntime 1.32 at ORT_ENABLE_ALL, as the workers run:

    stage memory = sum over the initializers it reads of (1 + k(op)) * bytes      (weights)
                   + ACTIVATION_FACTOR * (the model's largest activation)        (reserve)

The 1 is the cached model file on the host's tmpfs (charged to the same cgroup); k(op) is how
many copies onnxruntime holds at its load peak, by the kind of op that reads the weight
(`WEIGHT_COPIES`: a k x k convolution is kept twice, once reordered to the NCHWc layout, plus
the parse buffer; MatMul weights are prepacked; a Gather table is parsed and copied once).
The activation term covers the received input, the largest output being written and the
result handed back. The weight term is additive over segments, so it is each segment's
`memory_bytes`. The activation term is not: a stage of ten segments does not hold ten
largest activations at once, and summing them overstated early CNN stages threefold in
measurement. So it is a per-model reserve (one stage per host) taken off every node's
memory together with the runtime allowance: node memory = host memory -
RUNTIME_ALLOWANCE_BYTES - activation reserve, floored at 0 (conservative for later stages,
whose activations are smaller). The first formula, `weights x 2 + largest activation`
(docs/architecture.md), underestimated a real resnet50 stage by 45% at ORT_ENABLE_ALL.
`measure_stage_memory` runs a real stage process; tests/test_profile.py holds the formula to
within 20% of it.

What a host needs besides its stage is `RUNTIME_ALLOWANCE_BYTES`: the agent interpreter, the
worker interpreter with onnxruntime, numpy and pyzmq imported, and an onnxruntime session's
own overhead (thread pool, allocator, kernel registry); one stage per host, so it is a per
host constant.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from partitioner import cuts as cutlib
from partitioner import split as splitlib
from partitioner.instance import Instance, Node, Segment
from partitioner.zoo import cache_dir, resolve_model

MiB = 1024 * 1024

# Measured on the project's machine kind (python 3.11, onnxruntime 1.32), peak RSS (VmHWM):
AGENT_RSS_BYTES = 28 * MiB          # `import stage_image.agent`: 23.5 MiB; + fetch buffers
WORKER_RSS_BYTES = 60 * MiB         # numpy + onnxruntime + pyzmq + stage_image.worker: 56.9 MiB
SESSION_OVERHEAD_BYTES = 10 * MiB   # a 2-node session, worker options, after a run: 8.6 MiB
RUNTIME_ALLOWANCE_BYTES = AGENT_RSS_BYTES + WORKER_RSS_BYTES + SESSION_OVERHEAD_BYTES
# CPU a stage spends per request besides onnxruntime (full-core ms): receiving and sending
# frames (mostly the kernel's TCP work in ZeroMQ's I/O thread: about half of it), header
# checks and the worker's loop, the agent beside it. Measured by benchmarks/frame_overhead.py
# --mininet (real workers in 0.2-core Mininet hosts behind 100 Mbit links, a trivial model,
# 600 KB frames, host cgroup CPU per frame - the bare session.run): 1.4-1.55 ms for a stage
# receiving and sending 600 KB, 1.2-1.4 ms receiving 600 KB and sending 12 bytes; the agent
# adds 0.002 cores (~0.15 ms a frame at 15 frames/s). Real resnet18 stages on star-5 spent
# 1.3-2.0 ms of host CPU per frame over their bare session.run. (The 3.5 ms this replaces
# was host CPU / rate - the cached profile's compute, which folds the profile's own noise in.)
FRAME_OVERHEAD_MS = 1.5
# A host limited by a CFS quota runs in slices (`cores` x the 100 ms period) and starts each
# slice with caches the other hosts have since filled: about 2 ms of every period is spent
# warming up. So a host of `cores` computes like `cores - CFS_WARMUP_CORES` of a free core.
# Measured here with resnet18 alone in a cgroup (34.2 ms profiled at a full core): 406-430
# ms a frame at 0.1 core (0.080-0.084 effective), 201-226 at 0.2, 118-147 at 0.3, 70 at 0.5;
# and resnet50 on one 0.1-core Mininet host: 970 ms a frame, 986 by this rule, 789 without.
CFS_WARMUP_CORES = 0.02
# Topology links give line rates; a stage's frames see TCP payload rate. A full 1514-byte
# Ethernet frame carries 1448 bytes of payload (IPv4 + TCP with timestamps): 0.956 of the
# line rate, what iperf3 measures through the testbed's HTB links (9.57 of 10 Mbit, 942 of
# 1000). Measured bandwidths (`--measure`, iperf3) are payload rates already.
TCP_PAYLOAD_SHARE = 1448 / 1514

# Copies of a weight onnxruntime holds at its load peak (ORT_ENABLE_ALL), by the reading op.
# From single-op models of ~80 MB of weights and the zoo's stages (load peak - session cost).
WEIGHT_COPIES: dict[str, float] = {
    "Conv": 3.0,            # k x k: original + NCHWc reorder + load buffer
    "Conv1x1": 1.9,         # pointwise: prepacked, no NCHWc copy kept
    "ConvDepthwise": 2.0,
    "ConvTranspose": 3.0,
    "Gemm": 1.9,
    "MatMul": 1.5,
    "Gather": 2.0,
}
DEFAULT_WEIGHT_COPIES = 2.0
ACTIVATION_FACTOR = 3

PROFILE_FORMAT = 3


@dataclass
class ModelProfile:
    """Costs of one model's segments (the instance's `segments`) and where they came from."""

    model: str
    sha256: str
    segments: list[Segment]
    input_bytes: int
    cuts: list[cutlib.Cut]
    total_ms: float                      # measured, fully optimised, 1 thread (lower quartile)
    basic_ms: float                      # sum of node kernel times at ORT_ENABLE_BASIC
    runs: int
    segment_nodes: list[list[str]] = field(default_factory=list)
    weight_bytes: list[int] = field(default_factory=list)
    activation_bytes: list[int] = field(default_factory=list)    # largest, per segment
    activation_reserve_bytes: int = 0    # ACTIVATION_FACTOR x the largest activation
    unattributed_ms: float = 0.0         # BASIC kernels that match no ONNX node
    attribution: str = "optimised"       # how kernel times were split into segments
    max_tensors: int = cutlib.DEFAULT_MAX_TENSORS
    region_share: float = cutlib.DEFAULT_REGION_SHARE

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cuts"] = [{**c.to_json(), "position": c.position} for c in self.cuts]
        data["format"] = PROFILE_FORMAT
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelProfile:
        data = dict(data)
        data.pop("format", None)
        data["segments"] = [Segment(**s) for s in data["segments"]]
        data["cuts"] = [
            cutlib.Cut(c["index"], c["position"],
                       tuple(cutlib.TensorInfo(t["name"], t["dtype"], tuple(t["shape"]),
                                               t["bytes"]) for t in c["tensors"]),
                       c["kind"])
            for c in data["cuts"]]
        return cls(**data)

    def stage_memory_bytes(self, first: int, end: int) -> int:
        """Predicted memory of a stage of segments [first, end), reserve included."""
        return (sum(s.memory_bytes for s in self.segments[first:end])
                + self.activation_reserve_bytes)


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- memory ---------------------------------------------------------------------------------
def _initializer_bytes(tensor: onnx.TensorProto) -> int:
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def weight_kind(node: onnx.NodeProto) -> str:
    """The WEIGHT_COPIES key of a node reading a weight."""
    if node.op_type != "Conv":
        return node.op_type
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("group", 1) > 1:
        return "ConvDepthwise"
    if all(k == 1 for k in attrs.get("kernel_shape", [])) and attrs.get("kernel_shape"):
        return "Conv1x1"
    return "Conv"


def segment_memory(model: onnx.ModelProto, analysis: cutlib.CutAnalysis,
                   ) -> tuple[list[int], list[int], list[int]]:
    """(memory_bytes = the weight term, weight bytes, largest activation bytes) per
    segment."""
    sizes = {t.name: _initializer_bytes(t) for t in model.graph.initializer}
    count = analysis.segment_count
    copies: list[dict[str, float]] = [{} for _ in range(count)]
    largest = [max((t.nbytes for t in analysis.boundary(k)), default=0) for k in range(count)]
    for index, node in enumerate(model.graph.node):
        name = node.name or f"<node {index}: {node.op_type}>"
        seg = analysis.node_segment.get(name)
        if seg is None:              # dead node: no stage will hold it
            continue
        factor = WEIGHT_COPIES.get(weight_kind(node), DEFAULT_WEIGHT_COPIES)
        for tensor in node.input:
            if tensor in sizes:
                copies[seg][tensor] = max(copies[seg].get(tensor, 0.0), factor)
        for tensor in node.output:
            if tensor in analysis.tensors:
                largest[seg] = max(largest[seg], analysis.tensors[tensor].nbytes)
    weights = [sum(sizes[t] for t in c) for c in copies]
    memory = [int(sum((1 + k) * sizes[t] for t, k in c.items())) for c in copies]
    return memory, weights, largest


# -- compute --------------------------------------------------------------------------------
def _session_options(level: str, profile_dir: str | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.log_severity_level = 3
    # As the workers run: no spinning, which would only add noise on a shared CPU.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "ort")
    return options


def profile_kernels(model_path: Path, feeds: dict[str, np.ndarray], runs: int,
                    level: str) -> list[list[tuple[str, float]]]:
    """Kernel (name, ms) in execution order, one list per run, from the onnxruntime profiler
    at `level`; the warm-up run (allocations, first-touch page faults) is dropped."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgepipe-prof-") as tmp:
        session = ort.InferenceSession(str(model_path), _session_options(level, tmp),
                                       providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    # Kernel events carry the run they belong to only through time: split on model_run.
    bounds = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                    if e.get("cat") == "Session" and e.get("name") == "model_run")
    runs_out: list[list[tuple[str, float]]] = [[] for _ in bounds]
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        for k, (begin, finish) in enumerate(bounds):
            if begin <= event["ts"] <= finish:
                runs_out[k].append((event["name"][: -len("_kernel_time")],
                                    event["dur"] / 1000.0))
                break
    return runs_out[1:] if len(runs_out) > 1 else runs_out


def _median_by_name(runs: list[list[tuple[str, float]]]) -> dict[str, float]:
    per: dict[str, list[float]] = {}
    for run in runs:
        totals: dict[str, float] = {}
        for name, ms in run:
            totals[name] = totals.get(name, 0.0) + ms
        for name, ms in totals.items():
            per.setdefault(name, []).append(ms)
    return {name: statistics.median(values) for name, values in per.items()}


def _original_name(kernel: str, known: dict[str, int]) -> str | None:
    """The ONNX node a kernel stands for: onnxruntime appends "/<Fusion>" to a fused node
    (BASIC and ALL) and "_nchwc" to a node converted to the NCHWc layout (ALL)."""
    base = kernel.split("/")[0]
    for candidate in (kernel, base, base.removesuffix("_nchwc")):
        if candidate in known:
            return candidate
    return None


def attribute_basic(node_ms: dict[str, float], analysis: cutlib.CutAnalysis,
                    ) -> tuple[list[float], float]:
    """Per-segment ms from BASIC kernel times (names map 1:1), and the unmatched ms."""
    per_segment = [0.0] * analysis.segment_count
    unmatched = 0.0
    for kernel, ms in node_ms.items():
        name = _original_name(kernel, analysis.node_segment)
        if name is None:
            unmatched += ms
        else:
            per_segment[analysis.node_segment[name]] += ms
    return per_segment, unmatched


def attribute_optimised(runs: list[list[tuple[str, float]]], basic: dict[str, float],
                        analysis: cutlib.CutAnalysis) -> tuple[list[float], float]:
    """Per-segment ms from the fully optimised session's kernels.

    At ORT_ENABLE_ALL a kernel can stand for several ONNX nodes (conv + relu become one
    NCHWc conv named after one of them) and new kernels appear (layout reorders, reshapes
    around a fused Gemm). A new kernel's time goes to the next kernel that has an ONNX name
    (it prepares that kernel's input). A kernel's time is shared, in proportion to their
    BASIC times, by its node and the nodes just before it in the order that have no kernel of
    their own (fused into it), so a cut between a conv and its relu still sees the conv's
    cost on the conv's side. Returns per-segment ms and the ms of kernels never matched."""
    known = analysis.node_segment
    kernel_runs: list[dict[str, float]] = []
    unmatched = 0.0
    for run in runs:
        times: dict[str, float] = {}
        pending = 0.0
        for kernel, ms in run:
            name = _original_name(kernel, known)
            if name is None:
                pending += ms
                continue
            times[name] = times.get(name, 0.0) + ms + pending
            pending = 0.0
        unmatched += pending / max(1, len(runs))
        kernel_runs.append(times)
    names = {n for times in kernel_runs for n in times}
    optimised = {n: statistics.median([t.get(n, 0.0) for t in kernel_runs]) for n in names}

    per_segment = [0.0] * analysis.segment_count
    group: list[str] = []
    for name in analysis.order:
        group.append(name)
        if name not in optimised:
            continue
        weight = sum(basic.get(n, 0.0) for n in group)
        for member in group:
            share = basic.get(member, 0.0) / weight if weight > 0 else float(member == name)
            per_segment[known[member]] += optimised[name] * share
        group = []
    for name, ms in optimised.items():          # kernels of static nodes, if any survive
        if name not in analysis.order:
            per_segment[known[name]] += ms
    # Nodes after the last kernel (folded away entirely): their BASIC time, as is.
    for member in group:
        per_segment[known[member]] += basic.get(member, 0.0)
    return per_segment, unmatched


def measure_latency_ms(model_path: Path, feeds: dict[str, np.ndarray], runs: int,
                       level: str = "ORT_ENABLE_ALL") -> float:
    """Wall time of one inference (lower quartile of `runs`), fully optimised, 1 thread,
    after a warm-up run. The lower quartile rather than the median: on a shared CPU other
    processes only ever add time, and the emulator adds its own contention by design."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), _session_options(level),
                                   providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.percentile(times, 25))


# -- the profile ------------------------------------------------------------------------------
def _cache_file(sha256: str, max_tensors: int, region_share: float) -> Path:
    return cache_dir() / "profiles" / f"{sha256}-t{max_tensors}-r{region_share:g}.json"


def profile_model(spec: str | os.PathLike[str], runs: int = 20,
                  max_tensors: int = cutlib.DEFAULT_MAX_TENSORS,
                  region_share: float = cutlib.DEFAULT_REGION_SHARE,
                  refresh: bool = False, progress: bool = True) -> ModelProfile:
    """Profile a model (zoo name or ONNX path); cached by SHA-256 unless `refresh`."""
    path = resolve_model(spec)
    sha = file_sha256(path)
    cached = _cache_file(sha, max_tensors, region_share)
    if cached.is_file() and not refresh:
        try:
            data = json.loads(cached.read_text())
            if data.get("format") == PROFILE_FORMAT:
                profile = ModelProfile.from_json(data)
                profile.model = str(path)
                return profile
        except (ValueError, KeyError, TypeError):
            pass                      # unreadable cache entry: profile again
    model = cutlib.infer_shapes(cutlib.load(path))
    analysis = cutlib.analyze(model, max_tensors, region_share)
    feeds = splitlib.random_feeds(analysis)
    if progress:
        _progress(f"profiling {path.name}: {len(analysis.order)} nodes, "
                  f"{analysis.segment_count} segments, {runs} runs ...")
    basic_runs = profile_kernels(path, feeds, runs, "ORT_ENABLE_BASIC")
    optimised_runs = profile_kernels(path, feeds, runs, "ORT_ENABLE_ALL")
    total_ms = measure_latency_ms(path, feeds, runs)

    node_ms = _median_by_name(basic_runs)
    basic_segments, unattributed = attribute_basic(node_ms, analysis)
    basic_ms = sum(basic_segments)
    per_segment, unmatched = attribute_optimised(optimised_runs, node_ms, analysis)
    attribution = "optimised"
    if sum(per_segment) <= 0 or unmatched > 0.2 * (sum(per_segment) + unmatched):
        # The optimised kernels could not be told apart: fall back to BASIC times alone.
        per_segment, attribution = basic_segments, "basic"
    scale = total_ms / sum(per_segment) if sum(per_segment) > 0 else 0.0
    memory, weights, largest = segment_memory(model, analysis)
    segments = [Segment(ms * scale, mem, cutlib.total_bytes(analysis.boundary(k + 1)))
                for k, (ms, mem) in enumerate(zip(per_segment, memory))]
    profile = ModelProfile(
        model=str(path), sha256=sha, segments=segments,
        input_bytes=cutlib.total_bytes(analysis.boundary(0)), cuts=analysis.cuts,
        total_ms=total_ms, basic_ms=basic_ms, runs=runs,
        segment_nodes=analysis.segment_nodes(), weight_bytes=weights,
        activation_bytes=largest, activation_reserve_bytes=ACTIVATION_FACTOR * max(largest),
        unattributed_ms=unattributed, attribution=attribution,
        max_tensors=max_tensors, region_share=region_share)
    if progress:
        _progress(f"profiled {path.name}: {total_ms:.1f} ms optimised, "
                  f"{basic_ms:.1f} ms at BASIC")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(profile.to_json()))
    os.replace(tmp, cached)
    return profile


# -- instances --------------------------------------------------------------------------------
def node_memory_bytes(host_memory_bytes: int, activation_reserve_bytes: int = 0) -> int:
    """What a host has for its stage's weights once the agent and worker runtimes and the
    model's activation reserve are paid for."""
    return max(0, int(host_memory_bytes) - RUNTIME_ALLOWANCE_BYTES - activation_reserve_bytes)


def effective_speed(cores: float) -> float:
    """What a host of `cores` (a CFS quota) computes like, in free cores (never below half
    its quota: the warm-up is a share of each slice, not all of it)."""
    return max(cores - CFS_WARMUP_CORES, cores / 2)


def instance_for_hosts(profile: ModelProfile, source: str,
                       hosts: list[tuple[str, float, int]],
                       bandwidth_mbps: dict[tuple[str, str], float]) -> Instance:
    """Planner instance: one node per (name, cpu cores, memory bytes) host, speed =
    effective_speed(cores), memory = host memory - runtime allowance - activation
    reserve. Bandwidth pairs between endpoints the instance does not know are left out."""
    reserve = profile.activation_reserve_bytes
    nodes = [Node(name, effective_speed(float(cpu)), node_memory_bytes(mem, reserve))
             for name, cpu, mem in hosts]
    known = {source, *(n.name for n in nodes)}
    bandwidth: dict[tuple[str, str], float] = {}
    for (a, b), mbps in bandwidth_mbps.items():
        if a != b and a in known and b in known and (b, a) not in bandwidth:
            bandwidth[(a, b)] = float(mbps)
    return Instance(list(profile.segments), profile.input_bytes, nodes, source, bandwidth,
                    FRAME_OVERHEAD_MS)


def instance_for_topology(profile: ModelProfile, topology: Any,
                          machine_cores: float | None = None) -> Instance:
    """Instance for a `formats.topology.Topology`: its edge hosts are the nodes, its
    dispatcher the source, path bandwidth the TCP payload rate of the narrowest link on the
    route, and the CPU budget of the machine that emulates it (`machine_budget`)."""
    hosts = [(h.name, h.cpu, h.memory_bytes) for h in topology.edge_hosts()]
    payload = {pair: mbps * TCP_PAYLOAD_SHARE
               for pair, mbps in topology.path_bandwidth_mbps().items()}
    instance = instance_for_hosts(profile, topology.dispatcher().name, hosts, payload)
    disks = {h.name: h.disk_bytes for h in topology.edge_hosts()}
    instance.nodes = [replace(n, disk_bytes=disks[n.name]) for n in instance.nodes]
    if len(profile.weight_bytes) == len(instance.segments):   # older cached profiles lack it
        instance.segments = [replace(s, model_bytes=w)
                             for s, w in zip(instance.segments, profile.weight_bytes)]
    cores = float(os.cpu_count() or 1) if machine_cores is None else machine_cores
    instance.cpu_budget = machine_budget([cpu for _, cpu, _ in hosts],
                                         topology.dispatcher().cpu, cores)
    return instance


def machine_budget(edge_cores: list[float], dispatcher_cores: float,
                   machine_cores: float) -> float:
    """The summed speed the edge hosts can deliver at once on the emulating machine (0: no
    limit). Their CPU quotas are ceilings, not guarantees: when they add up to more than the
    machine has beside the dispatcher's quota, busy hosts share what is there, each getting
    the same fraction of its quota (CFS). Measured: 20 hosts of 0.1 core on 2 cores, all
    busy, used 1.78 cores together, ~0.089 each."""
    promised = sum(edge_cores)
    share = machine_cores - dispatcher_cores
    if promised <= share or promised <= 0:
        return 0.0
    return sum(effective_speed(c) for c in edge_cores) * max(share, 0.0) / promised


# -- measuring a real stage process -----------------------------------------------------------
_MEASURE_SCRIPT = r"""
import json, sys
def peak():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) * 1024
import numpy as np, onnxruntime as ort, zmq  # what a worker imports before its session
try:
    from stage_image.worker import make_session
except Exception:  # the worker module is not importable here: same options by hand
    def make_session(path):
        o = ort.SessionOptions()
        o.intra_op_num_threads = 1
        o.inter_op_num_threads = 1
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        o.add_session_config_entry('session.intra_op.allow_spinning', '0')
        o.add_session_config_entry('session.inter_op.allow_spinning', '0')
        return ort.InferenceSession(path, o, providers=['CPUExecutionProvider'])
base = peak()
session = make_session(sys.argv[1])
loaded = peak()
feeds = {}
for i in session.get_inputs():
    shape = [d if isinstance(d, int) else 1 for d in i.shape]
    dtype = {'tensor(float)': np.float32, 'tensor(int64)': np.int64,
             'tensor(int32)': np.int32, 'tensor(bool)': np.bool_}.get(i.type, np.float32)
    feeds[i.name] = np.ones(shape, dtype)
for _ in range(int(sys.argv[2])):
    session.run(None, feeds)
print(json.dumps({'base': base, 'loaded': loaded, 'peak': peak()}))
"""


@dataclass(frozen=True)
class StageMemory:
    """Peak RSS of a process running one stage file, and what the formula says."""

    base_bytes: int          # the worker interpreter before its session (imports done)
    loaded_bytes: int        # peak after creating the session
    peak_bytes: int          # peak after running it
    file_bytes: int

    @property
    def measured_bytes(self) -> int:
        """What the stage adds to its host's cgroup above the worker interpreter: the
        process's growth plus the model file on the tmpfs. The formula's counterpart is
        `ModelProfile.stage_memory_bytes(...) + SESSION_OVERHEAD_BYTES`."""
        return self.peak_bytes - self.base_bytes + self.file_bytes


def measure_stage_memory(stage_path: str | os.PathLike[str], runs: int = 3) -> StageMemory:
    """Run one stage in a fresh interpreter, as a worker would, and read its peak RSS."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, "-c", _MEASURE_SCRIPT, str(stage_path), str(runs)],
                            capture_output=True, text=True, env=env, check=True, timeout=300)
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return StageMemory(data["base"], data["loaded"], data["peak"],
                       Path(stage_path).stat().st_size)
