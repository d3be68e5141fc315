"""The cost model: per-segment compute, memory and bytes of a model, and the planner instance
for a set of hosts or a topology.

Division of labour: `partitioner.cuts` gives the segments (and the bytes crossing each cut),
this module measures and estimates what each segment costs, `partitioner.algorithms` plans
on the resulting `Instance`. Profiles are cached in $EDGEPIPE_CACHE/profiles/, since
profiling a large model takes a while.

Compute. A segment's share of the time comes from onnxruntime's profiler, its sum scaled to
the CPU time of the fully optimised session (ORT_ENABLE_ALL, 1 intra-op thread, no spinning:
as the workers run). Two profiles are taken and tied to the model's ONNX nodes by
`partitioner.attribution` (by node index and by the tensors and weights each kernel
touches, never by name): ORT_DISABLE_ALL gives each node's own cost; ORT_ENABLE_ALL, what
the workers run, is mapped through the optimised graph onnxruntime writes, a fused kernel's
time shared by the nodes it stands for. The optimised attribution is used (the unoptimised
one only when the optimised kernels cannot be tied to nodes), because NCHWc and fusions
speed some nodes up far more than others. Each kernel's time is its fastest run (profiler
times are wall times, which other processes only lengthen); the total is CPU time
(`time.thread_time`: the session runs on the calling thread). A profile whose runs took
more than CONTENTION_LIMIT wall time per CPU time is taken again, and what the machine was
doing is kept with it (`ModelProfile.machine`). Measured by `profile --verify`
(`verify_profile`): each stage of 2-4 way splits timed alone, against its predicted share.

Cut sizes come from one real run at the stated input shapes (`partitioner.cuts.
prepare_model`); profiles are cached by the SHA-256 of graph and external weights, the cut
options and the input shapes, and checked on use against a few whole-model frames.

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
import math
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
from onnx import external_data_helper

from partitioner import attribution as attrlib
from partitioner import cuts as cutlib
from partitioner import inputs as inputlib
from partitioner import split as splitlib
from partitioner.instance import Instance, Node, Segment
from partitioner.zoo import cache_dir, default_input_shapes, resolve_model

MiB = 1024 * 1024

# Measured on the project's machine kind (python 3.11, onnxruntime 1.32), peak RSS (VmHWM):
AGENT_RSS_BYTES = 28 * MiB          # `import stage_image.agent`: 23.5 MiB; + fetch buffers
WORKER_RSS_BYTES = 60 * MiB         # numpy + onnxruntime + pyzmq + stage_image.worker: 56.9 MiB
SESSION_OVERHEAD_BYTES = 10 * MiB   # a 2-node session, worker options, after a run: 8.6 MiB
RUNTIME_ALLOWANCE_BYTES = AGENT_RSS_BYTES + WORKER_RSS_BYTES + SESSION_OVERHEAD_BYTES
# A host's further workers are forked by its agent's launcher (stage_image/launcher.py), which
# holds the imports a worker alone took (the launcher is what WORKER_RSS_BYTES pays for): each
# adds its own private memory, its session and its weights. Measured (smaps_rollup, resnet18
# on hetero-6, 90 s into a run): private dirty beyond the profile's weight figure 4-6 MiB for
# a standby, 14-17 MiB for a serving worker (activation arena, ZeroMQ buffers).
FORKED_WORKER_BYTES = 20 * MiB
FORKED_RUNTIME_BYTES = FORKED_WORKER_BYTES + SESSION_OVERHEAD_BYTES   # beside its weights
# CPU a stage spends per request besides onnxruntime (full-core ms): a fixed part (the
# worker's loop, header checks, the agent beside it) and a part per MiB the stage receives
# (ZeroMQ's I/O thread wakes for every burst the shaped link delivers and the kernel copies;
# sending costs far less). Measured by benchmarks/frame_overhead.py --mininet --auth token
# (real workers in 0.2-core Mininet hosts behind 100 Mbit links, a trivial model, host cgroup
# CPU per frame - the bare session.run), quiet 2-core machine: 49 KB frames 0.55-0.58 ms; a
# stage receiving 600 KB (0.57 MiB) and sending 12 B 1.24-1.49 ms, sending 600 KB too
# 1.38-1.64 ms: 0.5 ms + 1.5 ms per MiB received (sent bytes inside the spread). Real
# pipelines with no standbys loading beside them (benchmarks/pipeline.py --no-standby) imply
# 0.6 ms for bert_exported (64 KB cuts), 0.8 for bert_mini (128 KB), 1.1 for resnet18
# (0.2-0.8 MB), 1.8 for resnet50 on star-10 (up to 3 MB): the same shape. The one constant
# used before (1.5 ms, measured at 600 KB) over-charged transformer stages by half (their
# predictions 13-40% under what they delivered) and under-charged large cuts.
FRAME_OVERHEAD_MS = 0.5
FRAME_OVERHEAD_MS_PER_MIB = 1.5
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

# 4: CPU-time totals, attribution through the optimised graph, measured cut sizes, input
# shapes, the machine's state; keyed by graph + weights. 5: kernels that touch no original
# tensor placed by position (`attribution._anchor_by_position`).
PROFILE_FORMAT = 5
# A profile whose whole-model runs took more than this much wall time per CPU time was taken
# while other processes had the core: it is taken again (at most CONTENTION_RETAKES times,
# keeping the least contended). Kernel times are wall times, so they are what contention
# distorts; the total is CPU time, which contention distorts far less.
CONTENTION_LIMIT = 1.15
CONTENTION_RETAKES = 2
# On use, a cached profile is checked by a few whole-model frames; off by more than this, the
# model is profiled again (issue 13: a profile from a busy minute said 325 ms for 111).
QUICK_CHECK_RUNS = 5
QUICK_CHECK_TOLERANCE = 0.15
# `profile --verify`: every stage of a 2-4 way split within this of its predicted share.
VERIFY_TARGET = 0.10


@dataclass
class ModelProfile:
    """Costs of one model's segments (the instance's `segments`) and where they came from."""

    model: str
    sha256: str
    segments: list[Segment]
    input_bytes: int
    cuts: list[cutlib.Cut]
    total_ms: float                      # CPU ms a frame, fully optimised, 1 thread (lower q.)
    basic_ms: float                      # sum of node kernel times, unoptimised
    runs: int
    segment_nodes: list[list[str]] = field(default_factory=list)
    weight_bytes: list[int] = field(default_factory=list)
    activation_bytes: list[int] = field(default_factory=list)    # largest, per segment
    activation_reserve_bytes: int = 0    # ACTIVATION_FACTOR x the largest activation
    unattributed_ms: float = 0.0         # optimised kernels tied to no ONNX node
    attribution: str = "optimised"       # how kernel times were split into segments
    max_tensors: int = cutlib.DEFAULT_MAX_TENSORS
    region_share: float = cutlib.DEFAULT_REGION_SHARE
    input_shapes: dict[str, list[int]] = field(default_factory=dict)   # as profiled
    notes: list[str] = field(default_factory=list)       # defaults taken (batch 1)
    machine: dict[str, float] = field(default_factory=dict)   # Timing + cpus + when taken

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
def _session_options(level: str, profile_dir: str | None = None,
                     optimized_path: str | None = None) -> Any:
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
    if optimized_path is not None:
        options.optimized_model_filepath = optimized_path
    return options


def _session(model: bytes | str, options: Any) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def profile_kernels(model: bytes | str, feeds: dict[str, np.ndarray], runs: int, level: str,
                    optimized_path: str | None = None) -> list[list[attrlib.KernelTime]]:
    """Kernel events of each run (the warm-up run dropped: allocations, first-touch page
    faults) from the onnxruntime profiler at `level`; with `optimized_path`, the session's
    optimised graph is written there (the graph the kernel names and indices refer to)."""
    with tempfile.TemporaryDirectory(prefix="edgepipe-prof-") as tmp:
        session = _session(model, _session_options(level, tmp, optimized_path))
        for _ in range(runs + 1):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    # Kernel events carry the run they belong to only through time: split on model_run.
    bounds = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                    if e.get("cat") == "Session" and e.get("name") == "model_run")
    runs_out: list[list[attrlib.KernelTime]] = [[] for _ in bounds]
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        for k, (begin, finish) in enumerate(bounds):
            if begin <= event["ts"] <= finish:
                runs_out[k].append(attrlib.KernelTime(
                    event["name"][: -len("_kernel_time")], int(args.get("node_index", -1)),
                    str(args.get("op_name", "")), event["dur"] / 1000.0))
                break
    return runs_out[1:] if len(runs_out) > 1 else runs_out


def _fastest_by(runs: list[list[attrlib.KernelTime]], key: str) -> dict[Any, float]:
    """Each kernel's fastest run (its summed ms), keyed by its name or node_index. Kernel
    times are wall times: another process taking the core only ever adds to them, so the
    fastest run is the best estimate of the kernel's own cost (the median of 10 runs at
    load 14 on 2 cores misplaced bert_mini's stage shares by up to 49%)."""
    per: dict[Any, list[float]] = {}
    for run in runs:
        totals: dict[Any, float] = {}
        for kernel in run:
            k = getattr(kernel, key)
            totals[k] = totals.get(k, 0.0) + kernel.ms
        for k, ms in totals.items():
            per.setdefault(k, []).append(ms)
    return {k: min(v) for k, v in per.items()}


