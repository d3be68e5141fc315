"""The controller's background work: plans and the stage files they need, model versions and
their references. Everything here runs in the controller's job thread on snapshots (frozen
requests), never on the controller's live state, so its main loop keeps serving heartbeats
and the dispatcher meanwhile.

Division of labour: `partitioner.algorithms.solve` searches, `testbed.control.policy` picks among
candidate plans (the reuse and rejoin rules), this module turns a request into a `Prepared`
plan: each stage either re-uses a loaded worker (no files needed) or comes with a stage file
from a split of the model at the plan's cuts. Splits run in a child process (a warm one,
`python -m partitioner.split_server`, that keeps the parsed model; a one-shot `python -m
partitioner split` if it fails), so the controller's interpreter lock is never held for
seconds by ONNX graph surgery, and are cached per (model version, cuts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from partitioner.instance import InfeasibleError, Instance, Plan, Stage, restrict
from stage_image.wire import CHUNK_BYTES
from testbed.control import policy
from testbed.control.policy import Held

ROOT = Path(__file__).resolve().parents[2]
# plans that keep `planner.spare` nodes out: the ones made while nothing is lost. A plan after
# a loss (failure, straggler) or for the next loss (contingency) uses the spare instead.
SPARE_KINDS = ("initial", "rejoin", "rollout", "manual")
BRIDGE_SOLVES = 2           # plans solved for a quick bridge, each without one more node


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class StageFile:
    path: Path
    sha256: str
    size: int
    inputs: list[str]
    outputs: list[str]


def load_stage_files(stage_dir: Path) -> list[StageFile]:
    """Read stages.json (the split contract) and hash every stage file."""
    specs = json.loads((stage_dir / "stages.json").read_text())
    files = []
    for spec in specs:
        path = stage_dir / spec["file"]
        files.append(StageFile(path, sha256_file(path), path.stat().st_size,
                               list(spec["inputs"]), list(spec["outputs"])))
    return files


def stage_cuts(stages: list[Stage]) -> tuple[int, ...]:
    """Cut after the last segment of every stage but the last. Segment i lies between cuts
    i-1 and i (partitioner.split.cut_indices_from_plan uses the same rule)."""
    return tuple(stage.end - 1 for stage in stages[:-1])


def cut_indices(plan: Plan) -> tuple[int, ...]:
    """The cuts of a one-pipeline plan (of the first pipeline of several)."""
    return stage_cuts(plan.pipelines[0])


@dataclass(frozen=True)
class VersionInfo:
    """A model version the controller can deploy: its file and its planner instance."""

    version: int
    model: Path
    sha256: str
    instance: Instance
    source: str


@dataclass(frozen=True)
class PlanRequest:
    """A snapshot of what a plan job needs. `kind`: initial | failure | rejoin | rollout |
    manual | contingency."""

    kind: str
    reason: str
    version: VersionInfo
    live: frozenset[str]
    base: Plan | None = None               # the plan in force (repairs keep its cuts)
    held: frozenset[Held] = frozenset()    # workers (serving or standby), loaded or loading
    avoid: frozenset[str] = frozenset()    # nodes new stages should rather not go to
    given: Plan | None = None              # use this plan instead of solving
    given_stages: Path | None = None       # a split matching `given`
    excluded: str | None = None            # contingency: the host assumed lost
    full: frozenset[str] = frozenset()     # contingency, asked again: no standby room left
    generation: int = 0                    # the next epoch number when it was asked
    # those of `held` that serve at once: deploy estimates count the others as new (they
    # may be seconds from loaded); None: all of `held`
    loaded: frozenset[Held] | None = None

    def ready(self) -> set[Held]:
        """The workers a deploy estimate takes as serving at once."""
        return set(self.held if self.loaded is None else self.loaded)


@dataclass
class Prepared:
    """A plan ready to deploy: per stage, a stage file, or None where a loaded worker with
    the same segments of the same version on the same node serves it."""

    request: PlanRequest
    plan: Plan
    stages: list[StageFile | None]
    choice: policy.Choice | None
    solve_s: float = 0.0
    split_s: float = 0.0
    split_cached: bool = True
    stage_dir: Path | None = None
    precomputed: bool = False
    epoch: int = 0                          # given when it becomes an epoch
    bridged: Plan | None = None             # the better plan this one serves before
    deploy_estimate_s: float = 0.0          # policy.deploy_estimate_s of `plan`

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.request.kind, "reason": self.request.reason,
            "version": self.request.version.version, "algorithm": self.plan.algorithm,
            "live": sorted(self.request.live), "solve_s": round(self.solve_s, 3),
            "split_s": round(self.split_s, 3), "split_cached": self.split_cached,
            "precomputed": self.precomputed,
            "bottleneck_ms": round(self.plan.bottleneck_ms, 3),
            "predicted_throughput_rps": self.plan.predicted_throughput_rps,
            "hosts": [s.node for s in self.plan.stages],
            "cuts": list(cut_indices(self.plan))}
        if self.plan.chains:
            out["pipelines"] = [[s.node for s in p] for p in self.plan.pipelines]
        if self.choice is not None:
            out["choice"] = self.choice.describe()
        if self.request.kind == "failure":
            out["deploy_estimate_s"] = round(self.deploy_estimate_s, 2)
        if self.bridged is not None:
            out["bridged"] = {"hosts": [s.node for s in self.bridged.stages],
                              "predicted_throughput_rps":
                                  round(self.bridged.predicted_throughput_rps, 3),
                              "deploy_estimate_s": round(policy.deploy_estimate_s(
                                  self.request.version.instance, self.bridged,
                                  self.request.version.version, self.request.ready()), 2)}
        return out


@dataclass
class Planner:
    """Runs plan requests (in the job thread). Holds the split cache; nothing else."""

    run_dir: Path
    algorithm: str
    time_limit_s: float
    seed: int
    tolerance: float
    pipelines: int = 1                  # at most this many side by side (0: auto)
    spare: int = 0                      # nodes kept out of plans by choice (SPARE_KINDS)
    split_cache: dict[tuple[int, tuple[int, ...]], Path] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def prepare(self, req: PlanRequest) -> Prepared:
        """The plan for a request (InfeasibleError when none fits the live nodes)."""
        instance = restrict(req.version.instance, set(req.live))
        if not instance.nodes:
            raise InfeasibleError("no live node to place a stage on")
        started = time.monotonic()
        choice = None
        bridged = None
        if req.given is not None:
            plan = req.given
            if req.given_stages is not None and not plan.chains:
                with self.lock:
                    self.split_cache[(req.version.version, cut_indices(plan))] = req.given_stages
        else:
            candidates = policy.repair_candidates(instance, req.base) if req.base else []
            # the best plan, and the best that keeps off the nodes to avoid (a new version
            # deployed beside the old one on nodes that do not serve takes no CPU from it)
            # or off the full ones (a contingency plan whose standbys found no room there)
            live = set(req.live)
            pools = [live] + [live - nodes for nodes in (req.avoid, req.full)
                              if nodes and live - nodes]
            problem: InfeasibleError | None = None
            for pool in pools:
                try:
                    candidates.append(self.solve(
                        req.version, restrict(instance, pool),
                        self.spare if req.kind in SPARE_KINDS else 0))
                except InfeasibleError as exc:
                    problem = problem or exc
            if not candidates:
                assert problem is not None
                raise problem
            candidates += policy.snapped_candidates(instance, candidates, req.version.version,
                                                    set(req.held), req.full)
            choice = policy.choose(candidates, req.version.version, set(req.held),
                                   self.tolerance, req.avoid, req.full)
            plan = choice.plan
            if req.kind == "failure":
                bridge = self.quick_bridge(req, instance, candidates, plan)
                if bridge is not None:
                    bridged, plan = plan, bridge
        solve_s = time.monotonic() - started
        version = req.version.version
        needed = [i for i, s in enumerate(plan.stages)
                  if policy.stage_key(s, version) not in req.held]
        stages: list[StageFile | None] = [None] * len(plan.stages)
        prepared = Prepared(req, plan, stages, choice, solve_s, bridged=bridged,
                            deploy_estimate_s=policy.deploy_estimate_s(
                                req.version.instance, plan, version, req.ready()))
        if needed:
            started = time.monotonic()
            files, stage_dir, cached = self.stage_files(req.version, plan)
            for i in needed:
                stages[i] = files[i]
            prepared.split_s, prepared.split_cached = time.monotonic() - started, cached
            prepared.stage_dir = stage_dir
        return prepared

    def quick_bridge(self, req: PlanRequest, instance: Instance, candidates: list[Plan],
                     chosen: Plan) -> Plan | None:
        """A plan to serve before `chosen` when that one would be slow to deploy (the
        quick-bridge rule, testbed.control.policy): the candidates, and up to BRIDGE_SOLVES
        plans solved without the node whose new stage deploys slowest, one more node each
        time."""
        version, held = req.version.version, req.ready()

        def estimate(plan: Plan) -> float:
            return policy.deploy_estimate_s(instance, plan, version, held)

        if estimate(chosen) < policy.QUICK_GAIN_S:
            return None
        pool = {n.name for n in instance.nodes}
        extra: list[Plan] = []
        plan = chosen
        for _ in range(BRIDGE_SOLVES):
            slowest = policy.slowest_new_node(instance, plan, version, held)
            if slowest is None:
                break
            pool.discard(slowest)
            if not pool:
                break
            try:
                plan = self.solve(req.version, restrict(instance, pool))
            except InfeasibleError:
                break
            extra.append(plan)
        return policy.quick_bridge(candidates + extra, chosen, estimate)

    def solve(self, version: VersionInfo, instance: Instance, spare: int = 0) -> Plan:
        """The planner's best plan for `instance` (the version's, on some of its nodes),
        leaving `spare` nodes out by choice."""
        from partitioner.replicate import plan_pipelines  # needed only here

        return plan_pipelines(instance, self.algorithm, self.time_limit_s, self.seed,
                              self.pipelines, spare)

    def stage_files(self, version: VersionInfo, plan: Plan,
                    ) -> tuple[list[StageFile], Path, bool]:
        """The stage files of `plan`, pipeline after pipeline: the model is split once per
        (version, cuts), so identical pipelines share one split. Returns the files, the
        first pipeline's split directory and whether every split was cached."""
        files: list[StageFile] = []
        dirs: list[Path] = []
        cached = True
        for pipeline in plan.pipelines:
            cuts = stage_cuts(pipeline)
            key = (version.version, cuts)
            with self.lock:
                stage_dir = self.split_cache.get(key)
            if stage_dir is None:
                cached = False
                name = "_".join(str(c) for c in cuts) or "whole"
                stage_dir = self.run_dir / "stages" / f"v{version.version}" / f"cuts_{name}"
                split_model(version.model, list(cuts), stage_dir)
                with self.lock:
                    self.split_cache[key] = stage_dir
            split = load_stage_files(stage_dir)
            if len(split) != len(pipeline):
                raise InfeasibleError(f"split at {list(cuts)} gave {len(split)} stages, the "
                                      f"pipeline has {len(pipeline)}")
            files.extend(split)
            dirs.append(stage_dir)
        return files, dirs[0], cached


