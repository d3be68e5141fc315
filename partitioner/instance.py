"""The planner instance and the plan: the JSON contract of DESIGN.md as dataclasses, with the
one cost function every algorithm, test and benchmark shares. Instances know their costs;
algorithms (partitioner.algorithms) only search."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from formats.errors import InputError, read_json
from formats.limits import MAX_BANDWIDTH_MBPS, MAX_COMPUTE_MS, MAX_INSTANCE_BYTES, MAX_SPEED

MIB = 2**20


@dataclass(frozen=True)
class Segment:
    """The model between two consecutive valid cut points."""

    compute_ms: float
    memory_bytes: int
    output_bytes: int
    # extension (optional in the JSON, 0 = not counted): the bytes of its weights, what a
    # stage file of it takes on a node's disk (Node.disk_bytes)
    model_bytes: int = 0


@dataclass(frozen=True)
class Node:
    """A compute node. `disk_bytes` extends the DESIGN.md contract (optional in the JSON,
    0 = not limited): the room for cached stage models, counted by the controller
    (testbed.control.disk) against the models of the stages and standbys it places."""

    name: str
    speed: float
    memory_bytes: int
    disk_bytes: int = 0


@dataclass
class Instance:
    """A planning problem. `frame_overhead_ms` extends the DESIGN.md contract (optional in the
    JSON, default 0 = the contract's model): the CPU a stage spends per request besides its
    segments (receiving, checking and sending frames, the agent beside it), in full-core ms,
    so a stage computes (sum of its segments + frame_overhead_ms) / speed. On hosts of 0.1-0.3
    cores it is worth 10-25% of a stage's time, which the contract's model leaves out.
    `frame_overhead_ms_per_mib` (optional too, default 0) adds to it per MiB the stage
    receives (the bytes of the cut before it): taking a frame in costs the receiving side a
    wake-up per burst the link delivers and a copy (`stage_overhead_ms`).

    `cpu_budget` (optional too, 0 = no limit) is the summed speed the nodes can deliver at
    once: an emulation whose hosts are promised more cores than its machine has sets it, and
    pipelines side by side cannot together compute faster than that."""

    segments: list[Segment]
    input_bytes: int
    nodes: list[Node]
    source: str
    bandwidth_mbps: dict[tuple[str, str], float] = field(default_factory=dict)
    frame_overhead_ms: float = 0.0
    cpu_budget: float = 0.0
    frame_overhead_ms_per_mib: float = 0.0

    def stage_overhead_ms(self, first: int) -> float:
        """The per-frame CPU of a stage that starts at segment `first`, besides its
        segments: the fixed part and the part that grows with what it receives."""
        return self.overhead_for(self.received_bytes(first))

    def received_bytes(self, first: int) -> int:
        """The bytes a stage starting at segment `first` receives: the cut before it."""
        return self.input_bytes if first == 0 else self.segments[first - 1].output_bytes

    def overhead_for(self, received_bytes: Any) -> Any:
        """`stage_overhead_ms` by the bytes a stage receives (a number or a numpy array)."""
        return self.frame_overhead_ms + self.frame_overhead_ms_per_mib * received_bytes / MIB

    def bandwidth(self, a: str, b: str) -> float | None:
        """Symmetric bandwidth between two endpoints; None when the pair is missing."""
        if a == b:
            return math.inf
        return self.bandwidth_mbps.get((a, b), self.bandwidth_mbps.get((b, a)))

    def hop_ms(self, nbytes: int, a: str, b: str) -> float:
        """Transfer time of `nbytes` from a to b; inf when the pair cannot be used."""
        mbps = self.bandwidth(a, b)
        if mbps is None or mbps <= 0:
            return math.inf
        if math.isinf(mbps):
            return 0.0
        return nbytes * 8 / (mbps * 1000)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "segments": [{k: v for k, v in asdict(s).items() if k != "model_bytes" or v}
                         for s in self.segments],
            "input_bytes": self.input_bytes,
            "nodes": [{k: v for k, v in asdict(n).items() if k != "disk_bytes" or v}
                      for n in self.nodes],
            "source": self.source,
            "bandwidth_mbps": [[a, b, bw] for (a, b), bw in self.bandwidth_mbps.items()],
        }
        if self.frame_overhead_ms:
            data["frame_overhead_ms"] = self.frame_overhead_ms
        if self.cpu_budget:
            data["cpu_budget"] = self.cpu_budget
        if self.frame_overhead_ms_per_mib:
            data["frame_overhead_ms_per_mib"] = self.frame_overhead_ms_per_mib
        return data


def restrict(instance: Instance, live: set[str]) -> Instance:
    """The instance over the `live` nodes only (links to the others dropped too)."""
    nodes = [n for n in instance.nodes if n.name in live]
    keep = live | {instance.source}
    bandwidth = {pair: bw for pair, bw in instance.bandwidth_mbps.items()
                 if pair[0] in keep and pair[1] in keep}
    # replace(), not a new Instance: every other field (the per-frame overhead) carries over
    return replace(instance, nodes=nodes, bandwidth_mbps=bandwidth)


@dataclass(frozen=True)
class Stage:
    first: int          # first segment (inclusive)
    end: int            # one past the last segment
    node: str


@dataclass
class PlanCost:
    """What a plan costs: per-stage compute and incoming hop, the hop back, and the totals."""

    compute_ms: list[float]
    in_ms: list[float]
    out_ms: float
    memory_bytes: list[int]

    @property
    def bottleneck_ms(self) -> float:
        return max([*self.compute_ms, *self.in_ms, self.out_ms])

    @property
    def latency_ms(self) -> float:
        return sum(self.compute_ms) + sum(self.in_ms) + self.out_ms


def plan_cost(instance: Instance, stages: list[Stage]) -> PlanCost:
    """Cost of a plan under the DESIGN.md model (inf entries where a hop has no bandwidth)."""
    compute, hops, memory = [], [], []
    previous, previous_bytes = instance.source, instance.input_bytes
    for stage in stages:
        node = instance.node(stage.node)
        run = instance.segments[stage.first:stage.end]
        compute.append((sum(s.compute_ms for s in run) + instance.stage_overhead_ms(stage.first))
                       / node.speed)
        memory.append(sum(s.memory_bytes for s in run))
        hops.append(instance.hop_ms(previous_bytes, previous, stage.node))
        previous, previous_bytes = stage.node, run[-1].output_bytes
    out = instance.hop_ms(previous_bytes, previous, instance.source)
    return PlanCost(compute, hops, out, memory)


def split_pipelines(stages: list[Stage], chains: tuple[int, ...] = ()) -> list[list[Stage]]:
    """The pipelines of a plan: `chains` gives each one's stage count (empty: one pipeline)."""
    if not chains:
        return [list(stages)]
    if sum(chains) != len(stages) or min(chains) < 1:
        raise ValueError(f"pipelines of {list(chains)} stages do not add up to {len(stages)}")
    out, start = [], 0
    for count in chains:
        out.append(list(stages[start:start + count]))
        start += count
    return out


def plan_problems(instance: Instance, stages: list[Stage],
                  chains: tuple[int, ...] = ()) -> list[str]:
    """Why a plan is not valid for an instance (empty list: valid). With `chains`, every
    pipeline must be valid on its own and no node may serve two of them."""
    if chains:
        try:
            pipelines = split_pipelines(stages, chains)
        except ValueError as exc:
            return [str(exc)]
        problems = [f"pipeline {i}: {problem}" for i, pipeline in enumerate(pipelines)
                    for problem in plan_problems(instance, pipeline)]
        names = [s.node for s in stages]
        if len(set(names)) != len(names):
            problems.append("a node holds more than one stage")
        return problems
    problems = []
    if not stages:
        return ["a plan needs at least one stage"]
    if stages[0].first != 0 or stages[-1].end != len(instance.segments):
        problems.append("stages must cover every segment from the first to the last")
    for a, b in zip(stages, stages[1:]):
        if a.end != b.first:
            problems.append(f"stages {a} and {b} are not contiguous")
    names = [s.node for s in stages]
    if len(set(names)) != len(names):
        problems.append("a node holds more than one stage")
    known = {n.name for n in instance.nodes}
    for stage in stages:
        if stage.node not in known:
            problems.append(f"unknown node {stage.node}")
        elif stage.first >= stage.end:
            problems.append(f"empty stage on {stage.node}")
    if problems:
        return problems
    cost = plan_cost(instance, stages)
    for stage in stages:
        disk = instance.node(stage.node).disk_bytes
        need = sum(s.model_bytes for s in instance.segments[stage.first:stage.end])
        if disk and need > disk:
            problems.append(f"stage on {stage.node} needs {need} bytes of disk, the node has "
                            f"{disk}")
    for stage, mem in zip(stages, cost.memory_bytes):
        if mem > instance.node(stage.node).memory_bytes:
            problems.append(f"stage on {stage.node} needs {mem} bytes of memory, "
                            f"the node has {instance.node(stage.node).memory_bytes}")
    if math.isinf(cost.bottleneck_ms):
        problems.append("a hop of the plan has no bandwidth")
    return problems


def shared_source_ms(instance: Instance) -> float:
    """Per request, the time the source's own link is busy with the larger of the input and
    the output, when several pipelines share it. Its rate is taken as the widest path from
    the source to any node (a lower bound of the link's own rate)."""
    widest = max((instance.bandwidth(instance.source, n.name) or 0.0 for n in instance.nodes),
                 default=0.0)
    if widest <= 0:
        return math.inf
    if math.isinf(widest):
        return 0.0
    largest = max(instance.input_bytes, instance.segments[-1].output_bytes)
    return largest * 8 / (widest * 1000)


def budget_ms(instance: Instance, pipelines: list[list[Stage]]) -> float:
    """Per request, the time the instance's CPU budget is busy with the average request (a
    request runs through one pipeline; each gets the same share); 0 without a budget."""
    if instance.cpu_budget <= 0:
        return 0.0
    work = [sum(sum(s.compute_ms for s in instance.segments[stage.first:stage.end])
                + instance.stage_overhead_ms(stage.first) for stage in pipeline)
            for pipeline in pipelines]
    return sum(work) / len(work) / instance.cpu_budget


def pipelines_cost(instance: Instance, pipelines: list[list[Stage]]) -> tuple[float, float,
                                                                               PlanCost]:
    """Bottleneck, latency and the per-stage costs (flat, pipeline after pipeline) of
    pipelines side by side. The dispatcher deals requests to them in turn, so each carries
    1/R of them and the slowest sets the pace: the bottleneck is max(pipeline bottleneck) / R,
    or the source's shared link, or the instance's CPU budget, when one is slower. Latency is
    the slowest pipeline's."""
    costs = [plan_cost(instance, p) for p in pipelines]
    flat = PlanCost([c for cost in costs for c in cost.compute_ms],
                    [h for cost in costs for h in cost.in_ms],
                    max(cost.out_ms for cost in costs),
                    [m for cost in costs for m in cost.memory_bytes])
    if len(costs) == 1:
        return costs[0].bottleneck_ms, costs[0].latency_ms, costs[0]
    bottleneck = max(max(cost.bottleneck_ms for cost in costs) / len(costs),
                     shared_source_ms(instance), budget_ms(instance, pipelines))
    return bottleneck, max(cost.latency_ms for cost in costs), flat



def pure_bottleneck_ms(instance: Instance, stages: list[Stage],
                       chains: tuple[int, ...] = ()) -> float:
    """The bottleneck of a plan with no per-frame overhead: ONNX compute at the nodes'
    speed and link times only (the DESIGN.md model). 1000 / this is the most a plan can
    deliver whatever its stages cost per frame besides onnxruntime; benchmarks/pipeline.py
    judges measured throughput against it."""
    pure = replace(instance, frame_overhead_ms=0.0, frame_overhead_ms_per_mib=0.0)
    return pipelines_cost(pure, split_pipelines(stages, chains))[0]

@dataclass
class Plan:
    """A solved plan, as printed by `solve` (DESIGN.md) and stored in plan.json. `chains`
    extends the contract: when the plan runs several copies of the pipeline side by side
    (data parallelism), the stage count of each, their stages listed one pipeline after the
    other in `stages` (empty: one pipeline, the contract's plan)."""

    algorithm: str
    stages: list[Stage]
    bottleneck_ms: float
    latency_ms: float
    optimal: bool
    lower_bound_ms: float | None = None
    solve_s: float | None = None
    cost: PlanCost | None = None
    chains: tuple[int, ...] = ()

    @classmethod
    def of(cls, instance: Instance, stages: list[Stage], algorithm: str, optimal: bool,
           lower_bound_ms: float | None = None, solve_s: float | None = None,
           chains: tuple[int, ...] = ()) -> Plan:
        chains = chains if len(chains) > 1 else ()
        bottleneck, latency, cost = pipelines_cost(instance, split_pipelines(stages, chains))
        return cls(algorithm, stages, bottleneck, latency, optimal, lower_bound_ms, solve_s,
                   cost, chains)

    @property
    def pipelines(self) -> list[list[Stage]]:
        return split_pipelines(self.stages, self.chains)

    def next_stage(self, index: int) -> int | None:
        """The stage after `index` in its pipeline (None: the last, it answers the source)."""
        end = 0
        for count in self.chains or (len(self.stages),):
            end += count
            if index < end:
                return index + 1 if index + 1 < end else None
        raise IndexError(index)

    @property
    def heads(self) -> list[int]:
        """The index of each pipeline's first stage."""
        starts, start = [], 0
        for count in self.chains or (len(self.stages),):
            starts.append(start)
            start += count
        return starts

    @property
    def predicted_throughput_rps(self) -> float:
        return 1000.0 / self.bottleneck_ms if self.bottleneck_ms > 0 else math.inf

    def to_json(self) -> dict[str, Any]:
        cost = self.cost
        out: dict[str, Any] = {
            "algorithm": self.algorithm,
            "bottleneck_ms": self.bottleneck_ms,
            "latency_ms": self.latency_ms,
            "optimal": self.optimal,
            "stages": [
                {"segments": [s.first, s.end], "node": s.node,
                 "compute_ms": cost.compute_ms[i] if cost else None,
                 "in_ms": cost.in_ms[i] if cost else None,
                 "memory_bytes": cost.memory_bytes[i] if cost else None}
                for i, s in enumerate(self.stages)
            ],
            "out_ms": cost.out_ms if cost else None,
        }
        if self.chains:
            out["chains"] = list(self.chains)
        if self.lower_bound_ms is not None:
            out["lower_bound_ms"] = self.lower_bound_ms
            out["gap"] = (self.bottleneck_ms / self.lower_bound_ms - 1
                          if self.lower_bound_ms > 0 else 0.0)
        if self.solve_s is not None:
            out["solve_s"] = self.solve_s
        return out


def plan_from_json(instance: Instance, data: dict[str, Any]) -> Plan:
    """Read back a plan (plan.json / solve output) and recompute its cost on `instance`."""
    stages = [Stage(int(s["segments"][0]), int(s["segments"][1]), str(s["node"]))
              for s in data["stages"]]
    chains = tuple(int(c) for c in data.get("chains", ()))
    return Plan.of(instance, stages, data.get("algorithm", "given"),
                   bool(data.get("optimal", False)), data.get("lower_bound_ms"), chains=chains)


class InfeasibleError(Exception):
    """No plan satisfies the instance; the message says why (CLI exit code 2)."""


def _number(value: Any, where: str, file: str, positive: bool = False,
            maximum: float = MAX_INSTANCE_BYTES) -> float:
    """A finite number in [0, maximum] (or (0, maximum]); the bounds are formats.limits': past
    them a bottleneck of 8e295 ms is printed instead of a refusal."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InputError(f"expected a number, got {value!r}", file=file, field=where)
    if value < 0 or (positive and value == 0):
        raise InputError(f"must be {'positive' if positive else 'non-negative'}, got {value}",
                         file=file, field=where)
    if value > maximum:
        raise InputError(f"{value:g} is more than the {maximum:g} allowed "
                         "(formats/limits.py)", file=file, field=where)
    return value


def instance_from_json(data: Any, file: str = "<instance>") -> Instance:
    """Validate and build an Instance; InputError names the offending field."""
    if not isinstance(data, dict):
        raise InputError("the instance must be a JSON object", file=file)
    unknown = set(data) - {"segments", "input_bytes", "nodes", "source", "bandwidth_mbps",
                           "frame_overhead_ms", "frame_overhead_ms_per_mib", "cpu_budget"}
    if unknown:
        raise InputError("unknown field", file=file, field=sorted(unknown)[0])
    for key in ("segments", "input_bytes", "nodes", "source", "bandwidth_mbps"):
        if key not in data:
            raise InputError("required field is missing", file=file, field=key)
    if not isinstance(data["segments"], list) or not data["segments"]:
        raise InputError("needs at least one segment", file=file, field="segments")
    segments = []
    for i, seg in enumerate(data["segments"]):
        where = f"segments[{i}]"
        if not isinstance(seg, dict) or \
                not {"compute_ms", "memory_bytes", "output_bytes"} <= set(seg) or \
                set(seg) - {"compute_ms", "memory_bytes", "output_bytes", "model_bytes"}:
            raise InputError("needs exactly compute_ms, memory_bytes, output_bytes (and "
                             "optionally model_bytes)",
                             file=file, field=where)
        segments.append(Segment(float(_number(seg["compute_ms"], where + ".compute_ms", file,
                                                maximum=MAX_COMPUTE_MS)),
                                int(_number(seg["memory_bytes"], where + ".memory_bytes", file)),
                                int(_number(seg["output_bytes"], where + ".output_bytes", file)),
                                int(_number(seg.get("model_bytes", 0), where + ".model_bytes",
                                            file))))
    if not isinstance(data["nodes"], list) or not data["nodes"]:
        raise InputError("needs at least one node", file=file, field="nodes")
    nodes, names = [], set()
    for i, node in enumerate(data["nodes"]):
        where = f"nodes[{i}]"
        if not isinstance(node, dict) or not {"name", "speed", "memory_bytes"} <= set(node) \
                or set(node) - {"name", "speed", "memory_bytes", "disk_bytes"}:
            raise InputError("needs exactly name, speed, memory_bytes (and optionally "
                             "disk_bytes)", file=file, field=where)
        if not isinstance(node["name"], str) or node["name"] in names:
            raise InputError(f"name must be a unique string, got {node['name']!r}",
                             file=file, field=where + ".name")
        names.add(node["name"])
        nodes.append(Node(node["name"], float(_number(node["speed"], where + ".speed", file, True,
                                                      MAX_SPEED)),
                          int(_number(node["memory_bytes"], where + ".memory_bytes", file)),
                          int(_number(node.get("disk_bytes", 0), where + ".disk_bytes", file))))
    source = data["source"]
    if not isinstance(source, str):
        raise InputError("must be a node name", file=file, field="source")
    if source in names:
        raise InputError("the source cannot also be a compute node", file=file, field="source")
    bandwidth: dict[tuple[str, str], float] = {}
    if not isinstance(data["bandwidth_mbps"], list):
        raise InputError("must be a list of [a, b, mbps]", file=file, field="bandwidth_mbps")
    for i, entry in enumerate(data["bandwidth_mbps"]):
        where = f"bandwidth_mbps[{i}]"
        if not isinstance(entry, list) or len(entry) != 3:
            raise InputError("must be [a, b, mbps]", file=file, field=where)
        a, b, mbps = entry
        for end in (a, b):
            if not isinstance(end, str) or (end not in names and end != source):
                raise InputError(f"unknown endpoint {end!r}", file=file, field=where)
        bandwidth[(a, b)] = float(_number(mbps, where, file, positive=True,
                                          maximum=MAX_BANDWIDTH_MBPS))
    overhead = float(_number(data.get("frame_overhead_ms", 0.0), "frame_overhead_ms", file,
                             maximum=MAX_COMPUTE_MS))
    budget = float(_number(data.get("cpu_budget", 0.0), "cpu_budget", file, maximum=MAX_SPEED))
    per_mib = float(_number(data.get("frame_overhead_ms_per_mib", 0.0),
                            "frame_overhead_ms_per_mib", file, maximum=MAX_COMPUTE_MS))
    return Instance(segments, int(_number(data["input_bytes"], "input_bytes", file)), nodes,
                    source, bandwidth, overhead, budget, per_mib)


def load_instance(path: str | Path) -> Instance:
    return instance_from_json(read_json(path), str(path))