@dataclass(frozen=True)
class Timing:
    """CPU and wall time of whole-model runs, and what the machine was doing meanwhile."""

    cpu_ms: float                # lower quartile of the thread's CPU time per run
    wall_ms: float               # lower quartile of wall time per run
    contention: float            # median wall / median CPU (1.0: the core was ours)
    loadavg: float               # 1-minute load average at the end

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def measure_latency(model: bytes | str, feeds: dict[str, np.ndarray], runs: int,
                    level: str = "ORT_ENABLE_ALL") -> Timing:
    """Whole-model runs, fully optimised, 1 thread (the session runs on this thread), after
    a warm-up run. CPU time is what the model costs; wall time over CPU time says how much
    of the core other processes took meanwhile."""
    session = _session(model, _session_options(level))
    session.run(None, feeds)
    cpu, wall = [], []
    for _ in range(runs):
        c0, w0 = time.thread_time(), time.perf_counter()
        session.run(None, feeds)
        cpu.append((time.thread_time() - c0) * 1000.0)
        wall.append((time.perf_counter() - w0) * 1000.0)
    return Timing(float(np.percentile(cpu, 25)), float(np.percentile(wall, 25)),
                  statistics.median(wall) / max(statistics.median(cpu), 1e-9),
                  os.getloadavg()[0])


