"""The controller: `python -m testbed.control.controller CONFIG.json`, on the dispatcher host.

Division of labour (Kubernetes-shaped): the controller is scheduler + controller-manager. It
decides where stages run and when that changes; the heavy work behind a decision (solving,
splitting, hashing, reference outputs) runs in a job thread (testbed.control.planning), the choice
among candidate plans follows testbed.control.policy, model versions come from a repository
directory
(testbed.control.repository). Agents (stage_image.agent) only execute; the dispatcher
(testbed.control.dispatcher, in this process) feeds and checks the pipeline; the driver
(testbed.experiment.driver) is the experimenter and talks to us over a REP socket.

Workers and epochs. A worker is a process on a host, known by (host, data port), holding one
stage model of one version; it serves that stage for one or more epochs (a route each: where
its output goes), or none (a warm standby). Every deployment is an *epoch*: a plan whose
stages are workers. An epoch goes waiting (for its agents' hello) -> deploying (every route
asked for) -> active (all routes confirmed: the dispatcher switches to its stage 0) ->
draining or retired (its routes withdrawn). Reconciliation is level-triggered: every heartbeat
lists each worker of a host with its confirmed routes; what we want and it lacks is asked for
again, what it has and we do not want (a retired epoch's route, a worker we forgot because its
node was lost) is withdrawn. A node that was only cut off therefore never serves a stale
epoch when it comes back: its workers lose the routes of retired epochs (and drop their
frames) as soon as its first heartbeat arrives.

Failures. A host silent for `suspect_after_missed` heartbeat intervals is suspected
(`node.suspected`); a worker dying is reported by its agent at once (`worker.failed`). Its
workers are forgotten, every epoch that used one is broken, and a re-plan starts at once
(after `replan_delay_s` when set: the simulated Kubernetes wait). The re-plan (policy) keeps
surviving workers where the bottleneck allows. To recover in about a second, the controller
prepares for the next failure while all is well: for each node of the active plan it computes
the plan it would move to if that node died (contingency plans, in the background), and
loads the stages those plans would newly need as warm standbys on spare nodes (`prepare`). On
a failure that matches a contingency, the new epoch is all existing workers: a few routes, no
model transfer, no model load. A straggler (a stage of the active epoch computing
`straggler_factor` x slower than planned, and slower than the bottleneck, for
`straggler_after_s`, from the per-second load its agent reports) is handled like a failing
host (`node.straggler`, `node.unhealthy`): the pipeline moves off it, draining rather than
replaying, and it is tried again after the unhealthy back-off. When no plan fits the live
nodes, `plan.infeasible` says why, the controller waits, and tries again whenever a node
becomes usable; nothing blocks. An epoch of pipelines side by side (`planner.pipelines`)
gets no contingency plans: the pipelines a loss leaves whole are the next epoch at once, and
a better plan is looked for afterwards (kept by the rejoin rule below).

Switching. When the old epoch is broken, the dispatcher switches and replays every unanswered
request at once, and the old epoch is retired. When it is healthy (a rejoin, a new model
version), the dispatcher switches and the old epoch drains: its in-flight requests finish
there (results checked against their own version), and what is left after `drain_s` is
replayed before it is retired. Either way no request is lost or answered twice.

Rejoin. A node back from a suspicion, restart or failure is used again only after it has been
stable for `rejoin_hold_s` (a new suspicion restarts the clock), and then only if the plan
with it beats the plan in force by `rejoin_margin` (policy.better_by_margin); otherwise
`rejoin.declined` and it becomes a spare (and may hold a standby). While no plan fits, a node
that returns is tried at once: nothing is running that could flap. A suspected host that
comes back with its workers still running (it was slow, not dead: a small CPU share starves
its agent now and then) keeps them as standbys (`standby.readopted`), so taking it back
loads nothing. Which start of a host's agent is listened to is decided by
testbed.control.admission (an incarnation id per start: a restart is `agent.restarted` even
when the pid repeats, and a message of an earlier start is dropped); an agent's `disk` failure
is `disk.fault` and the host is planned around like a failing one.

Model versions. The controller polls the repository (`repository`, default RUN_DIR/repository)
for new versions; a new one is hashed and its reference outputs computed, then (with
`auto_rollout`) planned and deployed beside the running version and switched to as above.
`{"cmd": "rollback"}` goes back to the version that served before; `{"cmd": "rollout",
"version": N}` to any known version.

CONFIG.json (testbed.control.state.ControllerConfig; unknown fields are refused):
  run_dir, model (ONNX path, version `version`), instance (planner instance JSON path),
  hosts {name: IP}, dispatcher_ip,
  planner {algorithm: "auto", time_limit_s: 2.0, seed: 0},
  workload {see testbed.control.dispatcher.Workload},
  host ("dispatcher"), control_port (18000), sink_port (19000), data_port_base (20000),
  data_port_span (20000; per host), control_ipc ("ipc://RUN_DIR/control.sock"),
  heartbeat_ms (200), suspect_after_missed (3), hello_timeout_s (60), deploy_timeout_s
  (120), replan (true), version (1), plan (plan.json for epoch 1, instead of solving),
  stages_dir (a split matching that plan, instead of splitting),
  reuse_tolerance (0.05), rejoin_hold_s (5.0), rejoin_margin (0.10), standby (true),
  standby_per_node (4), replan_delay_s (0.0), drain_s (5.0), unhealthy_hold_s (10.0),
  straggler_factor (2.0; 0: off), straggler_after_s (2.0),
  repository (RUN_DIR/repository), repository_poll_s (0.5), auto_rollout (true),
  base_reserve_bytes (the initial model's activation reserve, when known), curve_keypair
  (a stage_image.security keypair file: CurveZMQ on; agents then need its public key).

Driver commands (JSON over REQ/REP, every reply has "ok"): {"cmd": "status"},
{"cmd": "start_workload", "workload": {overrides}}, {"cmd": "stop"},
{"cmd": "replan", "exclude": [host, ...]}, {"cmd": "rollback"},
{"cmd": "rollout", "version": N}.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import zmq

from formats.errors import EXIT_BAD_INPUT, InputError
from partitioner.instance import (
    InfeasibleError,
    Plan,
    load_instance,
    pipelines_cost,
    plan_from_json,
    plan_problems,
)
from stage_image.security import KeyPair, apply_server, load_keypair
from stage_image.wire import CHUNK_BYTES, FrameError, decode_control, encode_control
from testbed.control import policy
from testbed.control.admission import RESTARTED, SAME, STALE, Incarnations, incarnation_of
from testbed.control.disk import fits_disk
from testbed.control.dispatcher import (
    Dispatcher,
    Head,
    Route,
    Workload,
    compute_references,
    seeded_pool,
)
from testbed.control.planning import (
    Planner,
    PlanRequest,
    Prepared,
    StageFile,
    VersionInfo,
    cut_indices,
    sha256_file,
    version_instance,
)
from testbed.control.policy import Held
from testbed.control.state import (
    UNHEALTHY_CAP_S,
    AgentInfo,
    ControllerConfig,
    Epoch,
    EventLog,
    Slot,
)

__all__ = ["Controller", "ControllerConfig", "cut_indices", "main"]

FIXED_WORKLOAD_FIELDS = ("seed", "pool_size", "input_dims")  # the pool is built at start


# -- the controller ---------------------------------------------------------------------------

class Controller:
    def __init__(self, cfg: ControllerConfig, log: logging.Logger,
                 dispatch_log: logging.Logger) -> None:
        self.cfg, self.log = cfg, log
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        self.events = EventLog(cfg.run_dir / "events.jsonl", log)
        instance = load_instance(cfg.instance)
        missing = [n.name for n in instance.nodes if n.name not in cfg.hosts]
        if missing:
            raise InputError(f"no IP address for instance nodes {missing}", field="hosts")
        self.nodes = {n.name for n in instance.nodes}
        self.base_instance = instance
        self.versions: dict[int, VersionInfo] = {}
        self.target_version = cfg.version
        self.history: list[int] = []                 # versions in the order they served
        self.last_plan: dict[int, Plan] = {}         # per version: repairs keep its cuts
        from testbed.control.repository import Watcher

        assert cfg.repository is not None
        self.watcher = Watcher(cfg.repository)
        self.next_poll = 0.0
        self.manifests: list[Any] = []               # found, waiting for a version job
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)   # a restarted agent takes its name
        # CurveZMQ (off by default in the embedded backend): the control channel with the
        # driver's keypair (agents get its public key), every worker and the dispatcher
        # with a keypair of their own, generated here and sent over that encrypted channel
        self.curve = load_keypair(cfg.curve_keypair) if cfg.curve_keypair else None
        if self.curve is not None:
            apply_server(self.router, self.curve)
        self.router.bind(f"tcp://{cfg.dispatcher_ip}:{cfg.control_port}")
        self.rep = self.ctx.socket(zmq.REP)
        self.rep.setsockopt(zmq.LINGER, 0)
        self.rep.bind(cfg.control_ipc)
        self.dispatcher = Dispatcher(self.ctx, f"tcp://{cfg.dispatcher_ip}:{cfg.sink_port}",
                                     self.events.emit, dispatch_log,
                                     keys=KeyPair.generate() if self.curve else None)
        self.planner = Planner(cfg.run_dir, cfg.planner.algorithm, cfg.planner.time_limit_s,
                               cfg.planner.seed, cfg.reuse_tolerance, cfg.planner.pipelines,
                               cfg.planner.spare)
        self.agents: dict[str, AgentInfo] = {}
        self.incarnations = Incarnations()      # which start of each host's agent is admitted
        self.slots: dict[tuple[str, int], Slot] = {}
        self.next_port: dict[str, int] = {}
        self.models: dict[str, Path] = {}            # sha256 -> file, served to agents
        self.epochs: dict[int, Epoch] = {}
        self.active: Epoch | None = None
        self.deploying: Epoch | None = None
        self.draining: list[Epoch] = []
        self.next_epoch = 1
        self.jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plan")
        self.job: Future[Any] | None = None
        self.replan_reason: str | None = None
        self.replan_at: float | None = None          # a delayed re-plan (simulated wait)
        self.replan_exclude: set[str] = set()
        self.straggling = False     # the pending re-plan leaves a straggler behind
        self.rejoin_hosts: set[str] = set()          # stable again: is a better plan there?
        self.improve: str | None = None     # running on fewer pipelines: is better possible?
        # the workers of suspected hosts: if a host comes back with them, they are kept
        self.suspended: dict[str, list[Slot]] = {}
        self.contingency: dict[str, Prepared] = {}   # host assumed lost -> plan
        self.contingency_queue: list[str] = []
        self.contingency_for: tuple[int, frozenset[str]] | None = None
        self.waiting_for_nodes = False
        self.infeasible_reason: str | None = None
        self.failure: str | None = None
        self.running = True
        self.csv_written = False
        self.started = time.monotonic()
        self.last_tick = self.started
        self.heartbeat_s = cfg.heartbeat_ms / 1000.0
        self.resend_s = max(1.0, 3 * self.heartbeat_s)

    # -- versions ------------------------------------------------------------------------------

    def _bootstrap(self) -> tuple[Any, Any, VersionInfo]:
        """The input pool and the first version's references (once)."""
        pool = seeded_pool(self.cfg.model, self.cfg.workload)
        info = VersionInfo(self.cfg.version, self.cfg.model, sha256_file(self.cfg.model),
                           self.base_instance, str(self.cfg.model))
        return pool, compute_references(self.cfg.model, pool), info

    def _load_version(self, manifest: Any) -> tuple[VersionInfo, Any]:
        """A published version, checked (SHA-256) and with its references for the pool."""
        actual = sha256_file(manifest.model)
        if actual != manifest.sha256:
            raise InputError(f"model.onnx has SHA-256 {actual[:12]}, the manifest says "
                             f"{manifest.sha256[:12]}", file=manifest.directory)
        instance = version_instance(self.base_instance, manifest, self.cfg.base_reserve_bytes)
        info = VersionInfo(manifest.version, manifest.model, actual, instance, manifest.source)
        return info, compute_references(manifest.model, self.dispatcher.pool)

    def poll_repository(self, now: float) -> None:
        if now < self.next_poll:
            return
        self.next_poll = now + self.cfg.repository_poll_s
        found, problems = self.watcher.poll()
        for problem in problems:
            self.events.emit("version.invalid", reason=str(problem))
        for manifest in found:
            known = self.versions.get(manifest.version)     # the first: the model we started
            if known is not None:
                if known.sha256 != manifest.sha256:
                    self.events.emit("version.invalid", version=manifest.version,
                                     reason="a published version number with other bytes")
                continue
            self.events.emit("version.found", version=manifest.version,
                             sha256=manifest.sha256, source=manifest.source,
                             published=manifest.published)
            self.manifests.append(manifest)

    def version_loaded(self, info: VersionInfo, references: Any) -> None:
        self.versions[info.version] = info
        self.dispatcher.add_version(info.version, references)
        self.events.emit("version.ready", version=info.version, sha256=info.sha256,
                         segments=len(info.instance.segments))
        if self.cfg.auto_rollout and info.version > self.target_version:
            self.set_target(info.version, "new version published")

    def set_target(self, version: int, why: str) -> None:
        self.events.emit("rollout.requested", version=version, previous=self.target_version,
                         reason=why)
        self.target_version = version

    # -- background jobs -----------------------------------------------------------------------

    def start_job(self, kind: str, fn: Any, *args: Any) -> None:
        future = self.jobs.submit(fn, *args)
        future.kind = kind  # type: ignore[attr-defined]
        self.job = future

    def held(self, exclude: set[str] | None = None) -> frozenset[Held]:
        """Loaded workers a plan may re-use: on usable hosts (and not on `exclude`)."""
        return frozenset(s.held for s in self.slots.values()
                         if s.host not in (exclude or set()) and self.usable(s.host))

    def plan_request(self, kind: str, reason: str, live: set[str],
                     excluded: str | None = None) -> PlanRequest:
        version = self.versions[self.target_version]
        base = self.last_plan.get(version.version)
        held = self.held({excluded} if excluded else set())
        avoid: frozenset[str] = frozenset()
        if kind == "rollout":
            # beside the running version, not on top of it, when the bottleneck allows
            avoid = frozenset(s.host for s in self.slots.values() if s.routes)
        if kind == "contingency":
            # new stages where a standby can wait for them: not on nodes that serve (loading
            # a model there would slow the pipeline) nor on spares whose standby places the
            # earlier contingency plans have used up (memory is checked when loading)
            wanted: dict[str, int] = {}
            for slot in self.slots.values():
                if slot.standby:
                    wanted[slot.host] = wanted.get(slot.host, 0) + 1
            for planned in self.contingency.values():
                for stage, file in zip(planned.plan.stages, planned.stages):
                    if file is not None:
                        wanted[stage.node] = wanted.get(stage.node, 0) + 1
            avoid = frozenset({s.host for s in self.slots.values() if s.routes}
                              | {h for h, n in wanted.items()
                                 if n >= self.cfg.standby_per_node})
        return PlanRequest(kind, reason, version, frozenset(live), base, held, avoid,
                           excluded=excluded, generation=self.next_epoch)

    def _job_done(self, future: Future[Any]) -> None:
        kind = getattr(future, "kind", "plan")
        self.job = None
        try:
            result = future.result()
        except (InfeasibleError, InputError) as exc:
            if kind == "version":
                self.events.emit("version.invalid", reason=str(exc))
                return
            if kind == "contingency":
                self.events.emit("contingency.none", reason=str(exc))
                if not self.contingency_queue:
                    self.reconcile_standbys()
                return
            self.infeasible(str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a planner or split bug must not kill us
            self.log.exception("%s job failed", kind)
            self.events.emit("plan.failed", kind=kind, reason=f"{type(exc).__name__}: {exc}")
            if kind in ("bootstrap", "initial") or self.active is None:
                self.failure = f"{kind}: {type(exc).__name__}: {exc}"
            return
        if kind == "bootstrap":
            pool, references, info = result
            self.dispatcher.set_pool(pool)
            self.versions[info.version] = info
            self.dispatcher.add_version(info.version, references)
            self.events.emit("references.ready", version=info.version, pool=len(pool))
            self.start_job("initial", self._initial_plan)
            return
        if kind == "version":
            self.version_loaded(*result)
            return
        prepared: Prepared = result
        if kind == "contingency":
            self.contingency_done(prepared)
            return
        if prepared.request.generation != self.next_epoch and kind != "initial":
            # an epoch was made meanwhile (a contingency plan, used at once): this plan
            # answers a question that is no longer asked
            self.events.emit("plan.stale", reason="superseded by a newer epoch")
            return
        if prepared.request.version.version != self.target_version and kind != "initial":
            self.events.emit("plan.stale", reason="the target version changed meanwhile")
            self.request_replan("target version changed")
            return
        # a host not heard from yet is waited for (epoch "waiting"); a lost one is not
        used_gone = {s.node for s in prepared.plan.stages
                     if s.node in self.agents and not self.usable(s.node)}
        if used_gone:
            # a node died while we planned: this plan is already stale
            self.events.emit("plan.stale", reason=f"hosts {sorted(used_gone)} lost while "
                             f"planning")
            self.request_replan(f"hosts {sorted(used_gone)} lost while planning")
            return
        if kind == "rejoin":
            self.rejoin_done(prepared)
            return
        self.new_epoch(prepared)

    def _initial_plan(self) -> Prepared:
        cfg = self.cfg
        info = self.versions[cfg.version]
        live = frozenset(self.nodes)
        if cfg.plan is None:
            return self.planner.prepare(PlanRequest("initial", "initial", info, live))
        plan = plan_from_json(info.instance, json.loads(cfg.plan.read_text()))
        problems = plan_problems(info.instance, plan.stages, plan.chains)
        if problems:
            raise InfeasibleError(f"the given plan is not valid: {'; '.join(problems)}")
        return self.planner.prepare(PlanRequest("initial", "initial (given)", info, live,
                                                given=plan, given_stages=cfg.stages_dir))

    def infeasible(self, reason: str) -> None:
        live = sorted(self.usable_hosts())
        self.events.emit("plan.infeasible", reason=reason, live=live,
                         version=self.target_version)
        self.waiting_for_nodes = True
        self.infeasible_reason = reason
        if not self.cfg.replan and self.active is None:
            self.failure = f"no plan: {reason}"

    def next_job(self, now: float) -> None:
        """Start the most urgent work: a re-plan after a failure first (a contingency plan
        made for exactly this loss is used at once, even while a job runs), then new
        versions, a rollout, a rejoin check, and last the contingency plans."""
        if not self.dispatcher.pool:
            return
        if self.replan_reason is not None:
            live = self.usable_hosts() - self.replan_exclude
            broken = self.active is None or self.active.broken
            fast = self.precomputed(live) or self.surviving(live) \
                if broken or self.straggling else None
            if fast is not None:
                reason, self.replan_reason, self.replan_exclude = self.replan_reason, None, set()
                self.log.info("re-plan over %s: contingency plan ready", sorted(live))
                fast.request = replace(fast.request, kind="failure" if broken else "straggler",
                                       reason=reason)
                self.straggling = False
                self.new_epoch(fast)
                return
        if self.job is not None:
            return
        if self.replan_reason is not None:
            live = self.usable_hosts() - self.replan_exclude
            reason, self.replan_reason, self.replan_exclude = self.replan_reason, None, set()
            straggling, self.straggling = self.straggling, False
            if self.active is None or self.active.broken:
                kind = "failure"
            elif straggling:
                kind = "straggler"
            elif self.target_version != self.active.version:
                kind = "rollout"
            else:
                kind = "manual"
            self.log.info("re-planning over %s (%s)", sorted(live), reason)
            self.start_job("plan", self.planner.prepare, self.plan_request(kind, reason, live))
            return
        if self.manifests:
            self.start_job("version", self._load_version, self.manifests.pop(0))
            return
        active = self.active
        if active is None or self.deploying is not None:
            return
        if self.target_version != active.version and not self.waiting_for_nodes:
            self.release_standbys(keep_version=self.target_version)
            live = self.usable_hosts()
            self.start_job("plan", self.planner.prepare, self.plan_request(
                "rollout", f"roll out version {self.target_version}", live))
            return
        if active.broken:
            return
        if self.rejoin_hosts or self.improve:
            hosts, self.rejoin_hosts = sorted(self.rejoin_hosts), set()
            reasons = ([f"{', '.join(hosts)} stable again"] if hosts else []) + \
                ([self.improve] if self.improve else [])
            self.improve = None
            self.start_job("rejoin", self.planner.prepare, self.plan_request(
                "rejoin", "; ".join(reasons), self.usable_hosts()))
            return
        self.next_contingency()

    # -- contingency plans and standbys --------------------------------------------------------

    def precomputed(self, live: set[str]) -> Prepared | None:
        """A contingency plan made for exactly this set of live nodes, if its workers are
        still there."""
        for prepared in self.contingency.values():
            if set(prepared.request.live) != live or \
                    prepared.request.version.version != self.target_version:
                continue
            held = self.held()
            version = prepared.request.version.version
            if all(f is not None or policy.stage_key(s, version) in held
                   for s, f in zip(prepared.plan.stages, prepared.stages)):
                prepared.precomputed = True
                return prepared
        return None

    def surviving(self, live: set[str]) -> Prepared | None:
        """Pipelines side by side of which some lost a node: the others, as a plan ready at
        once (every worker is loaded and serving). It stands in for the contingency plans
        such epochs do not get; a better plan is looked for after it is deployed."""
        active = self.active
        if active is None or not active.plan.chains or active.version != self.target_version:
            return None
        kept = [p for p in active.plan.pipelines if all(s.node in live for s in p)]
        if not kept or len(kept) == len(active.plan.chains):
            return None
        version = self.versions[active.version]
        stages = [s for p in kept for s in p]
        plan = Plan.of(version.instance, stages, f"{active.plan.algorithm}-survivors", False,
                       chains=tuple(len(p) for p in kept))
        request = PlanRequest("failure", "the surviving pipelines", version, frozenset(live),
                              active.plan, self.held(), generation=self.next_epoch)
        self.improve = f"{len(kept)} of {len(active.plan.chains)} pipelines left"
        return Prepared(request, plan, [None] * len(stages), None, precomputed=True)

    def next_contingency(self) -> None:
        active = self.active
        # pipelines side by side need none: the surviving ones are the plan for any loss
        if not (self.cfg.standby and self.cfg.replan) or active is None or \
                active.state != "active" or active.plan.chains:
            return
        live = frozenset(self.usable_hosts())
        key = (active.number, live)
        if self.contingency_for != key:
            # the plan in force or the live nodes changed: plan every single loss again
            self.contingency_for = key
            self.contingency = {}
            self.contingency_queue = [h for h in active.hosts if h in live]
        if not self.contingency_queue:
            return
        host = self.contingency_queue.pop(0)
        self.start_job("contingency", self.planner.prepare, self.plan_request(
            "contingency", f"if {host} is lost", set(live) - {host}, excluded=host))

    def contingency_done(self, prepared: Prepared) -> None:
        host = prepared.request.excluded
        active = self.active
        if host is None or active is None or self.contingency_for != (
                active.number, frozenset(self.usable_hosts())):
            return                          # computed for a state that is gone
        self.contingency[host] = prepared
        if not self.contingency_queue:
            self.reconcile_standbys()

    def reconcile_standbys(self) -> None:
        """Load what the contingency plans would newly need as standbys (at most
        `standby_per_node` per node, and only where it fits); release standbys no plan
        needs any more."""
        needed: dict[Held, tuple[Prepared, Any, StageFile]] = {}
        kept: set[Held] = set()            # every stage of every contingency plan
        for prepared in self.contingency.values():
            version = prepared.request.version.version
            for stage, file in zip(prepared.plan.stages, prepared.stages):
                key = policy.stage_key(stage, version)
                kept.add(key)
                if file is not None:
                    needed.setdefault(key, (prepared, stage, file))
        for slot in list(self.slots.values()):
            if slot.standby and not slot.routes and slot.held not in kept:
                self.release(slot, "no contingency plan needs it")
        held = {s.held for s in self.slots.values()}
        serving = {s.host for s in self.slots.values() if s.routes}
        per_node: dict[str, int] = {}
        for slot in self.slots.values():
            if slot.standby:
                per_node[slot.host] = per_node.get(slot.host, 0) + 1
        # spare nodes first; then serving ones where memory and disk allow: loading a model
        # there takes CPU from the stage it serves for a few seconds, once, and saves the
        # load (4-7 s of deploy) when the loss comes, which is what makes a plan that uses
        # every host recover without a spare (docs/architecture.md, "Recovery")
        for key, (prepared, stage, file) in sorted(
                needed.items(), key=lambda item: (item[0].node in serving, item[0].node)):
            if key in held or per_node.get(key.node, 0) >= self.cfg.standby_per_node or \
                    not self.fits(key.node, prepared, stage, file):
                continue
            per_node[key.node] = per_node.get(key.node, 0) + 1
            slot = self.new_slot(key.node, key.version, key.first, key.end, file, standby=True)
            self.send_prepare(slot)
            self.events.emit("standby.prepared", host=slot.host, port=slot.port,
                             version=slot.version, segments=[slot.first, slot.end],
                             sha256=file.sha256, serving=key.node in serving)
        self.events.emit("contingency.ready", epoch=self.active.number if self.active else None,
                         plans={h: {"hosts": [s.node for s in p.plan.stages],
                                    "bottleneck_ms": round(p.plan.bottleneck_ms, 3),
                                    "new_stages": sum(f is not None for f in p.stages)}
                                for h, p in self.contingency.items()},
                         standbys=sorted(f"{s.host}:{s.port}" for s in self.slots.values()
                                         if s.standby))

    def fits(self, host: str, prepared: Prepared, stage: Any,
             file: StageFile | None = None) -> bool:
        """Room for one more worker on `host`: the instance's node memory assumes one stage
        per host, so a second worker also pays the worker runtime allowance; and its model
        file on the host's disk beside the ones its workers hold (testbed.control.disk)."""
        from partitioner.profile import SESSION_OVERHEAD_BYTES, WORKER_RSS_BYTES

        instance = prepared.request.version.instance
        try:
            budget = instance.node(host).memory_bytes
        except KeyError:
            return False
        if file is not None and not fits_disk(
                instance.node(host).disk_bytes,
                [(s.stage.sha256, s.stage.size) for s in self.slots.values() if s.host == host],
                (file.sha256, file.size)):
            return False
        segments = instance.segments
        need = sum(s.memory_bytes for s in segments[stage.first:stage.end])
        for slot in self.slots.values():
            if slot.host == host:
                need += WORKER_RSS_BYTES + SESSION_OVERHEAD_BYTES + sum(
                    s.memory_bytes for s in self.versions[slot.version].instance.segments[
                        slot.first:slot.end])
        return need <= budget

    def release_standbys(self, keep_version: int | None = None) -> None:
        for slot in list(self.slots.values()):
            if slot.standby and not slot.routes and slot.version != keep_version:
                self.release(slot, "rollout: room for the new version")
        self.contingency, self.contingency_queue, self.contingency_for = {}, [], None

    # -- hosts ---------------------------------------------------------------------------------

    def usable(self, host: str, now: float | None = None) -> bool:
        """May plans use this host now? Seen, not suspected, not failing, and (when it came
        back) stable for the hold time, unless nothing runs at all."""
        agent = self.agents.get(host)
        if agent is None or agent.suspected or host not in self.nodes:
            return False
        now = time.monotonic() if now is None else now
        if now < agent.unhealthy_until:
            return False
        if agent.returned is not None and (self.active is not None and not self.waiting_for_nodes):
            return False
        return True

    def usable_hosts(self) -> set[str]:
        now = time.monotonic()
        return {h for h in self.agents if self.usable(h, now)}

    def request_replan(self, reason: str, force: bool = False) -> None:
        if not (self.cfg.replan or force):
            self.events.emit("replan.disabled", reason=reason)
            if self.deploying is not None or self.active is None or self.active.broken:
                self.failure = f"deployment broken and re-planning is off: {reason}"
            return
        if self.replan_reason is None:
            self.events.emit("replan.requested", reason=reason)
        self.replan_reason = reason

    def host_lost(self, host: str, reason: str, suspected: bool) -> None:
        """Forget every worker of `host`; re-plan if an epoch we need used one. A suspected
        host's workers are remembered, in case it is back with them (`readopt`)."""
        if suspected:
            self.suspended[host] = [s for s in self.slots.values() if s.host == host]
        needed = False
        for slot in [s for s in self.slots.values() if s.host == host]:
            needed |= self.slot_lost(slot)
        if not needed:
            return
        if suspected and self.cfg.replan_delay_s > 0:
            self.replan_at = time.monotonic() + self.cfg.replan_delay_s
            self.events.emit("replan.delayed", host=host, delay_s=self.cfg.replan_delay_s,
                             reason=f"{host}: {reason}")
            return
        self.request_replan(f"{host}: {reason}")

    def slot_lost(self, slot: Slot) -> bool:
        """Forget a worker; True when the active or deploying epoch used it."""
        self.slots.pop((slot.host, slot.port), None)
        for epoch in self.draining:
            if slot in epoch.slots:
                epoch.broken = True     # ends its drain: what it holds is replayed now
        needed = False
        for epoch in (self.active, self.deploying):
            if epoch is not None and slot in epoch.slots:
                epoch.broken = True
                needed = True
        return needed

    def check_straggler(self, slot: Slot, load: list[Any] | None, now: float) -> None:
        """A stage of the active epoch whose frames take `straggler_factor` x the planned
        compute time, and longer than the plan's bottleneck, for `straggler_after_s` (a noisy
        neighbour, a throttled CPU) makes its host unhealthy, like a failing one: the
        pipeline moves off it (a contingency plan, so at once where a standby waits) and it
        is tried again after the unhealthy back-off. Not judged while a model loads on the
        host (that takes its CPU for a while) or in a second without frames (no evidence)."""
        active = self.active
        if self.cfg.straggler_factor <= 0 or load is None or active is None or \
                active.state != "active" or active.number not in slot.routes or \
                any(s.host == slot.host and s.state != "ready" for s in self.slots.values()):
            slot.slow_since = None
            return
        frames, observed_ms = load
        if frames == 0:
            return
        stage = slot.routes[active.number]
        planned_ms = active.compute_ms[stage]
        # a slow stage that still keeps up with its pipeline's pace costs no throughput (each
        # of R pipelines side by side gets every R-th request)
        pace_ms = active.plan.bottleneck_ms * max(1, len(active.plan.chains))
        if observed_ms < max(self.cfg.straggler_factor * planned_ms, pace_ms):
            slot.slow_since = None
            return
        if slot.slow_since is None:
            slot.slow_since = now
        if now - slot.slow_since < self.cfg.straggler_after_s:
            return
        slot.slow_since = None
        self.events.emit("node.straggler", host=slot.host, epoch=active.number, stage=stage,
                         compute_ms=round(observed_ms, 3), planned_ms=round(planned_ms, 3),
                         factor=round(observed_ms / planned_ms, 2))
        self.mark_unhealthy(slot.host, f"straggler: stage {stage} at {observed_ms:.0f} ms a "
                                       f"frame, {planned_ms:.0f} ms planned")
        self.straggling = True
        self.request_replan(f"{slot.host}: straggler")

    def mark_unhealthy(self, host: str, why: str) -> None:
        agent = self.agents.get(host)
        if agent is None:
            return
        agent.failures += 1
        hold = min(UNHEALTHY_CAP_S, self.cfg.unhealthy_hold_s * 2 ** (agent.failures - 1))
        agent.unhealthy_until = time.monotonic() + hold
        agent.returned = None
        self.events.emit("node.unhealthy", host=host, reason=why, hold_s=round(hold, 3),
                         failures=agent.failures)

    def check_hosts(self, now: float) -> None:
        """Suspicions (missed heartbeats), and hosts whose hold or back-off just ended."""
        limit = self.cfg.suspect_after_missed * self.heartbeat_s
        for agent in self.agents.values():
            silent = now - agent.last_seen
            if not agent.suspected and silent > limit:
                agent.suspected = True
                agent.returned = None
                self.events.emit("node.suspected", host=agent.host,
                                 silent_ms=round(1000 * silent),
                                 missed=int(silent / self.heartbeat_s))
                self.host_lost(agent.host, "suspected (missed heartbeats)", suspected=True)
            if agent.suspected:
                continue
            if agent.returned is not None and now - agent.returned >= self.cfg.rejoin_hold_s:
                agent.returned = None
                self.events.emit("node.stable", host=agent.host,
                                 held_s=self.cfg.rejoin_hold_s)
                self.host_usable(agent.host)
            if agent.unhealthy_until and now >= agent.unhealthy_until:
                agent.unhealthy_until = 0.0
                self.events.emit("node.healthy", host=agent.host, failures=agent.failures)
                self.host_usable(agent.host)

    def host_usable(self, host: str) -> None:
        """A host became usable again: plan with it if nothing fits without it, else see
        whether it makes a better plan."""
        if self.waiting_for_nodes or self.active is None or self.active.broken:
            if self.active is not None or self.waiting_for_nodes:
                self.request_replan(f"{host} available")
        else:
            self.rejoin_hosts.add(host)

    def rejoin_done(self, prepared: Prepared) -> None:
        active = self.active
        if active is None or active.broken or self.deploying is not None:
            return
        current = active.plan
        if policy.same_placement(prepared.plan, current) or not policy.better_by_margin(
                prepared.plan, current, self.cfg.rejoin_margin):
            self.events.emit("rejoin.declined", reason=prepared.request.reason,
                             current_bottleneck_ms=round(current.bottleneck_ms, 3),
                             candidate_bottleneck_ms=round(prepared.plan.bottleneck_ms, 3),
                             margin=self.cfg.rejoin_margin)
            return
        self.events.emit("rejoin.accepted", reason=prepared.request.reason,
                         current_bottleneck_ms=round(current.bottleneck_ms, 3),
                         candidate_bottleneck_ms=round(prepared.plan.bottleneck_ms, 3),
                         margin=self.cfg.rejoin_margin)
        self.new_epoch(prepared)

    # -- workers -------------------------------------------------------------------------------

    def new_slot(self, host: str, version: int, first: int, end: int, stage: StageFile,
                 standby: bool = False) -> Slot:
        slot = Slot(host, self.allocate_port(host), version, first, end, stage, standby,
                    keys=KeyPair.generate() if self.curve else None)
        self.slots[(host, slot.port)] = slot
        self.models[stage.sha256] = stage.path
        return slot

    def allocate_port(self, host: str) -> int:
        """Ports rotate through the span per host, skipping ports in use (ours or reported),
        so a port is not handed out again while a worker released from it may still run."""
        span, base = self.cfg.data_port_span, self.cfg.data_port_base
        agent = self.agents.get(host)
        busy = {p for (h, p) in self.slots if h == host} | (agent.reported if agent else set())
        start = self.next_port.get(host, 0)
        for i in range(span):
            port = base + (start + i) % span
            if port not in busy:
                self.next_port[host] = (start + i + 1) % span
                return port
        raise InfeasibleError(f"no free data port on {host} (span {span})")

    def send_prepare(self, slot: Slot) -> None:
        slot.sent[0] = time.monotonic()
        f = slot.stage
        curve = {"curve": {"secret": slot.keys.secret.decode()}} if slot.keys else {}
        self.send(slot.host, "prepare", version=slot.version, sha256=f.sha256, size=f.size,
                  port=slot.port, inputs=f.inputs, outputs=f.outputs, **curve)

    def send_route(self, slot: Slot, epoch: Epoch) -> None:
        stage = slot.routes[epoch.number]
        slot.sent[epoch.number] = time.monotonic()
        f = slot.stage
        after = epoch.plan.next_stage(stage)
        curve = {}
        if slot.keys is not None:
            curve = {"curve": {"secret": slot.keys.secret.decode(),
                               "next_public": self.public(epoch, after)}}
        self.send(slot.host, "deploy", epoch=epoch.number, stage=stage, version=slot.version,
                  sha256=f.sha256, size=f.size, port=slot.port,
                  next=self.address(epoch, after), inputs=f.inputs, outputs=f.outputs,
                  **curve)

    def public(self, epoch: Epoch, stage: int | None) -> str:
        """CurveZMQ public key of a stage's worker (None, after a pipeline's last: the
        sink's)."""
        keys = self.dispatcher.keys if stage is None else epoch.slots[stage].keys
        assert keys is not None
        return keys.public.decode()

    def release(self, slot: Slot, why: str) -> None:
        self.slots.pop((slot.host, slot.port), None)
        self.send(slot.host, "release", port=slot.port)
        if slot.standby:
            self.events.emit("standby.released", host=slot.host, port=slot.port, reason=why)

    # -- epochs --------------------------------------------------------------------------------

    def new_epoch(self, prepared: Prepared) -> None:
        version = prepared.request.version.version
        slots: list[Slot] = []
        fresh: list[Slot] = []
        taken: set[tuple[str, int]] = set()
        for stage, file in zip(prepared.plan.stages, prepared.stages):
            key = policy.stage_key(stage, version)
            # a loaded worker for these segments (serving, or a standby) is used first
            slot = next((s for s in self.slots.values()
                         if s.held == key and (s.host, s.port) not in taken), None)
            if slot is None:
                if file is None:
                    self.events.emit("plan.stale", reason=f"the worker for segments "
                                     f"{[stage.first, stage.end]} on {stage.node} is gone")
                    self.request_replan("a worker to re-use is gone")
                    return
                slot = self.new_slot(stage.node, version, stage.first, stage.end, file)
                fresh.append(slot)
            taken.add((slot.host, slot.port))
            slots.append(slot)
        if self.active is not None and self.active.broken:
            # the broken epoch can serve nothing more: its workers the new epoch does not
            # re-use go now, not at the switch, so a new stage on the same host has the
            # memory (two workers on a small host were OOM-killed under churn)
            hosts = {s.host for s in fresh}
            for old in self.active.slots:
                if old.host in hosts and (old.host, old.port) not in taken and \
                        self.slots.get((old.host, old.port)) is old:
                    self.release(old, "broken epoch: room for the new epoch")
        number = self.next_epoch
        self.next_epoch += 1
        prepared.epoch = number
        reused = len(slots) - len(fresh)
        epoch = Epoch(number, version, prepared.plan, slots, prepared.request.kind,
                      created=time.monotonic(), reused=reused,
                      compute_ms=pipelines_cost(prepared.request.version.instance,
                                                prepared.plan.pipelines)[2].compute_ms)
        for i, slot in enumerate(slots):
            slot.routes[number] = i
            slot.standby = False          # it serves now; its standby role is over
        self.events.emit("plan.computed", epoch=number, reused_stages=reused,
                         **prepared.summary(), plan=prepared.plan.to_json())
        superseded, self.deploying = self.deploying, epoch
        self.epochs[number] = epoch
        self.waiting_for_nodes = False
        self.infeasible_reason = None
        self.last_plan[version] = prepared.plan
        # the new routes go out before the superseded epoch's are withdrawn: a worker both
        # use must never find itself without a route (its agent would stop it)
        self.maybe_deploy(epoch)
        if superseded is not None:
            self.abandon(superseded, f"superseded by epoch {number}")

    def maybe_deploy(self, epoch: Epoch) -> None:
        if epoch.state != "waiting":
            return
        if any(h not in self.agents for h in epoch.hosts):
            return                  # deployed once every agent of the plan said hello
        epoch.state = "deploying"
        epoch.deployed = time.monotonic()
        for slot in epoch.slots:
            self.send_route(slot, epoch)
            self.events.emit("deploy.sent", epoch=epoch.number, stage=slot.routes[epoch.number],
                             host=slot.host, port=slot.port, sha256=slot.stage.sha256,
                             loaded=slot.state == "ready")
        self.maybe_activate(epoch)

    def address(self, epoch: Epoch, stage: int | None) -> str:
        if stage is None:
            return self.dispatcher.sink_address
        slot = epoch.slots[stage]
        return f"tcp://{self.cfg.hosts[slot.host]}:{slot.port}"

    def maybe_activate(self, epoch: Epoch) -> None:
        if epoch is self.deploying and epoch.state == "deploying" and not epoch.broken and \
                epoch.ready():
            self.events.emit("epoch.ready", epoch=epoch.number,
                             deploy_s=round(time.monotonic() - epoch.deployed, 3))
            self.activate(epoch)

    def activate(self, epoch: Epoch) -> None:
        old = self.active
        # a broken pipeline has lost requests: replay now; a healthy one finishes its own
        handover = old is not None and not old.broken
        epoch.state = "active"
        self.active, self.deploying = epoch, None
        replayed = self.dispatcher.switch(
            Route(epoch.number, epoch.version,
                  [Head(self.address(epoch, i), self.public(epoch, i) if self.curve else None)
                   for i in epoch.plan.heads],
                  epoch.slots[0].stage.inputs), replay=not handover)
        self.events.emit("plan.deployed", epoch=epoch.number, version=epoch.version,
                         kind=epoch.kind, hosts=epoch.hosts, replayed=replayed,
                         handover=handover,
                         reused_stages=epoch.reused,
                         deploy_s=round(time.monotonic() - epoch.deployed, 3),
                         predicted_throughput_rps=epoch.plan.predicted_throughput_rps,
                         plan=epoch.plan.to_json())
        if not self.history or self.history[-1] != epoch.version:
            if self.history:
                self.events.emit("version.switched", version=epoch.version,
                                 previous=self.history[-1], epoch=epoch.number)
            self.history.append(epoch.version)
        if old is not None:
            if handover:
                old.state = "draining"
                old.drain_until = time.monotonic() + self.cfg.drain_s
                self.draining.append(old)
                self.events.emit("epoch.draining", epoch=old.number,
                                 in_flight=self.dispatcher.in_flight_on(old.number))
            else:
                self.retire(old, "replaced")

    def check_draining(self, now: float) -> None:
        for epoch in list(self.draining):
            left = self.dispatcher.in_flight_on(epoch.number)
            if left and now < epoch.drain_until and not epoch.broken:
                continue
            self.draining.remove(epoch)
            if left:
                self.dispatcher.replay_epochs({epoch.number}, "drain")
            self.retire(epoch, "drained" if not left else f"drain ended with {left} replayed")

    def retire(self, epoch: Epoch, why: str) -> None:
        self.withdraw(epoch, "retired")
        self.dispatcher.retire(epoch.number)
        self.events.emit("epoch.retired", epoch=epoch.number, reason=why)

    def abandon(self, epoch: Epoch, why: str) -> None:
        if self.deploying is epoch:
            self.deploying = None
        self.withdraw(epoch, "abandoned")
        self.events.emit("epoch.abandoned", epoch=epoch.number, reason=why)

    def withdraw(self, epoch: Epoch, state: str) -> None:
        """Take the epoch's routes away; a worker left serving nothing is released."""
        epoch.state = state
        for host in set(epoch.hosts):
            # not to a suspected host: if it comes back, its workers should still be up
            # to be taken back (`readopt`); it is told to stop when it heartbeats again
            if host in self.agents and not self.agents[host].suspected:
                self.send(host, "stop", epoch=epoch.number)
        for slot in epoch.slots:
            slot.routes.pop(epoch.number, None)
            slot.confirmed.discard(epoch.number)
            if not slot.routes and not slot.standby and \
                    self.slots.get((slot.host, slot.port)) is slot:
                # the agent ends it on its own (no route, no standby); forget it here
                del self.slots[(slot.host, slot.port)]

    # -- agents --------------------------------------------------------------------------------

    def send(self, host: str, kind: str, blob: bytes | None = None, **fields: Any) -> None:
        try:
            self.router.send_multipart([host.encode(), *encode_control(kind, blob, **fields)],
                                       flags=zmq.NOBLOCK)
        except zmq.Again:
            self.log.warning("control queue to %s full; %s dropped", host, kind)
        except zmq.ZMQError as exc:
            # ROUTER_MANDATORY is off: an unknown peer is silently dropped; anything else
            # is logged and repaired by the next heartbeat's reconciliation
            self.log.warning("cannot send %s to %s: %s", kind, host, exc)

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
        verdict = self.incarnations.admit(host, incarnation_of(f))
        if verdict == STALE:
            self.events.emit("agent.stale", host=host, incarnation=incarnation_of(f))
            return
        if verdict == SAME:
            if old is not None and old.pid == 0:
                old.pid = f["pid"]      # first heard of by a heartbeat: now its pid is known
            return
        restarted = verdict == RESTARTED and old is not None
        agent = AgentInfo(host, f["pid"], now)
        if old is not None:
            agent.failures, agent.unhealthy_until = old.failures, old.unhealthy_until
        self.agents[host] = agent
        if f.get("ip") and f["ip"] != self.cfg.hosts[host]:
            self.log.warning("agent %s says its IP is %s, config says %s", host, f["ip"],
                             self.cfg.hosts[host])
        self.events.emit("agent.restarted" if restarted else "agent.hello", host=host,
                         pid=f["pid"], incarnation=incarnation_of(f))
        if restarted:
            # its workers died with it; it is back, and held like any returning node
            self.suspended.pop(host, None)
            agent.returned = now
            self.host_lost(host, "agent restarted", suspected=False)
        if self.waiting_for_nodes:
            self.request_replan(f"{host} available")
        if self.deploying is not None:
            self.maybe_deploy(self.deploying)

    def on_heartbeat(self, host: str, f: dict[str, Any]) -> None:
        now = time.monotonic()
        agent = self.agents.get(host)
        if "incarnation" in f:
            verdict = self.incarnations.verdict(host, f["incarnation"])
            if verdict == STALE:
                return                  # queued before its agent restarted
            if verdict != SAME:
                agent = None            # a start whose hello we missed: admitted below
        if agent is None:
            # we missed (or restarted before) its hello: a heartbeat is as good
            self.on_hello(host, {"pid": 0, **({"incarnation": f["incarnation"]}
                                              if "incarnation" in f else {})})
            agent = self.agents[host]
        if agent.suspected:
            agent.suspected = False
            agent.returned = now
            self.events.emit("node.returned", host=host,
                             silent_ms=round(1000 * (now - agent.last_seen)),
                             hold_s=self.cfg.rejoin_hold_s)
            self.readopt(host, f["workers"])
            if self.waiting_for_nodes:
                self.request_replan(f"{host} returned")
        agent.last_seen = now
        self.reconcile(agent, f["workers"], now)

    def readopt(self, host: str, workers: list[dict[str, Any]]) -> None:
        """A suspected host is back (it was slow, not dead): the workers it still runs are
        kept as standbys, so a plan that takes the host back re-uses them instead of loading
        their models again (seconds on a small CPU share)."""
        reported = {w["port"]: w for w in workers}
        for slot in self.suspended.pop(host, []):
            entry = reported.get(slot.port)
            if entry is None or entry["sha256"] != slot.stage.sha256 or \
                    entry["state"] != "ready" or (host, slot.port) in self.slots:
                continue
            slot.routes.clear()
            slot.confirmed.clear()
            slot.standby = True
            self.slots[(host, slot.port)] = slot
            self.send_prepare(slot)
            self.events.emit("standby.readopted", host=host, port=slot.port,
                             version=slot.version, segments=[slot.first, slot.end])

    def reconcile(self, agent: AgentInfo, workers: list[dict[str, Any]], now: float) -> None:
        """Make the host's workers what we want (level-triggered, rate-limited per action)."""
        host = agent.host
        reported = {w["port"]: w for w in workers}
        agent.reported = set(reported)
        for slot in [s for s in self.slots.values() if s.host == host]:
            entry = reported.get(slot.port)
            if entry is not None and entry["sha256"] != slot.stage.sha256:
                continue                    # an old worker still on that port; released below
            if entry is not None and entry["state"] in ("failed", "exited"):
                self.on_worker(host, {"port": slot.port, "epoch": 0, "stage": 0,
                                      "state": entry["state"], "detail": "from heartbeat"})
                continue
            confirmed = {e for e, _ in entry["routes"]} if entry is not None else set()
            if entry is not None:
                slot.state = entry["state"]
                self.check_straggler(slot, entry["load"], now)
            slot.confirmed = confirmed & set(slot.routes)
            for number in slot.routes:
                epoch = self.epochs.get(number)
                if epoch is None or epoch.state not in ("deploying", "active", "draining") or \
                        number in confirmed:
                    continue
                if now - slot.sent.get(number, 0.0) > self.resend_s:
                    self.log.info("%s:%d lacks epoch %d: asking again", host, slot.port, number)
                    self.send_route(slot, epoch)
            if not slot.routes and slot.standby and entry is None and \
                    now - slot.sent.get(0, 0.0) > self.resend_s:
                self.send_prepare(slot)
        live_epochs = {e.number for e in (self.active, self.deploying, *self.draining)
                       if e is not None}
        for entry in workers:
            slot = self.slots.get((host, entry["port"]))
            if slot is None or entry["sha256"] != slot.stage.sha256:
                if entry["state"] not in ("failed", "exited"):
                    self.ask(agent, "release", entry["port"], now, port=entry["port"])
                continue
            for number, _stage in entry["routes"]:
                if number not in live_epochs:
                    self.ask(agent, "stop", number, now, epoch=number)
        for epoch in (self.deploying,):
            if epoch is not None:
                self.maybe_activate(epoch)

    def ask(self, agent: AgentInfo, kind: str, key: int, now: float, **fields: Any) -> None:
        if now - agent.asked.get((kind, key), 0.0) > self.resend_s:
            agent.asked[(kind, key)] = now
            self.send(agent.host, kind, **fields)

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
        slot = self.slots.get((host, f["port"]))
        state, reason = f["state"], f.get("reason")
        fields = {"host": host, "port": f["port"], "epoch": f["epoch"], "stage": f["stage"],
                  "detail": f["detail"], "reason": reason}
        if reason == "stopped":
            # a worker we stopped is not news; results.py reads worker.exited as a detection
            self.events.emit("worker.stopped", **fields)
            return
        if reason == "disk" and slot is not None:
            # ENOSPC/EROFS that eviction could not prevent: the host is left out (unhealthy
            # back-off) and the stage planned elsewhere; requests in flight are replayed
            self.events.emit("disk.fault", **fields)
        if reason == "conflict":
            self.events.emit("deploy.conflict", **fields)   # retried from the heartbeats
            return
        if reason == "corrupt_model" and slot is not None:
            self.events.emit("model.corrupt", host=host, port=f["port"],
                             sha256=slot.stage.sha256)
        if state in ("failed", "exited") and slot is None:
            return                      # already handled (one report per route)
        self.events.emit(f"worker.{state}", **fields)
        if slot is None:
            return
        if state == "ready":
            slot.state = "ready"
            if f["epoch"] in slot.routes:
                slot.confirmed.add(f["epoch"])
            epoch = self.epochs.get(f["epoch"])
            if epoch is not None:
                self.maybe_activate(epoch)
        elif state in ("fetching", "starting"):
            slot.state = state
        else:
            self.mark_unhealthy(host, f"worker {state}: {f['detail'][:200]}")
            if self.slot_lost(slot):
                self.request_replan(f"{host}: worker {state}")

    # -- periodic work -------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        stalled = now - self.last_tick
        self.last_tick = now
        if stalled > 2 * self.heartbeat_s:
            # we were not listening: silence during our own stall proves nothing
            for agent in self.agents.values():
                agent.last_seen += stalled
            self.events.emit("controller.stalled", stall_ms=round(1000 * stalled))
        if self.job is not None and self.job.done():
            self._job_done(self.job)
        self.check_hosts(now)
        if self.replan_at is not None and now >= self.replan_at:
            self.replan_at = None
            self.request_replan("the simulated wait is over")
        if self.dispatcher.pool:
            self.poll_repository(now)
        self.check_timeouts(now)
        self.check_draining(now)
        self.next_job(now)

    def check_timeouts(self, now: float) -> None:
        epoch = self.deploying
        if epoch is not None and epoch.state == "waiting" and \
                now - epoch.created > self.cfg.hello_timeout_s:
            missing = [h for h in epoch.hosts if h not in self.agents]
            self.events.emit("deploy.timeout", epoch=epoch.number, waiting_for=missing,
                             phase="hello")
            for host in missing:
                self.mark_unhealthy(host, "no hello")
            epoch.created = now     # once per timeout period
            self.request_replan(f"no hello from {missing}")
        if epoch is not None and epoch.state == "deploying" and \
                now - epoch.deployed > self.cfg.deploy_timeout_s:
            late = [s for s in epoch.slots if epoch.number not in s.confirmed]
            self.events.emit("deploy.timeout", epoch=epoch.number,
                             waiting_for=[s.host for s in late], phase="ready")
            for slot in late:
                self.mark_unhealthy(slot.host, "workers not ready in time")
                self.slot_lost(slot)
                self.send(slot.host, "release", port=slot.port)
            epoch.deployed = now
            self.request_replan(f"workers on {[s.host for s in late]} not ready in time")

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
                   "stop": self.cmd_stop, "replan": self.cmd_replan,
                   "rollback": self.cmd_rollback, "rollout": self.cmd_rollout,
                   }.get(cmd["cmd"])
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
            "target_version": self.target_version,
            "versions": sorted(self.versions),
            "degraded": self.infeasible_reason if self.waiting_for_nodes else (
                "pipeline broken, re-planning" if epoch is not None and epoch.broken else None),
            "plan": shown.plan.to_json() if shown else None,
            "predicted_throughput_rps": shown.plan.predicted_throughput_rps if shown else None,
            "deploying_epoch": self.deploying.number if self.deploying else None,
            "endpoints": [{"stage": s, "host": slot.host, "port": slot.port,
                           "address": self.address(epoch, s)}
                          for s, slot in enumerate(epoch.slots)] if epoch else [],
            "standbys": [{"host": s.host, "port": s.port, "version": s.version,
                          "segments": [s.first, s.end], "state": s.state}
                         for s in self.slots.values() if s.standby],
            "nodes": {h: {"seen": h in self.agents,
                          "suspected": bool(self.agents.get(h) and self.agents[h].suspected),
                          "usable": self.usable(h, now),
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
        self.replan_exclude = set(exclude)
        self.request_replan(f"requested by the driver (exclude {exclude})", force=True)
        return {"ok": True}

    def cmd_rollback(self, _cmd: dict[str, Any]) -> dict[str, Any]:
        serving = self.active.version if self.active else None
        previous = next((v for v in reversed(self.history) if v != serving), None)
        if previous is None:
            raise RuntimeError("no earlier version has served: nothing to roll back to")
        self.events.emit("version.rollback", version=previous, current=serving)
        self.set_target(previous, "rollback")
        return {"ok": True, "version": previous}

    def cmd_rollout(self, cmd: dict[str, Any]) -> dict[str, Any]:
        version = cmd.get("version")
        if version not in self.versions:
            raise ValueError(f"version {version!r} is not known (known: {sorted(self.versions)})")
        self.set_target(version, "requested by the driver")
        return {"ok": True, "version": version}

    # -- main loop -----------------------------------------------------------------------------

    def run(self) -> None:
        cfg = self.cfg
        self.events.emit("controller.started", host=cfg.host, pid=os.getpid(),
                         control=f"tcp://{cfg.dispatcher_ip}:{cfg.control_port}",
                         sink=self.dispatcher.sink_address, ipc=cfg.control_ipc,
                         repository=str(cfg.repository))
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
        print("usage: python -m testbed.control.controller CONFIG.json\n"
              "(the k3s backend's loop is python -m testbed.k8s.loop)", file=sys.stderr)
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
