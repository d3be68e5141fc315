"""The controller: `python -m testbed.controller CONFIG.json`, on the dispatcher host.

Division of labour (Kubernetes-shaped): the controller is scheduler + controller-manager. It
plans (partitioner.algorithms.solve), splits the model at the plan's stage ends
(partitioner.split.split_model, cached per plan under run_dir/stages/epoch_N), serves stage
files to agents over the control connection, and deploys. Agents (stage_image.agent) only
execute; the dispatcher (testbed.dispatcher, in this process) feeds and checks the pipeline;
the driver (testbed.driver) is the experimenter and talks to us over a REP socket.

Every deployment is an *epoch* with its own data ports (base + epoch % span); frames of any
other epoch are dropped by the workers. An epoch goes waiting (for its agents' hello) ->
deploying -> active (the dispatcher switches to its stage 0 and replays everything
unanswered) -> retired (its workers are stopped). Reconciliation is level-triggered: every
heartbeat lists an agent's workers; a desired worker missing from it is deployed again, a
worker of a dead epoch is stopped (so a node cut off and healed never serves a stale epoch).

Failure handling (the hooks issue 4 builds on): heartbeats are tracked per host; a host silent
for `suspect_after_missed` intervals is suspected (`node.suspected`), a worker reported
failed marks its host unhealthy; either, when it touches the active or deploying epoch,
triggers a re-plan over the live hosts (when `replan` is on), deployed as a new epoch beside
the old one. Planning and splitting run in a background thread so the dispatcher keeps
running meanwhile. Not yet here (issue 4): reuse of running stages, rejoin hold times and
margins, model-version rollout (the dispatcher already keeps references per version).

CONFIG.json (unknown fields are refused):
  run_dir, model (ONNX path), instance (planner instance JSON path),
  hosts {name: IP}, dispatcher_ip,
  planner {algorithm: "auto", time_limit_s: 2.0, seed: 0},
  workload {see testbed.dispatcher.Workload},
  host ("dispatcher"), control_port (18000), sink_port (19000), data_port_base (20000),
  data_port_span (20000), control_ipc ("ipc://RUN_DIR/control.sock"), heartbeat_ms (200),
  suspect_after_missed (3), hello_timeout_s (60), deploy_timeout_s (120), replan (true),
  version (1), plan (plan.json for epoch 1, instead of solving), stages_dir (a split
  matching that plan, instead of splitting).

Driver commands (JSON over REQ/REP, every reply has "ok"): {"cmd": "status"},
{"cmd": "start_workload", "workload": {overrides}}, {"cmd": "stop"},
{"cmd": "replan", "exclude": [host, ...]}.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from partitioner.instance import (
    InfeasibleError,
    Instance,
    Plan,
    load_instance,
    plan_from_json,
    plan_problems,
)
from stage_image.wire import CHUNK_BYTES, FrameError, decode_control, encode_control
from testbed.dispatcher import (
    Dispatcher,
    Route,
    Workload,
    compute_references,
    default_generator,
    input_specs,
    make_pool,
    vocab_sizes,
)
from testbed.errors import EXIT_BAD_INPUT, InputError

FIXED_WORKLOAD_FIELDS = ("seed", "pool_size", "input_dims")  # the pool is built at start


# -- configuration ----------------------------------------------------------------------------

@dataclass
class PlannerConfig:
    algorithm: str = "auto"
    time_limit_s: float = 2.0
    seed: int = 0


@dataclass
class ControllerConfig:
    run_dir: Path
    model: Path
    instance: Path
    hosts: dict[str, str]
    dispatcher_ip: str
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    workload: Workload = field(default_factory=Workload)
    host: str = "dispatcher"
    control_port: int = 18000
    sink_port: int = 19000
    data_port_base: int = 20000
    data_port_span: int = 20000
    control_ipc: str = ""
    heartbeat_ms: float = 200.0
    suspect_after_missed: int = 3
    hello_timeout_s: float = 60.0
    deploy_timeout_s: float = 120.0
    replan: bool = True
    version: int = 1
    plan: Path | None = None
    stages_dir: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> ControllerConfig:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror}", file=path) from exc
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON: {exc.msg}", file=path, line=exc.lineno) from exc
        return cls.from_json(data, str(path))

    @classmethod
    def from_json(cls, data: Any, file: str = "<config>") -> ControllerConfig:
        if not isinstance(data, dict):
            raise InputError("the controller config must be a JSON object", file=file)
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError("unknown field", file=file, field=unknown[0])
        for key in ("run_dir", "model", "instance", "hosts", "dispatcher_ip"):
            if key not in data:
                raise InputError("required field is missing", file=file, field=key)
        values = dict(data)
        try:
            planner = values.get("planner", {})
            if not isinstance(planner, dict) or set(planner) - set(
                    PlannerConfig.__dataclass_fields__):
                raise ValueError("planner takes algorithm, time_limit_s, seed")
            values["planner"] = PlannerConfig(**planner)
            values["workload"] = Workload.from_json(values.get("workload", {}))
        except (TypeError, ValueError) as exc:
            raise InputError(str(exc), file=file, field="planner/workload") from exc
        hosts = values["hosts"]
        if not isinstance(hosts, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in hosts.items()):
            raise InputError("must map host names to IP addresses", file=file, field="hosts")
        for key in ("run_dir", "model", "instance", "plan", "stages_dir"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        cfg = cls(**values)
        if not cfg.control_ipc:
            cfg.control_ipc = f"ipc://{cfg.run_dir / 'control.sock'}"
        elif "://" not in cfg.control_ipc:
            cfg.control_ipc = f"ipc://{cfg.control_ipc}"
        for key in ("control_port", "sink_port", "data_port_base"):
            if not 1 <= getattr(cfg, key) <= 65535:
                raise InputError("not a port number", file=file, field=key)
        if cfg.data_port_span < 1 or cfg.data_port_base + cfg.data_port_span > 65536:
            raise InputError("data ports must stay below 65536", file=file,
                             field="data_port_span")
        if cfg.suspect_after_missed < 1 or cfg.heartbeat_ms <= 0:
            raise InputError("must be positive", file=file, field="suspect_after_missed")
        return cfg


# -- events -----------------------------------------------------------------------------------

class EventLog:
    """events.jsonl: one JSON object per line, {"t": unix time, "type": ..., ...}. Each line
    is one append write, so the driver may append its fault events to the same file."""

    def __init__(self, path: Path, log: logging.Logger) -> None:
        self.path, self.log = path, log
        path.parent.mkdir(parents=True, exist_ok=True)
        self.last: dict[str, Any] | None = None

    def emit(self, kind: str, **fields: Any) -> None:
        record = {"t": time.time(), "type": kind, **fields}
        line = json.dumps(record, default=str, separators=(",", ":"))
        try:
            with self.path.open("a") as handle:
                handle.write(line + "\n")
        except OSError as exc:
            self.log.error("cannot write event %s: %s", kind, exc)
        brief = {k: v for k, v in fields.items() if k not in ("plan", "workload")}
        self.log.info("event %s %s", kind, json.dumps(brief, default=str)[:300])
        self.last = record


# -- plans, stages, epochs --------------------------------------------------------------------

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


def cut_indices(plan: Plan) -> tuple[int, ...]:
    """Cut after the last segment of every stage but the last. Segment i lies between cuts
    i-1 and i (partitioner.split.cut_indices_from_plan uses the same rule)."""
    return tuple(stage.end - 1 for stage in plan.stages[:-1])


def restrict(instance: Instance, live: set[str]) -> Instance:
    """The instance over the live nodes only (links to dead nodes dropped too)."""
    nodes = [n for n in instance.nodes if n.name in live]
    keep = live | {instance.source}
    bandwidth = {pair: bw for pair, bw in instance.bandwidth_mbps.items()
                 if pair[0] in keep and pair[1] in keep}
    return Instance(instance.segments, instance.input_bytes, nodes, instance.source, bandwidth)


@dataclass
class Prepared:
    """A plan with its stage files, ready to deploy (the product of a background job)."""

    epoch: int                    # reserved when the job started: numbers only grow
    plan: Plan
    stages: list[StageFile]
    stage_dir: Path
    reason: str
    live: list[str]
    solve_s: float
    split_s: float
    split_cached: bool


@dataclass
class Epoch:
    number: int
    version: int
    plan: Plan
    stages: list[StageFile]
    hosts: list[str]
    port: int
    state: str = "waiting"        # waiting | deploying | active | retired | abandoned
    workers: dict[int, str] = field(default_factory=dict)     # stage -> reported state
    deploy_sent: dict[int, float] = field(default_factory=dict)
    created: float = 0.0
    deployed: float = 0.0

    def stage_of(self, host: str) -> int | None:
        return self.hosts.index(host) if host in self.hosts else None


@dataclass
class AgentInfo:
    host: str
    pid: int
    last_seen: float              # monotonic
    suspected: bool = False
    stop_sent: dict[int, float] = field(default_factory=dict)


# -- the controller ---------------------------------------------------------------------------

class Controller:
    def __init__(self, cfg: ControllerConfig, log: logging.Logger,
                 dispatch_log: logging.Logger) -> None:
        self.cfg, self.log = cfg, log
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        self.events = EventLog(cfg.run_dir / "events.jsonl", log)
        self.instance = load_instance(cfg.instance)
        missing = [n.name for n in self.instance.nodes if n.name not in cfg.hosts]
        if missing:
            raise InputError(f"no IP address for instance nodes {missing}", field="hosts")
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)   # a restarted agent takes its name
        self.router.bind(f"tcp://{cfg.dispatcher_ip}:{cfg.control_port}")
        self.rep = self.ctx.socket(zmq.REP)
        self.rep.setsockopt(zmq.LINGER, 0)
        self.rep.bind(cfg.control_ipc)
        self.dispatcher = Dispatcher(self.ctx, f"tcp://{cfg.dispatcher_ip}:{cfg.sink_port}",
                                     self.events.emit, dispatch_log)
        self.agents: dict[str, AgentInfo] = {}
        self.unhealthy: set[str] = set()
        self.models: dict[str, Path] = {}
        self.epochs: dict[int, Epoch] = {}
        self.active: Epoch | None = None
        self.deploying: Epoch | None = None
        self.next_epoch = 1
        self.split_cache: dict[tuple[int, ...], Path] = {}
        self.jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plan")
        self.job: Future[Any] | None = None
        self.replan_reason: str | None = None
        self.waiting_for_nodes = False
        self.failure: str | None = None
        self.running = True
        self.csv_written = False
        self.started = time.monotonic()
        self.heartbeat_s = cfg.heartbeat_ms / 1000.0

    # -- background jobs (planning, splitting, references) --------------------------------------

    def _bootstrap(self) -> tuple[Any, Any]:
        """The input pool and the full model's references for it (once per version)."""
        w = self.cfg.workload
        specs = input_specs(self.cfg.model)
        pool = make_pool(specs, w.pool_size, w.seed, w.input_dims,
                         default_generator(vocab_sizes(self.cfg.model)))
        return pool, compute_references(self.cfg.model, pool)

    def _initial_plan(self, number: int) -> Prepared:
        cfg = self.cfg
        if cfg.plan is None:
            return self._plan(number, set(cfg.hosts), "initial")
        plan = plan_from_json(self.instance, json.loads(cfg.plan.read_text()))
        problems = plan_problems(self.instance, plan.stages)
        if problems:
            raise InfeasibleError(f"the given plan is not valid: {'; '.join(problems)}")
        if cfg.stages_dir is not None:
            self.split_cache[cut_indices(plan)] = cfg.stages_dir
        return self._split(number, plan, "initial (given)",
                           sorted(n.name for n in self.instance.nodes), 0.0)

    def _plan(self, number: int, live: set[str], reason: str) -> Prepared:
        from partitioner.algorithms import solve  # planners are needed only here

        instance = restrict(self.instance, live)
        if not instance.nodes:
            raise InfeasibleError("no live node to place a stage on")
        started = time.monotonic()
        p = self.cfg.planner
        plan = solve(instance, p.algorithm, time_limit_s=p.time_limit_s, seed=p.seed)
        return self._split(number, plan, reason, sorted(n.name for n in instance.nodes),
                           time.monotonic() - started)

    def _split(self, number: int, plan: Plan, reason: str, live: list[str],
               solve_s: float) -> Prepared:
        """Stage files for `plan`, split once per set of cuts (a later epoch with the same
        cuts reuses the directory of the first)."""
        cuts = cut_indices(plan)
        started = time.monotonic()
        stage_dir = self.split_cache.get(cuts)
        cached = stage_dir is not None
        if stage_dir is None:
            from partitioner.split import split_model  # only when a new split is needed

            stage_dir = self.cfg.run_dir / "stages" / f"epoch_{number}"
            split_model(self.cfg.model, list(cuts), stage_dir)
        stages = load_stage_files(stage_dir)
        if len(stages) != len(plan.stages):
            raise InfeasibleError(f"split at {list(cuts)} gave {len(stages)} stages, the plan "
                                  f"has {len(plan.stages)}")
        self.split_cache[cuts] = stage_dir
        return Prepared(number, plan, stages, stage_dir, reason, live, solve_s,
                        time.monotonic() - started, cached)

    def _job_done(self, future: Future[Any]) -> None:
        kind = getattr(future, "kind", "plan")
        self.job = None
        try:
            result = future.result()
        except (InfeasibleError, InputError) as exc:
            self.events.emit("plan.infeasible", reason=str(exc), live=sorted(self.live_hosts()))
            self.waiting_for_nodes = True
            if not self.cfg.replan and self.active is None:
                self.failure = f"no plan: {exc}"
            return
        except Exception as exc:  # noqa: BLE001 - a planner or split bug must not kill us
            self.log.exception("%s job failed", kind)
            self.events.emit("plan.failed", reason=f"{type(exc).__name__}: {exc}")
            if kind != "plan" or self.active is None:
                self.failure = f"{kind}: {type(exc).__name__}: {exc}"
            return
        if kind == "bootstrap":
            pool, references = result
            self.dispatcher.set_pool(pool)
            self.dispatcher.add_version(self.cfg.version, references)
            self.events.emit("references.ready", version=self.cfg.version, pool=len(pool))
            self.start_job("initial", self._initial_plan, self.reserve_epoch())
            return
        prepared: Prepared = result
        gone = set(s.node for s in prepared.plan.stages) - self.live_hosts()
        if kind == "plan" and gone:
            # a node died while we planned: this plan is already stale
            self.request_replan(f"hosts {sorted(gone)} lost while planning")
            return
        self.new_epoch(prepared)

    def start_job(self, kind: str, fn: Any, *args: Any) -> None:
        future = self.jobs.submit(fn, *args)
        future.kind = kind  # type: ignore[attr-defined]
        self.job = future

    # -- hosts ---------------------------------------------------------------------------------

    def live_hosts(self) -> set[str]:
        return {h for h, a in self.agents.items()
                if not a.suspected and h not in self.unhealthy
                and any(n.name == h for n in self.instance.nodes)}

    def request_replan(self, reason: str, force: bool = False) -> None:
        if not (self.cfg.replan or force):
            self.events.emit("replan.disabled", reason=reason)
            if self.deploying is not None or self.active is None:
                self.failure = f"deployment broken and re-planning is off: {reason}"
            return
        if self.replan_reason is None:
            self.events.emit("replan.requested", reason=reason)
        self.replan_reason = reason

    def host_lost(self, host: str, reason: str) -> None:
        """A host stopped serving: re-plan if it holds a stage we need."""
        for epoch in (self.active, self.deploying):
            if epoch is not None and host in epoch.hosts:
                self.request_replan(f"{host}: {reason}")
                return

    # -- epochs --------------------------------------------------------------------------------

    def reserve_epoch(self) -> int:
        """Epoch numbers are taken when planning starts (a plan found stale leaves a gap)."""
        self.next_epoch += 1
        return self.next_epoch - 1

    def new_epoch(self, prepared: Prepared) -> None:
        number = prepared.epoch
        port = self.cfg.data_port_base + number % self.cfg.data_port_span
        epoch = Epoch(number, self.cfg.version, prepared.plan, prepared.stages,
                      [s.node for s in prepared.plan.stages], port, created=time.monotonic())
        for stage in prepared.stages:
            self.models[stage.sha256] = stage.path
        (prepared.stage_dir / f"plan_epoch_{number}.json").write_text(
            json.dumps(prepared.plan.to_json(), indent=1))
        self.events.emit("plan.computed", epoch=number, reason=prepared.reason,
                         algorithm=prepared.plan.algorithm, live=prepared.live,
                         solve_s=round(prepared.solve_s, 3), split_s=round(prepared.split_s, 3),
                         split_cached=prepared.split_cached, stage_dir=str(prepared.stage_dir),
                         cuts=list(cut_indices(prepared.plan)),
                         predicted_throughput_rps=prepared.plan.predicted_throughput_rps,
                         plan=prepared.plan.to_json())
        if self.deploying is not None:
            self.abandon(self.deploying, f"superseded by epoch {number}")
        self.epochs[number] = epoch
        self.deploying = epoch
        self.waiting_for_nodes = False
        self.maybe_deploy(epoch)

    def maybe_deploy(self, epoch: Epoch) -> None:
        if epoch.state != "waiting":
            return
        if any(h not in self.agents for h in epoch.hosts):
            return                  # deployed once every agent of the plan said hello
        epoch.state = "deploying"
        epoch.deployed = time.monotonic()
        for stage in range(len(epoch.stages)):
            self.send_deploy(epoch, stage)

    def address(self, epoch: Epoch, stage: int) -> str:
        if stage >= len(epoch.stages):
            return self.dispatcher.sink_address
        return f"tcp://{self.cfg.hosts[epoch.hosts[stage]]}:{epoch.port}"

    def send_deploy(self, epoch: Epoch, stage: int) -> None:
        host, spec = epoch.hosts[stage], epoch.stages[stage]
        epoch.deploy_sent[stage] = time.monotonic()
        self.send(host, "deploy", epoch=epoch.number, stage=stage, version=epoch.version,
                  sha256=spec.sha256, size=spec.size, port=epoch.port,
                  next=self.address(epoch, stage + 1), inputs=spec.inputs,
                  outputs=spec.outputs)
        self.events.emit("deploy.sent", epoch=epoch.number, stage=stage, host=host,
                         sha256=spec.sha256, port=epoch.port)

    def activate(self, epoch: Epoch) -> None:
        old = self.active
        epoch.state = "active"
        self.active, self.deploying = epoch, None
        replayed = self.dispatcher.switch(Route(epoch.number, epoch.version,
                                                self.address(epoch, 0), epoch.stages[0].inputs))
        self.events.emit("plan.deployed", epoch=epoch.number, version=epoch.version,
                         hosts=epoch.hosts, replayed=replayed,
                         deploy_s=round(time.monotonic() - epoch.deployed, 3),
                         predicted_throughput_rps=epoch.plan.predicted_throughput_rps,
                         plan=epoch.plan.to_json())
        if old is not None:
            self.retire(old, "replaced")

    def retire(self, epoch: Epoch, why: str) -> None:
        epoch.state = "retired"
        for host in set(epoch.hosts):
            self.send(host, "stop", epoch=epoch.number)
        self.events.emit("epoch.retired", epoch=epoch.number, reason=why)

    def abandon(self, epoch: Epoch, why: str) -> None:
        epoch.state = "abandoned"
        if self.deploying is epoch:
            self.deploying = None
        for host in set(epoch.hosts):
            self.send(host, "stop", epoch=epoch.number)
        self.events.emit("epoch.abandoned", epoch=epoch.number, reason=why)

    # -- agents --------------------------------------------------------------------------------

    def send(self, host: str, kind: str, blob: bytes | None = None, **fields: Any) -> None:
        try:
            self.router.send_multipart([host.encode(), *encode_control(kind, blob, **fields)],
                                       flags=zmq.NOBLOCK)
        except zmq.Again:
            self.log.warning("control queue to %s full; %s dropped", host, kind)

    def on_router(self, budget: int = 256) -> None:
        for _ in range(budget):
            try:
                parts = self.router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            host = parts[0].bytes.decode("utf-8", "replace")
            try:
                msg = decode_control(parts[1:])
            except FrameError as exc:
                self.log.warning("bad control message from %s dropped: %s", host[:64], exc)
                continue
            if host not in self.cfg.hosts:
                self.log.warning("message from unknown agent %r ignored", host[:64])
                continue
            if msg.type in ("hello", "heartbeat") and msg["host"] != host:
                self.log.warning("agent %s claims to be %s; ignored", host, msg["host"])
                continue
            handler = {"hello": self.on_hello, "heartbeat": self.on_heartbeat,
                       "fetch": self.on_fetch, "worker": self.on_worker}.get(msg.type)
            if handler is None:
                self.log.warning("unexpected %s from %s ignored", msg.type, host)
            else:
                handler(host, msg.fields)

    def on_hello(self, host: str, f: dict[str, Any]) -> None:
        now = time.monotonic()
        old = self.agents.get(host)
        # pid 0: first heard of by a heartbeat, so its pid is not known yet
        restarted = old is not None and old.pid not in (0, f["pid"])
        self.agents[host] = AgentInfo(host, f["pid"], now)
        if f.get("ip") and f["ip"] != self.cfg.hosts[host]:
            self.log.warning("agent %s says its IP is %s, config says %s", host, f["ip"],
                             self.cfg.hosts[host])
        self.events.emit("agent.restarted" if restarted else "agent.hello", host=host,
                         pid=f["pid"])
        if restarted:
            # its workers died with it; a fresh agent is given another chance
            self.unhealthy.discard(host)
        self.node_back(host)
        for epoch in (self.deploying,):
            if epoch is not None:
                self.maybe_deploy(epoch)

    def node_back(self, host: str) -> None:
        if self.waiting_for_nodes and host in self.live_hosts():
            self.request_replan(f"{host} available")

    def on_heartbeat(self, host: str, f: dict[str, Any]) -> None:
        now = time.monotonic()
        agent = self.agents.get(host)
        if agent is None:
            # we missed (or restarted before) its hello: a heartbeat is as good
            self.on_hello(host, {"pid": 0})
            agent = self.agents[host]
        if agent.suspected:
            agent.suspected = False
            self.events.emit("node.returned", host=host,
                             silent_ms=round(1000 * (now - agent.last_seen)))
            # issue 4 adds the rejoin policy (hold time, margin); for now a returned node is
            # used again only when a plan is needed anyway
            self.node_back(host)
        agent.last_seen = now
        reported = {(w["epoch"], w["stage"]): w["state"] for w in f["workers"]}
        for epoch in (self.active, self.deploying):
            if epoch is None or epoch.state not in ("deploying", "active"):
                continue
            stage = epoch.stage_of(host)
            if stage is None:
                continue
            state = reported.get((epoch.number, stage))
            if state is None:
                if now - epoch.deploy_sent.get(stage, 0.0) > max(1.0, 3 * self.heartbeat_s):
                    self.log.info("agent %s lacks e%d/s%d: deploying again", host,
                                  epoch.number, stage)
                    self.send_deploy(epoch, stage)
            elif state != epoch.workers.get(stage) and state in ("ready", "failed", "exited"):
                # a lost `worker` message, repaired from the heartbeat
                self.on_worker(host, {"epoch": epoch.number, "stage": stage, "state": state,
                                      "detail": "from heartbeat"})
        live = {e.number for e in (self.active, self.deploying) if e is not None}
        for number in {e for e, _ in reported} - live:
            if now - agent.stop_sent.get(number, 0.0) > 1.0:
                agent.stop_sent[number] = now
                self.send(host, "stop", epoch=number)

    def on_fetch(self, host: str, f: dict[str, Any]) -> None:
        sha, offset = f["sha256"], f["offset"]
        path = self.models.get(sha)
        if path is None:
            self.send(host, "chunk", sha256=sha, offset=offset, total=0,
                      error="unknown sha256")
            return
        try:
            total = path.stat().st_size
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read(CHUNK_BYTES)
        except OSError as exc:
            self.send(host, "chunk", sha256=sha, offset=offset, total=0, error=str(exc)[:200])
            return
        if offset > total:
            self.send(host, "chunk", sha256=sha, offset=offset, total=total,
                      error="offset beyond the end")
            return
        self.send(host, "chunk", data, sha256=sha, offset=offset, total=total)
        if offset + len(data) >= total:
            self.events.emit("model.sent", host=host, sha256=sha, bytes=total)

    def on_worker(self, host: str, f: dict[str, Any]) -> None:
        epoch = self.epochs.get(f["epoch"])
        state, stage = f["state"], f["stage"]
        fields = {"host": host, "epoch": f["epoch"], "stage": stage, "detail": f["detail"],
                  "reason": f.get("reason")}
        # a worker we stopped is not news; results.py reads worker.exited as a detection
        self.events.emit("worker.stopped" if f.get("reason") == "stopped" else f"worker.{state}",
                         **fields)
        if f.get("reason") == "corrupt_model" and epoch is not None and stage < len(
                epoch.stages):
            self.events.emit("model.corrupt", host=host, epoch=f["epoch"], stage=stage,
                             sha256=epoch.stages[stage].sha256)
        if epoch is None or epoch.state not in ("deploying", "active"):
            return                      # a stopped epoch winding down
        if epoch.stage_of(host) != stage:
            return
        epoch.workers[stage] = state
        if state == "ready" and epoch.state == "deploying" and all(
                epoch.workers.get(s) == "ready" for s in range(len(epoch.stages))):
            self.events.emit("epoch.ready", epoch=epoch.number,
                             deploy_s=round(time.monotonic() - epoch.deployed, 3))
            self.activate(epoch)
        elif state in ("failed", "exited"):
            self.unhealthy.add(host)
            self.host_lost(host, f"worker {state}: {f['detail'][:200]}")

    # -- periodic work -------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        if self.job is not None and self.job.done():
            self._job_done(self.job)
        limit = self.cfg.suspect_after_missed * self.heartbeat_s
        for agent in self.agents.values():
            silent = now - agent.last_seen
            if not agent.suspected and silent > limit:
                agent.suspected = True
                self.events.emit("node.suspected", host=agent.host,
                                 silent_ms=round(1000 * silent),
                                 missed=int(silent / self.heartbeat_s))
                self.host_lost(agent.host, "suspected (missed heartbeats)")
        epoch = self.deploying
        if epoch is not None and epoch.state == "waiting" and \
                now - epoch.created > self.cfg.hello_timeout_s:
            missing = [h for h in epoch.hosts if h not in self.agents]
            self.events.emit("deploy.timeout", epoch=epoch.number, waiting_for=missing,
                             phase="hello")
            self.unhealthy.update(missing)
            epoch.created = now     # once per timeout period
            self.request_replan(f"no hello from {missing}")
        if epoch is not None and epoch.state == "deploying" and \
                now - epoch.deployed > self.cfg.deploy_timeout_s:
            late = [h for s, h in enumerate(epoch.hosts) if epoch.workers.get(s) != "ready"]
            self.events.emit("deploy.timeout", epoch=epoch.number, waiting_for=late,
                             phase="ready")
            self.unhealthy.update(late)
            epoch.deployed = now
            self.request_replan(f"workers on {late} not ready in time")
        if self.replan_reason is not None and self.job is None:
            reason, self.replan_reason = self.replan_reason, None
            live = self.live_hosts()
            self.log.info("re-planning over %s (%s)", sorted(live), reason)
            self.start_job("plan", self._plan, self.reserve_epoch(), live, reason)

    def write_requests(self) -> None:
        try:
            self.dispatcher.write_csv(self.cfg.run_dir / "requests.csv")
            self.csv_written = True
        except OSError as exc:
            self.log.error("cannot write requests.csv: %s", exc)
            self.csv_written = True       # do not retry every tick

    # -- driver commands -----------------------------------------------------------------------

    def on_command(self, raw: bytes) -> dict[str, Any]:
        try:
            cmd = json.loads(raw)
            if not isinstance(cmd, dict) or not isinstance(cmd.get("cmd"), str):
                raise ValueError("expected {\"cmd\": ...}")
        except ValueError as exc:
            return {"ok": False, "error": f"bad command: {exc}"}
        handler = {"status": self.cmd_status, "start_workload": self.cmd_start_workload,
                   "stop": self.cmd_stop, "replan": self.cmd_replan}.get(cmd["cmd"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd['cmd']!r}"}
        try:
            return handler(cmd)
        except (ValueError, RuntimeError) as exc:
            return {"ok": False, "error": str(exc)}

    def state(self) -> str:
        if self.failure:
            return "failed"
        if self.dispatcher.state != "idle":
            return self.dispatcher.state            # running | draining | done
        if self.active is not None:
            return "ready"
        if self.deploying is not None:
            return "waiting_agents" if self.deploying.state == "waiting" else "deploying"
        return "waiting_nodes" if self.waiting_for_nodes else "planning"

    def cmd_status(self, _cmd: dict[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        epoch = self.active
        shown = epoch or self.deploying
        return {
            "ok": True, "state": self.state(), "reason": self.failure,
            **self.dispatcher.status(),
            "epoch": epoch.number if epoch else None,
            "version": epoch.version if epoch else None,
            "plan": shown.plan.to_json() if shown else None,
            "predicted_throughput_rps": shown.plan.predicted_throughput_rps if shown else None,
            "deploying_epoch": self.deploying.number if self.deploying else None,
            "endpoints": [{"stage": s, "host": h, "address": self.address(epoch, s)}
                          for s, h in enumerate(epoch.hosts)] if epoch else [],
            "nodes": {h: {"seen": h in self.agents,
                          "suspected": bool(self.agents.get(h) and self.agents[h].suspected),
                          "unhealthy": h in self.unhealthy,
                          "silent_ms": round(1000 * (now - self.agents[h].last_seen))
                          if h in self.agents else None}
                      for h in sorted(self.cfg.hosts)},
            "last_event": self.events.last,
        }

    def cmd_start_workload(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.state() != "ready":
            raise RuntimeError(f"not ready to start a workload (state {self.state()})")
        overrides = cmd.get("workload") or {}
        if not isinstance(overrides, dict):
            raise ValueError("workload must be an object")
        base = self.cfg.workload.to_json()
        fixed = [k for k in FIXED_WORKLOAD_FIELDS if k in overrides and overrides[k] != base[k]]
        if fixed:
            raise ValueError(f"{fixed} are fixed by the config (the input pool is built at "
                             f"start)")
        self.dispatcher.start(Workload.from_json({**base, **overrides}))
        return {"ok": True, "state": self.state()}

    def cmd_stop(self, _cmd: dict[str, Any]) -> dict[str, Any]:
        self.running = False
        return {"ok": True}

    def cmd_replan(self, cmd: dict[str, Any]) -> dict[str, Any]:
        exclude = cmd.get("exclude") or []
        if not isinstance(exclude, list) or not all(isinstance(h, str) for h in exclude):
            raise ValueError("exclude must be a list of host names")
        self.unhealthy.update(exclude)
        self.request_replan(f"requested by the driver (exclude {exclude})", force=True)
        return {"ok": True}

    # -- main loop -----------------------------------------------------------------------------

    def run(self) -> None:
        cfg = self.cfg
        self.events.emit("controller.started", host=cfg.host, pid=os.getpid(),
                         control=f"tcp://{cfg.dispatcher_ip}:{cfg.control_port}",
                         sink=self.dispatcher.sink_address, ipc=cfg.control_ipc)
        self.start_job("bootstrap", self._bootstrap)
        while self.running:
            poller = zmq.Poller()
            poller.register(self.router, zmq.POLLIN)
            poller.register(self.rep, zmq.POLLIN)
            poller.register(self.dispatcher.sink, zmq.POLLIN)
            if self.dispatcher.wants_pollout():
                assert self.dispatcher.push is not None
                poller.register(self.dispatcher.push, zmq.POLLOUT)
            wait = min(0.05, self.dispatcher.next_wakeup(time.monotonic()))
            ready = dict(poller.poll(math.ceil(wait * 1000)))
            if self.dispatcher.sink in ready:
                self.dispatcher.on_sink()
            if self.router in ready:
                self.on_router()
            if self.rep in ready:
                try:
                    raw = self.rep.recv(zmq.NOBLOCK)
                except zmq.Again:
                    raw = None
                if raw is not None:
                    self.rep.send(json.dumps(self.on_command(raw), default=str).encode())
            now = time.monotonic()
            self.tick(now)
            self.dispatcher.pump(now)
            if self.dispatcher.state == "done" and not self.csv_written:
                # before any status says "done": the driver may read the file right away
                self.write_requests()
        self.shutdown()

    def shutdown(self) -> None:
        self.dispatcher.stop_issuing(time.monotonic(), drain=False)
        self.dispatcher.finish()
        if self.dispatcher.requests and not self.csv_written:
            self.write_requests()
        for host in self.agents:
            self.send(host, "stop", epoch=-1)
        self.events.emit("controller.stopped", **self.dispatcher.counts())
        time.sleep(0.2)     # let the stop messages leave before the sockets close
        self.jobs.shutdown(wait=False, cancel_futures=True)
        self.dispatcher.close()
        self.router.close(0)
        self.rep.close(0)
        self.ctx.term()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m testbed.controller CONFIG.json", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        cfg = ControllerConfig.load(argv[0])
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger(f"controller[{cfg.host}]")
    try:
        controller = Controller(cfg, log, logging.getLogger(f"dispatcher[{cfg.host}]"))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    def on_signal(signum: int, _frame: Any) -> None:
        controller.running = False

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    controller.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