def _segment_ms(node_ms: dict[str, float], analysis: cutlib.CutAnalysis) -> list[float]:
    per_segment = [0.0] * analysis.segment_count
    for name, ms in node_ms.items():
        seg = analysis.node_segment.get(name)
        if seg is not None:              # dead nodes: no stage runs them
            per_segment[seg] += ms
    return per_segment


# -- the profile ------------------------------------------------------------------------------
def _shapes_key(input_shapes: dict[str, tuple[int, ...]] | None) -> str:
    if not input_shapes:
        return "default"
    text = json.dumps({k: list(v) for k, v in sorted(input_shapes.items())})
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cache_file(sha256: str, max_tensors: int, region_share: float,
                input_shapes: dict[str, tuple[int, ...]] | None) -> Path:
    return (cache_dir() / "profiles" /
            f"{sha256}-t{max_tensors}-r{region_share:g}-s{_shapes_key(input_shapes)}.json")


def _quick_check(path: Path, profile: ModelProfile) -> Timing:
    """A few whole-model frames of the model at the profile's input shapes."""
    shapes = {k: tuple(v) for k, v in profile.input_shapes.items()}
    fixed = inputlib.with_input_shapes(cutlib.load(path), shapes)
    feeds = inputlib.make_feeds(fixed, shapes)
    return measure_latency(fixed.SerializeToString(), feeds, QUICK_CHECK_RUNS)


