"""Scenario files: what to run (model, topology, planner, backend), how to load it (workload),
what to break and when (steps), and what counts as success (SLOs). This module only reads and
validates; the driver runs scenarios and testbed.experiment.faults knows how to inject each
action."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from formats.control import ControlSettings
from formats.errors import InputError
from formats.limits import MAX_CONCURRENCY, MAX_POOL, MAX_RATE_RPS, plain_name
from formats.models import ZOO_MODELS
from formats.nodestate import check_node_states
from formats.topology import Topology, load_topology
from formats.units import (
    parse_bandwidth_mbps,
    parse_duration_s,
    parse_percent,
)
from formats.yamlfile import Fields, expect_type, load_yaml

ALGORITHMS = ("auto", "optimal", "seifer", "greedy", "random")
BACKENDS = ("embedded", "k3s")

# action -> (target kind, {param: converter}, required params)
_NODE, _LINK, _GROUPS, _NONE = "node", "link", "groups", "none"


def _cores(value: Any) -> float:
    machine = os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0 < value <= machine:
        raise ValueError(f"expected a number of cores above 0 and at most this machine's "
                         f"{machine}, got {value!r}")
    return float(value)


def _version(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a model version number >= 1, got {value!r}")
    return value


ACTIONS: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "node.crash": (_NODE, {}, ()),
    "node.pause": (_NODE, {}, ()),
    "node.resume": (_NODE, {}, ()),
    "node.restart": (_NODE, {}, ()),
    "node.cpu": (_NODE, {"cpu": _cores}, ("cpu",)),
    "link.down": (_LINK, {}, ()),
    "link.up": (_LINK, {}, ()),
    "link.bandwidth": (_LINK, {"bandwidth": parse_bandwidth_mbps}, ("bandwidth",)),
    "link.delay": (_LINK, {"delay": parse_duration_s, "jitter": parse_duration_s}, ("delay",)),
    "link.loss": (_LINK, {"loss": parse_percent}, ("loss",)),
    "link.partition": (_GROUPS, {}, ()),
    "io.disk_full": (_NODE, {}, ()),
    "io.read_only": (_NODE, {}, ()),
    "io.corrupt_model": (_NODE, {}, ()),
    "io.conn_reset": (_NODE, {}, ()),
    "model.update": (_NONE, {"version": _version}, ("version",)),
    "model.rollback": (_NONE, {}, ()),
}


@dataclass(frozen=True)
class Step:
    at_s: float
    action: str
    target: Any            # host name, [a, b] link endpoints, [[group], [group]] or None
    params: dict[str, Any]
    duration_s: float | None
    line: int


@dataclass(frozen=True)
class Workload:
    mode: str              # closed | open
    concurrency: int
    rate_rps: float
    duration_s: float
    warmup_s: float
    seed: int
    pool: int


@dataclass(frozen=True)
class Slo:
    lost: int | None = 0
    mismatched: int | None = 0
    duplicates: int | None = None
    recover_within_s: float | None = None
    recover_to: str = "plan"        # the bar recover_within judges: RECOVERY_BARS
    min_throughput_ratio: float | None = None   # measured / predicted throughput
    p99_ms: float | None = None


@dataclass
class Scenario:
    name: str
    path: Path
    topology: Topology
    model: str                                   # zoo name or an ONNX file path
    algorithm: str
    time_limit_s: float
    backend: str
    workload: Workload
    steps: list[Step] = field(default_factory=list)
    slo: Slo = field(default_factory=Slo)
    control: ControlSettings = field(default_factory=ControlSettings)
    pipelines: int = 1          # planner.pipelines: at most this many (0: auto)
    # model.input_shapes: input name -> concrete shape (empty: the model's own, batch 1)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    spare: int = 0              # planner.spare: nodes kept out of the plan by choice


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative whole number, got {value!r}")
    return value


def _positive_int(value: Any) -> int:
    if _count(value) == 0:
        raise ValueError("must be at least 1")
    return value


def _at_most(limit: int, why: str) -> Any:
    """A whole number from 1 to `limit` (formats.limits says why)."""
    def check(value: Any) -> int:
        if _positive_int(value) > limit:
            raise ValueError(f"{value} is more than {limit}: {why}")
        return value

    return check


# numpy and random take seeds of any size, but a seed is written to the report and reused by
# other tools (32-bit everywhere).
MAX_SEED = 2**32 - 1


def _seed(value: Any) -> int:
    if _count(value) > MAX_SEED:
        raise ValueError(f"expected a seed from 0 to {MAX_SEED}, got {value}")
    return value


# What a recover_within SLO compares each fault's recovery time with: 90% of the plan's
# predicted throughput (summary.json recovered_s), or of the rate measured before the fault
# (recovered_rel_s: a runner slower than the prediction can still pass).
RECOVERY_BARS = {"plan": "recovered_s", "rate_before": "recovered_rel_s"}


def _recovery_bar(value: Any) -> str:
    if value not in RECOVERY_BARS:
        raise ValueError(f"expected one of {', '.join(RECOVERY_BARS)}, got {value!r}")
    return str(value)


def _ratio(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1.5:
        raise ValueError(f"expected a ratio in (0, 1.5], got {value!r}")
    return float(value)


def _input_shapes(model: Fields) -> dict[str, tuple[int, ...]]:
    """`input_shapes: {NAME: [1, 128], ...}`: concrete shapes of the model's inputs (needed
    for symbolic dimensions other than the batch, which defaults to 1)."""
    if not model.has("input_shapes"):
        return {}
    value = model.get("input_shapes")
    if not isinstance(value, dict) or not value:
        raise model.error("input_shapes", "expected a mapping of input name to a list of "
                                          "positive sizes, e.g. {input_ids: [1, 128]}")
    shapes: dict[str, tuple[int, ...]] = {}
    for name, dims in value.items():
        if not (isinstance(dims, list) and dims and all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)):
            raise model.error("input_shapes", f"input {name!r}: expected a list of positive "
                                              f"sizes, got {dims!r}")
        shapes[str(name)] = tuple(dims)
    return shapes


def _model(fields: Fields, base: Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    model = fields.sub("model")
    assert model is not None
    shapes = _input_shapes(model)
    if model.has("zoo") == model.has("path"):
        raise model.error("zoo", "give exactly one of 'zoo' (a zoo model name) or 'path'")
    if model.has("zoo"):
        name = model.get("zoo", expect_type(str, "a zoo model name"))
        if name not in ZOO_MODELS:
            raise model.error("zoo", f"unknown zoo model {name!r}; known: {', '.join(ZOO_MODELS)}")
        model.done()
        return name, shapes
    path = base / model.get("path", expect_type(str, "a path to an ONNX file"))
    if not path.is_file():
        raise model.error("path", f"no such model file: {path}")
    model.done()
    return str(path), shapes


def _workload(fields: Fields) -> Workload:
    spec = fields.sub("workload")
    assert spec is not None
    mode = spec.get("mode", expect_type(str, "closed or open"), "closed")
    if mode not in ("closed", "open"):
        raise spec.error("mode", f"must be 'closed' or 'open', got {mode!r}")
    concurrency = spec.get("concurrency", _at_most(
        MAX_CONCURRENCY, "beyond ZeroMQ's 1000-message queues more requests in flight only "
                         "wait (formats/limits.py)"), 4)
    rate = 0.0
    if mode == "open":
        rate = spec.get("rate", _positive_rate)
    elif spec.has("rate"):
        raise spec.error("rate", "only an open workload has a rate")
    workload = Workload(
        mode=mode, concurrency=concurrency, rate_rps=rate,
        duration_s=spec.get("duration", parse_duration_s),
        warmup_s=spec.get("warmup", parse_duration_s, 0.0),
        seed=spec.get("seed", _seed, 1),
        pool=spec.get("pool", _at_most(MAX_POOL, "the pool and its reference outputs are "
                                                 "kept in memory"), 8),
    )
    if workload.duration_s <= 0:
        raise spec.error("duration", "must be positive")
    spec.done()
    return workload


def _positive_rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0 < value <= MAX_RATE_RPS:
        raise ValueError(f"expected a rate in requests per second above 0 and at most "
                         f"{MAX_RATE_RPS:g} (one dispatcher's ceiling), got {value!r}")
    return float(value)


def _target(step: Fields, kind: str, topology: Topology) -> Any:
    hosts = set(topology.hosts)
    if kind == _NONE:
        if step.has("target"):
            raise step.error("target", "this action takes no target")
        return None
    target = step.get("target")
    if kind == _NODE:
        if target not in hosts:
            raise step.error("target", f"unknown host {target!r} in topology {topology.name}")
        return target
    if kind == _LINK:
        linked = {frozenset((link.a, link.b)) for link in topology.links}
        if not (isinstance(target, list) and len(target) == 2
                and frozenset(map(str, target)) in linked):
            raise step.error("target", f"expected the two endpoints of a topology link, "
                                       f"got {target!r}")
        return [str(target[0]), str(target[1])]
    groups_ok = (isinstance(target, list) and len(target) == 2
                 and all(isinstance(g, list) and g for g in target))
    if not groups_ok:
        raise step.error("target", "expected two lists of hosts, e.g. [[edge1], [dispatcher]]")
    for group in target:
        for host in group:
            if host not in hosts:
                raise step.error("target", f"unknown host {host!r} in topology {topology.name}")
    if set(target[0]) & set(target[1]):
        raise step.error("target", "a host cannot be on both sides of a partition")
    return [list(map(str, group)) for group in target]


def _steps(fields: Fields, topology: Topology, workload: Workload) -> list[Step]:
    raw = fields.get("steps", expect_type(list, "a list of steps"), [])
    item_lines = getattr(raw, "item_lines", [fields.line_of("steps")] * len(raw))
    steps = []
    for index, (item, line) in enumerate(zip(raw, item_lines)):
        step = Fields(item, fields.file, f"steps[{index}]", line=line)
        action = step.get("action", expect_type(str, "an action name"))
        if action not in ACTIONS:
            raise step.error("action", f"unknown action {action!r}; known: "
                                       + ", ".join(ACTIONS))
        kind, converters, required = ACTIONS[action]
        at = step.get("at", parse_duration_s)
        if not 0 <= at < workload.duration_s:
            raise step.error("at", f"{at:g}s is outside the measured run "
                                   f"(0s to {workload.duration_s:g}s)")
        target = _target(step, kind, topology)
        params_fields = step.sub("params", None)
        params: dict[str, Any] = {}
        if params_fields is not None:
            for name, convert in converters.items():
                if params_fields.has(name):
                    params[name] = params_fields.get(name, convert)
            params_fields.done()
        for name in required:
            if name not in params:
                raise step.error("params", f"{action} needs params.{name}")
        duration = step.get("duration", parse_duration_s, None)
        if duration is not None and duration <= 0:
            raise step.error("duration", "must be positive")
        step.done()
        steps.append(Step(at, action, target, params, duration, line))
    return sorted(steps, key=lambda s: s.at_s)


def _slo(fields: Fields) -> Slo:
    spec = fields.sub("slo", None)
    if spec is None:
        return Slo()
    slo = Slo(
        lost=spec.get("lost", _count, 0),
        mismatched=spec.get("mismatched", _count, 0),
        duplicates=spec.get("duplicates", _count, None),
        recover_within_s=spec.get("recover_within", parse_duration_s, None),
        recover_to=spec.get("recover_to", _recovery_bar, "plan"),
        min_throughput_ratio=spec.get("min_throughput_ratio", _ratio, None),
        p99_ms=spec.get("p99", lambda v: parse_duration_s(v) * 1000, None),
    )
    spec.done()
    return slo


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario; InputError names file, line and field."""
    path = Path(path)
    fields = Fields(load_yaml(path), path)
    # The name becomes results/<name>/ (and a Kubernetes label): the one rule for names.
    name = fields.get("name", lambda v: plain_name(v, "scenario name"))
    topology_file = path.parent / fields.get("topology", expect_type(str, "a topology path"))
    if not topology_file.is_file():
        raise fields.error("topology", f"no such topology file: {topology_file}")
    topology = load_topology(topology_file)
    model, input_shapes = _model(fields, path.parent)
    planner = fields.sub("planner", None)
    algorithm, time_limit, pipelines, spare = "auto", 2.0, 1, 0
    if planner is not None:
        algorithm = planner.get("algorithm", expect_type(str, "an algorithm name"), "auto")
        if algorithm not in ALGORITHMS:
            raise planner.error("algorithm", f"unknown algorithm {algorithm!r}; known: "
                                             + ", ".join(ALGORITHMS))
        time_limit = planner.get("time_limit", parse_duration_s, 2.0)
        pipelines = planner.get("pipelines", parse_pipelines, 1)
        spare = planner.get("spare", _count, 0)
        if spare >= len(topology.hosts) - 1:
            raise planner.error("spare", f"{spare} spare nodes leave none of the "
                                         f"{len(topology.hosts) - 1} edge hosts to serve")
        planner.done()
    backend = fields.get("backend", expect_type(str, "a backend name"), "embedded")
    if backend not in BACKENDS:
        raise fields.error("backend", f"unknown backend {backend!r}; known: "
                                      + ", ".join(BACKENDS))
    workload = _workload(fields)
    steps = _steps(fields, topology, workload)
    check_node_states(steps, path, topology.hosts)
    slo = _slo(fields)
    control = ControlSettings.from_scenario(fields.sub("control", None))
    fields.done()
    return Scenario(name, path, topology, model, algorithm, time_limit, backend, workload,
                    steps, slo, control, pipelines, input_shapes, spare)


def with_duration(scenario: Scenario, text: str) -> Scenario:
    """The same scenario with a shorter (or longer) measured window, for quick CI runs;
    steps that no longer fit are refused like in the file."""
    try:
        duration = parse_duration_s(text)
    except ValueError as exc:
        raise InputError(str(exc), field="--duration") from exc
    for step in scenario.steps:
        if step.at_s >= duration:
            raise InputError(f"step {step.action} at {step.at_s:g}s does not fit in "
                             f"--duration {text}", file=scenario.path, line=step.line,
                             field="at")
    return replace(scenario, workload=replace(scenario.workload, duration_s=duration))


def parse_pipelines(value: Any) -> int:
    """`auto` (0: as many as pay off) or the most pipelines side by side (>= 1), from a
    scenario field or a command-line argument."""
    if value == "auto":
        return 0
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected auto or a whole number >= 1, got {value!r}")
    return value