class SplitServer:
    """The warm splitter child (`python -m partitioner.split_server`), started on first use;
    one request at a time (the job thread is the only caller)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.lock = threading.Lock()

    def split(self, model: Path, cuts: list[int], out_dir: Path) -> str | None:
        """None when done, else why not (the caller falls back to a one-shot child)."""
        with self.lock:
            try:
                if self.proc is None or self.proc.poll() is not None:
                    self.proc = subprocess.Popen(
                        [sys.executable, "-m", "partitioner.split_server"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, text=True, env=_split_env(), cwd=str(ROOT))
                assert self.proc.stdin is not None and self.proc.stdout is not None
                self.proc.stdin.write(json.dumps({"model": str(model), "cuts": cuts,
                                                  "out": str(out_dir)}) + "\n")
                self.proc.stdin.flush()
                line = self.proc.stdout.readline()
            except OSError as exc:
                return f"split server: {exc}"
            if not line:
                return "split server ended"
            try:
                reply = json.loads(line)
            except json.JSONDecodeError:
                return "split server: bad reply"
            return None if reply.get("ok") else str(reply.get("error", "failed"))


SPLITTER = SplitServer()


def _split_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p), OMP_NUM_THREADS="1")


def split_model(model: Path, cuts: list[int], out_dir: Path) -> None:
    """The stages of `model` at `cuts` into a temporary directory renamed into place (a crash
    mid-split leaves no half directory behind to be trusted): by the warm splitter
    (SplitServer), else by `python -m partitioner split` in a one-shot child."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if SPLITTER.split(model, cuts, tmp) is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        result = subprocess.run(
            [sys.executable, "-m", "partitioner", "split", str(model), "--out", str(tmp),
             "--cuts", ",".join(str(c) for c in cuts)],
            capture_output=True, text=True, env=_split_env(), cwd=str(ROOT))
        if result.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise RuntimeError(f"split at {cuts} failed (exit {result.returncode}): {tail}")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def version_instance(base: Instance, manifest: Any, base_reserve: int | None) -> Instance:
    """The planner instance of a published version: its own segments and input size, the
    cluster's nodes, bandwidth and per-frame overhead. Node memory is the host's memory less
    a per-model activation reserve; when the reserve of the base model is known, the
    difference is applied, else both are taken as equal."""

    delta = 0 if base_reserve is None else base_reserve - manifest.activation_reserve_bytes
    nodes = [dataclasses.replace(n, memory_bytes=max(0, n.memory_bytes + delta))
             for n in base.nodes]
    return dataclasses.replace(base, segments=list(manifest.segments),
                               input_bytes=manifest.input_bytes, nodes=nodes,
                               bandwidth_mbps=dict(base.bandwidth_mbps))