def load_cached(path: Path, sha: str, max_tensors: int, region_share: float,
                input_shapes: dict[str, tuple[int, ...]] | None,
                check: bool, progress: bool) -> ModelProfile | None:
    """The cached profile, unless it is missing, unreadable, of another format, or (with
    `check`) a quick run of a few frames takes more than QUICK_CHECK_TOLERANCE off its total
    (it was taken on a busy machine, or on another machine)."""
    cached = _cache_file(sha, max_tensors, region_share, input_shapes)
    try:
        data = json.loads(cached.read_text())
        if data.get("format") != PROFILE_FORMAT:
            return None
        profile = ModelProfile.from_json(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None                      # no cache entry, or an unreadable one: profile
    profile.model = str(path)
    if check:
        timing = _quick_check(path, profile)
        off = timing.cpu_ms / profile.total_ms - 1 if profile.total_ms > 0 else math.inf
        if abs(off) > QUICK_CHECK_TOLERANCE:
            if progress:
                _progress(f"cached profile of {path.name} says {profile.total_ms:.1f} ms, "
                          f"{QUICK_CHECK_RUNS} frames now take {timing.cpu_ms:.1f} ms CPU "
                          f"({off:+.0%}): profiling again")
            return None
    return profile


def profile_model(spec: str | os.PathLike[str], runs: int = 20,
                  max_tensors: int = cutlib.DEFAULT_MAX_TENSORS,
                  region_share: float = cutlib.DEFAULT_REGION_SHARE,
                  refresh: bool = False, progress: bool = True,
                  input_shapes: dict[str, tuple[int, ...]] | None = None,
                  check: bool = True) -> ModelProfile:
    """Profile a model (zoo name or ONNX path) at `input_shapes` (zoo defaults if None);
    cached by the SHA-256 of graph and weights, the cut options and the shapes, unless
    `refresh`. A cached profile is checked against a few real frames (`check`)."""
    path = resolve_model(spec)
    if not input_shapes:
        input_shapes = default_input_shapes(spec)
    sha = model_sha256(path)
    if not refresh:
        cached = load_cached(path, sha, max_tensors, region_share, input_shapes, check,
                             progress)
        if cached is not None:
            return cached
    prepared = cutlib.prepare_model(path, input_shapes, max_tensors, region_share)
    analysis, feeds = prepared.analysis, prepared.feeds
    if progress:
        for note in prepared.notes:
            _progress(f"note: {note}")
        _progress(f"profiling {path.name}: {len(analysis.order)} nodes, "
                  f"{analysis.segment_count} segments, {runs} runs ...")
    model_bytes = prepared.model.SerializeToString()
    best: tuple[Timing, list[float], float, float, str] | None = None
    for attempt in range(1 + CONTENTION_RETAKES):
        taken = _profile_compute(prepared, model_bytes, feeds, runs)
        if best is None or taken[0].contention < best[0].contention:
            best = taken
        if taken[0].contention <= CONTENTION_LIMIT:
            break
        if progress and attempt < CONTENTION_RETAKES:
            _progress(f"the machine is busy (wall {taken[0].contention:.2f}x CPU, load "
                      f"{taken[0].loadavg:.1f}): measuring again")
    assert best is not None
    timing, per_segment, basic_ms, unmatched, attribution = best
    total_ms = timing.cpu_ms
    scale = total_ms / sum(per_segment) if sum(per_segment) > 0 else 0.0
    memory, weights, largest = segment_memory(prepared.model, analysis)
    segments = [Segment(ms * scale, mem, cutlib.total_bytes(analysis.boundary(k + 1)))
                for k, (ms, mem) in enumerate(zip(per_segment, memory))]
    profile = ModelProfile(
        model=str(path), sha256=sha, segments=segments,
        input_bytes=cutlib.total_bytes(analysis.boundary(0)), cuts=analysis.cuts,
        total_ms=total_ms, basic_ms=basic_ms, runs=runs,
        segment_nodes=analysis.segment_nodes(), weight_bytes=weights,
        activation_bytes=largest, activation_reserve_bytes=ACTIVATION_FACTOR * max(largest),
        unattributed_ms=unmatched, attribution=attribution,
        max_tensors=max_tensors, region_share=region_share,
        input_shapes={k: list(v) for k, v in prepared.shapes.items()},
        notes=list(prepared.notes),
        machine={**timing.to_json(), "cpus": os.cpu_count() or 1, "taken": time.time()})
    if progress:
        _progress(f"profiled {path.name}: {total_ms:.1f} ms CPU a frame (wall "
                  f"{timing.contention:.2f}x CPU, load {timing.loadavg:.1f}), "
                  f"{basic_ms:.1f} ms unoptimised, {attribution} attribution")
    cached_file = _cache_file(sha, max_tensors, region_share, input_shapes)
    cached_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached_file.with_name(f".{cached_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(profile.to_json()))
    os.replace(tmp, cached_file)
    return profile


def _profile_compute(prepared: cutlib.PreparedModel, model_bytes: bytes,
                     feeds: dict[str, np.ndarray], runs: int,
                     ) -> tuple[Timing, list[float], float, float, str]:
    """(whole-model timing, per-segment ms before scaling, unoptimised ms, unmatched ms,
    attribution used): both profiles, attributed (`partitioner.attribution`)."""
    analysis = prepared.analysis
    base_runs = profile_kernels(model_bytes, feeds, runs, "ORT_DISABLE_ALL")
    base_ms = attrlib.unoptimised_node_ms(prepared.model, _fastest_by(base_runs, "node_index"))
    basic_segments = _segment_ms(base_ms, analysis)
    with tempfile.TemporaryDirectory(prefix="edgepipe-opt-") as tmp:
        optimized = os.path.join(tmp, "optimised.onnx")
        opt_runs = profile_kernels(model_bytes, feeds, runs, "ORT_ENABLE_ALL", optimized)
        optimised_graph = onnx.load(optimized, load_external_data=False)
    timing = measure_latency(model_bytes, feeds, runs)
    result = attrlib.attribute(prepared.model, optimised_graph, _fastest_by(opt_runs, "name"),
                               base_ms)
    per_segment = _segment_ms(result.node_ms, analysis)
    if sum(per_segment) <= 0 or result.unmatched_ms > 0.2 * (sum(per_segment)
                                                             + result.unmatched_ms):
        # The optimised kernels could not be tied to the model's nodes: unoptimised shares.
        return timing, basic_segments, sum(basic_segments), result.unmatched_ms, "unoptimised"
    return timing, per_segment, sum(basic_segments), result.unmatched_ms, "optimised"


def model_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a model, graph and weights: the graph file's hash for a self-contained
    model; with external data, the hash over the graph file's hash and each external-data
    file's location and hash, in the order the graph first names them."""
    path = Path(path)
    locations = external_data_files(path)
    if not locations:
        return file_sha256(path)
    digest = hashlib.sha256(bytes.fromhex(file_sha256(path)))
    for location in locations:
        digest.update(location.encode() + b"\0")
        digest.update(bytes.fromhex(file_sha256(path.parent / location)))
    return digest.hexdigest()


def external_data_files(path: str | os.PathLike[str]) -> list[str]:
    """Locations (relative to the model's directory) of the external-data files a model
    reads, in first-use order; empty for a self-contained model or an unreadable file (the
    caller reports that when it loads the model)."""
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:            # protobuf and OS errors alike
        return []
    seen: list[str] = []
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location and location not in seen:
                seen.append(location)
    return seen


# -- checking a profile against real stages ---------------------------------------------------
@dataclass(frozen=True)
class StageCheck:
    stages: int                     # the split's stage count
    stage: int
    segments: tuple[int, int]       # [first, end)
    predicted_share: float
    measured_share: float
    measured_ms: float

    @property
    def error(self) -> float:
        """Relative error of the predicted share."""
        return abs(self.measured_share - self.predicted_share) / max(self.predicted_share,
                                                                     1e-9)


def balanced_cuts(profile: ModelProfile, stages: int) -> list[int]:
    """Cut indices (increasing) splitting the profile's compute into `stages` near-equal
    parts; fewer when the model has too few cuts."""
    total = sum(s.compute_ms for s in profile.segments)
    cumulative = list(np.cumsum([s.compute_ms for s in profile.segments[:-1]]))
    chosen: list[int] = []
    for j in range(1, stages):
        candidates = range(chosen[-1] + 1 if chosen else 0, len(cumulative))
        if not candidates:
            break
        chosen.append(min(candidates, key=lambda i: abs(cumulative[i] - total * j / stages)))
    return chosen


def verify_profile(spec: str | os.PathLike[str], profile: ModelProfile,
                   ways: tuple[int, ...] = (2, 3, 4), runs: int = 50) -> list[StageCheck]:
    """Split the model 2-4 ways at balanced cuts, time each stage alone (CPU time, fully
    optimised, 1 thread, as a worker runs it) and compare its share of the stages' sum with
    the share the profile predicts. A split's stages run interleaved, one frame each in turn,
    so a change in the machine's load hits them alike; each stage's time is its fastest run
    (as the profile's kernel times are)."""
    path = resolve_model(spec)
    shapes = {k: tuple(v) for k, v in profile.input_shapes.items()}
    prepared = cutlib.prepare_model(path, shapes, profile.max_tensors, profile.region_share)
    checks: list[StageCheck] = []
    for count in ways:
        indices = balanced_cuts(profile, count)
        if len(indices) != count - 1:
            continue
        bounds = [0, *[i + 1 for i in indices], len(profile.segments)]
        carried = dict(prepared.feeds)
        sessions, feeds = [], []
        for stage, spec_ in splitlib.extract_stages(prepared.model, indices,
                                                    prepared.analysis):
            received = {n: carried[n] for n in spec_.inputs}
            sessions.append(_session(stage.SerializeToString(),
                                     _session_options("ORT_ENABLE_ALL")))
            feeds.append({i.name: received[i.name] for i in sessions[-1].get_inputs()})
            results = dict(zip([o.name for o in sessions[-1].get_outputs()],
                               sessions[-1].run(None, feeds[-1])))      # also the warm-up
            carried = {n: results[n] if n in results else received[n] for n in spec_.outputs}
        times: list[list[float]] = [[] for _ in sessions]
        for _ in range(runs):
            for session, feed, out in zip(sessions, feeds, times):
                start = time.thread_time()
                session.run(None, feed)
                out.append((time.thread_time() - start) * 1000.0)
        measured = [min(t) for t in times]
        predicted = [sum(s.compute_ms for s in profile.segments[a:b])
                     for a, b in zip(bounds, bounds[1:])]
        for k, (ms, a, b) in enumerate(zip(measured, bounds, bounds[1:])):
            checks.append(StageCheck(count, k, (a, b), predicted[k] / sum(predicted),
                                     ms / sum(measured), ms))
    return checks


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
                    FRAME_OVERHEAD_MS, frame_overhead_ms_per_mib=FRAME_OVERHEAD_MS_PER_MIB)


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
