"""The embedded control plane's decisions, pure: `ControlPlane` is fed what happened (agent
messages, the outcome of background jobs, the driver's commands, the passing of time, each
with an explicit `now`) and answers with actions (`Send` to an agent, `Event` to write,
`StartJob` to run); it opens no socket, reads no clock and touches no file.
testbed.control.controller is the ZeroMQ shell that reads the clock, feeds it and carries
its actions out (module docstring there: workers, epochs, failures, switching, rejoin,
versions).

Division of labour with the core (testbed.control.core): node health, the back-off, the
rejoin hold and margin, stragglers, the pending re-plan and epoch numbers, standby choice
and versions are the core's, shared with the k3s loop; this module composes them with what
only the embedded backend has: workers that serve several epochs, routes confirmed by
heartbeats (level-triggered reconciliation), contingency plans and draining. The dispatcher
(load generator + sink, testbed.control.dispatcher) runs in the same process; the plane
drives it through the narrow `DispatcherPort` (switch, replay, retire), which tests fake.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from formats.errors import InputError
from partitioner.instance import InfeasibleError, Plan, pipelines_cost
from stage_image.security import KeyPair
from testbed.control import events as ev
from testbed.control import policy
from testbed.control.admission import RESTARTED, SAME, STALE, Incarnations, incarnation_of
from testbed.control.auth import upstream_keys
from testbed.control.contingency import Contingencies
from testbed.control.core import reconcile
from testbed.control.core import standby as standby_rule
from testbed.control.core.actions import Event
from testbed.control.core.health import Health, stall_s
from testbed.control.core.records import Epoch, Slot
from testbed.control.core.rejoin import judge
from testbed.control.core.replan import (
    Epochs,
    Replans,
    Request,
    answered,
    failure_kind,
    hold,
    lost_while_planning,
)
from testbed.control.core.straggler import StragglerWatch
from testbed.control.core.versions import Versions
from testbed.control.dispatcher import Head, Route, Workload
from testbed.control.plane_io import Action, DispatcherPort, Send, StartJob
from testbed.control.planning import PlanRequest, Prepared, StageFile, VersionInfo
from testbed.control.policy import Held
from testbed.control.state import ControllerConfig

FIXED_WORKLOAD_FIELDS = ("seed", "pool_size", "input_dims")  # the pool is built at start


# an escape (the outage-escape rule): the epoch it would replace, the hosts back for it
Escape = tuple[int, frozenset[str]]


@dataclass
class AgentLink:
    """What the plane knows of a host's agent beyond its health: the ports of its last
    heartbeat and when it was last asked to stop or release something."""

    reported: set[int] = field(default_factory=set)
    asked: dict[tuple[str, int], float] = field(default_factory=dict)


# -- the plane --------------------------------------------------------------------------------

class ControlPlane:
    def __init__(self, cfg: ControllerConfig, nodes: set[str], dispatcher: DispatcherPort,
                 curve: bool = False,
                 keypair: Callable[[], KeyPair] = KeyPair.generate) -> None:
        self.cfg, self.control = cfg, cfg.control
        self.nodes = nodes
        self.dispatcher = dispatcher
        self.curve, self.keypair = curve, keypair
        self.out: list[Action] = []
        self.now = 0.0
        self.health = Health(cfg.control)
        self.links: dict[str, AgentLink] = {}
        self.incarnations = Incarnations()      # which start of each host's agent is admitted
        self.stragglers = StragglerWatch(cfg.control.straggler_factor,
                                         cfg.control.straggler_after_s)
        self.infos: dict[int, VersionInfo] = {}
        self.versions = Versions(cfg.version, cfg.auto_rollout)
        self.last_plan: dict[int, Plan] = {}         # per version: repairs keep its cuts
        self.manifests: list[Any] = []               # found, waiting for a version job
        self.slots: dict[tuple[str, int], Slot] = {}
        self.next_port: dict[str, int] = {}
        self.models: dict[str, Path] = {}            # sha256 -> file, served to agents
        self.epochs: dict[int, Epoch] = {}
        self.numbers = Epochs()
        self.active: Epoch | None = None
        self.deploying: Epoch | None = None
        self.draining: list[Epoch] = []
        self.job: str | None = None                  # the kind of the running job
        self.replans = Replans()
        self.replan_at: float | None = None          # a delayed re-plan (simulated wait)
        self.replan_exclude: set[str] = set()
        self.straggling = False     # the pending re-plan leaves a straggler behind
        self.rejoin_hosts: set[str] = set()          # stable again: is a better plan there?
        self.improve: str | None = None     # on fewer pipelines or a quick bridge: better?
        # an escape asked for while nothing serves (policy's outage-escape rule): the epoch
        # it would replace and the hosts that came back for it, while the request is
        # pending (`escape`) and while the plan job that answers it runs (`job_escape`)
        self.escape: Escape | None = None
        self.job_escape: Escape | None = None
        # the workers of suspected hosts: if a host comes back with them, they are kept
        self.suspended: dict[str, list[Slot]] = {}
        self.contingency = Contingencies(self)
        self.waiting_for_nodes = False
        self.infeasible_reason: str | None = None
        self.failure: str | None = None
        self.running = True
        self.last_tick: float | None = None

    # -- the plane's outputs -------------------------------------------------------------------

    def emit(self, kind: str, /, **fields: Any) -> None:
        self.out.append(Event(kind, fields))

    def send(self, host: str, kind: str, blob: bytes | None = None, **fields: Any) -> None:
        self.out.append(Send(host, kind, fields, blob))

    def take(self) -> list[Action]:
        """The actions decided since the last call, in order."""
        out, self.out = self.out, []
        return out

    @property
    def target_version(self) -> int:
        return self.versions.target

    # -- versions ------------------------------------------------------------------------------

    def repository(self, found: list[Any], problems: list[Any], now: float) -> None:
        """A poll of the model repository: new manifests and refused entries."""
        self.now = now
        for problem in problems:
            self.emit("version.invalid", reason=str(problem))
        for manifest in found:
            known = self.infos.get(manifest.version)     # the first: the model we started
            if known is not None:
                if known.sha256 != manifest.sha256:
                    self.emit("version.invalid", version=manifest.version,
                              reason="a published version number with other bytes")
                continue
            self.emit(ev.VERSION_FOUND, version=manifest.version, sha256=manifest.sha256,
                      source=manifest.source, published=manifest.published)
            self.manifests.append(manifest)

    def version_loaded(self, info: VersionInfo, references: Any) -> None:
        self.infos[info.version] = info
        self.dispatcher.add_version(info.version, references)
        self.emit("version.ready", version=info.version, sha256=info.sha256,
                  segments=len(info.instance.segments))
        self.out.extend(self.versions.ready(info.version))

    # -- background jobs -----------------------------------------------------------------------

    def start(self) -> None:
        """The first job: the input pool and the first version's reference outputs."""
        self.start_job("bootstrap")

    def start_job(self, kind: str, request: PlanRequest | None = None,
                  manifest: Any = None) -> None:
        self.job = kind
        self.out.append(StartJob(kind, request, manifest))

    def held(self, exclude: set[str] | None = None) -> frozenset[Held]:
        """Loaded workers a plan may re-use: on usable hosts (and not on `exclude`)."""
        return frozenset(s.held for s in self.slots.values()
                         if s.host not in (exclude or set()) and self.usable(s.host))

    def plan_request(self, kind: str, reason: str, live: set[str],
                     excluded: str | None = None,
                     full: frozenset[str] = frozenset()) -> PlanRequest:
        version = self.infos[self.target_version]
        base = self.last_plan.get(version.version)
        held = self.held({excluded} if excluded else set())
        avoid: frozenset[str] = frozenset()
        serving = [s.host for s in self.slots.values() if s.routes]
        if kind == "rollout":
            # beside the running version, not on top of it, when the bottleneck allows
            avoid = frozenset(serving)
        if kind == "contingency":
            # new stages where a standby can wait for them: not on nodes that serve (loading
            # a model there would slow the pipeline) nor on spares whose standby places the
            # earlier contingency plans have used up (memory is checked when loading)
            avoid = standby_rule.contingency_avoid(
                serving, [s.host for s in self.slots.values() if s.standby],
                self.contingency.promised(), self.control.standby_per_node)
        loaded = frozenset(s.held for s in self.slots.values() if s.state == "ready"
                           and s.held in held)
        return PlanRequest(kind, reason, version, frozenset(live), base, held, avoid,
                           excluded=excluded, full=full, generation=self.numbers.next,
                           loaded=loaded)

    def job_done(self, kind: str, result: Any, error: BaseException | None,
                 now: float) -> None:
        """The outcome of a StartJob: its result, or the exception it raised."""
        self.now = now
        self.job = None
        escape = None
        if kind == "plan":
            escape, self.job_escape = self.job_escape, None
        if isinstance(error, (InfeasibleError, InputError)):
            if kind == "version":
                self.emit("version.invalid", reason=str(error))
            elif kind == "contingency":
                self.emit("contingency.none", reason=str(error))
                if not self.contingency.queue:
                    self.contingency.reconcile_standbys()
            else:
                self.infeasible(str(error))
            return
        if error is not None:       # a planner or split bug must not kill us
            self.emit(ev.PLAN_FAILED, kind=kind, reason=f"{type(error).__name__}: {error}")
            if kind in ("bootstrap", "initial") or self.active is None:
                self.failure = f"{kind}: {type(error).__name__}: {error}"
            return
        if kind == "bootstrap":
            pool, references, info = result
            self.dispatcher.set_pool(pool)
            self.infos[info.version] = info
            self.versions.known.add(info.version)
            self.dispatcher.add_version(info.version, references)
            self.emit("references.ready", version=info.version, pool=len(pool))
            self.start_job("initial")
            return
        if kind == "version":
            self.version_loaded(*result)
            return
        prepared: Prepared = result
        if kind == "contingency":
            self.contingency.done(prepared)
            return
        if not self.numbers.current(prepared.request.generation) and kind != "initial":
            # an epoch was made meanwhile (a contingency plan, used at once): this plan
            # answers a question that is no longer asked
            self.emit(ev.PLAN_STALE, reason="superseded by a newer epoch")
            return
        if prepared.request.version.version != self.target_version and kind != "initial":
            self.emit(ev.PLAN_STALE, reason="the target version changed meanwhile")
            # a plan made while a sound epoch deploys answers a request that was not held
            # (no newer epoch was made meanwhile): its continuation is not held either
            self.request_replan("target version changed", touches_deploying=True)
            return
        # a host not heard from yet is waited for (epoch "waiting"); a lost one is not
        gone = [h for h in lost_while_planning(prepared.plan, self.usable_hosts())
                if h in self.health.nodes]
        if gone:
            self.emit(ev.PLAN_STALE, reason=f"hosts {gone} lost while planning")
            self.request_replan(f"hosts {gone} lost while planning", touches_deploying=True)
            return
        if kind == "rejoin":
            self.rejoin_done(prepared)
            return
        if not self.escape_declined(prepared, escape):
            self.new_epoch(prepared)

    def infeasible(self, reason: str) -> None:
        usable = self.usable_hosts()
        self.emit(ev.PLAN_INFEASIBLE, reason=reason, live=sorted(usable),
                  version=self.target_version)
        self.waiting_for_nodes = True
        self.infeasible_reason = reason
        if not self.control.replan and self.active is None:
            self.failure = f"no plan: {reason}"
            return
        # while nothing fits the rejoin hold does not apply (core.rejoin): hosts it kept out
        # are usable now, and are tried at once, not when their hold ends (under churn no
        # node served for seconds while restarted ones sat out their hold)
        held = self.usable_hosts() - usable
        if held:
            self.request_replan(f"{', '.join(sorted(held))} usable while no plan fits",
                                available=frozenset(held))

    def next_job(self) -> None:
        """Start the most urgent work: a re-plan after a failure first (a contingency plan
        made for exactly this loss is used at once, even while a job runs), then new
        versions, a rollout, a rejoin check, and last the contingency plans."""
        if not self.dispatcher.pool:
            return
        pending, deploying = self.replans.pending, self.deploying
        if pending is not None and deploying is not None and \
                answered(pending, deploying.number, not deploying.broken):
            self.replans.take()
            self.escape = None
            self.drop(pending, deploying)
        if self.replans.pending is not None:
            live = self.usable_hosts() - self.replan_exclude
            broken = self.active is None or self.active.broken
            fast = self.contingency.precomputed(live) or self.contingency.surviving(live) \
                if broken or self.straggling else None
            if fast is not None:
                request = self.replans.take()
                assert request is not None
                self.replan_exclude = set()
                fast.request = replace(fast.request, kind="failure" if broken else "straggler",
                                       reason=request.reason)
                self.straggling = False
                escape, self.escape = self.escape, None
                if not self.escape_declined(fast, escape):
                    self.new_epoch(fast)
                return
        if self.job is not None:
            return
        request = self.replans.take()
        if request is not None:
            live = self.usable_hosts() - self.replan_exclude
            self.replan_exclude = set()
            straggling, self.straggling = self.straggling, False
            broken = self.active is None or self.active.broken
            kind = failure_kind(broken, straggling, not broken and self.active is not None
                                and self.target_version != self.active.version)
            self.job_escape, self.escape = self.escape, None
            self.start_job("plan", self.plan_request(kind, request.reason, live))
            return
        if self.manifests:
            self.start_job("version", manifest=self.manifests.pop(0))
            return
        active = self.active
        if active is None or self.deploying is not None:
            return
        if self.target_version != active.version and not self.waiting_for_nodes:
            self.contingency.release_standbys(keep_version=self.target_version)
            self.start_job("plan", self.plan_request(
                "rollout", f"roll out version {self.target_version}", self.usable_hosts()))
            return
        if active.broken:
            return
        if self.rejoin_hosts or self.improve:
            hosts, self.rejoin_hosts = sorted(self.rejoin_hosts), set()
            reasons = ([f"{', '.join(hosts)} stable again"] if hosts else []) + \
                ([self.improve] if self.improve else [])
            self.improve = None
            self.start_job("rejoin", self.plan_request("rejoin", "; ".join(reasons),
                                                       self.usable_hosts()))
            return
        if active.kind == "failure" and \
                self.now < active.activated + self.control.standby_settle_s:
            return          # the new plan refills first: standbys' loads would slow it
        self.contingency.next()

    # -- hosts ---------------------------------------------------------------------------------

    def usable(self, host: str) -> bool:
        """May plans use this host now? (core.health; the rejoin hold applies while
        something runs.)"""
        return host in self.nodes and self.health.usable(
            host, self.now, self.active is not None and not self.waiting_for_nodes)

    def usable_hosts(self) -> set[str]:
        return {h for h in self.health.nodes if self.usable(h)}

    def request_replan(self, reason: str, force: bool = False,
                       touches_deploying: bool = False,
                       available: frozenset[str] = frozenset()) -> None:
        """Ask for a re-plan; held while a sound epoch deploys that the cause does not
        touch (core.replan.hold; a fault that touches it has broken it already, except
        those that say so: `touches_deploying`). `available`: hosts that became usable,
        weighed by the rejoin rule if the request is dropped."""
        if not (self.control.replan or force):
            self.emit("replan.disabled", reason=reason)
            if self.deploying is not None or self.active is None or self.active.broken:
                self.failure = f"deployment broken and re-planning is off: {reason}"
            return
        deploying = self.deploying
        if deploying is not None and hold(not deploying.broken, touches_deploying or force):
            self.drop(Request("failure", reason, hosts=available), deploying)
            return
        self.out.extend(self.replans.want("failure", reason, self.numbers.next, force,
                                          available))

    def drop(self, request: Request, deploying: Epoch) -> None:
        """A re-plan not made: the sound epoch being deployed answers it (core.replan). A
        host that became available is weighed once that epoch serves (rejoin rule)."""
        self.rejoin_hosts |= request.hosts
        self.straggling = False         # the flag belonged to the request
        self.out.extend(self.replans.defer(request.kind, request.reason, deploying.number))

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
        if suspected and self.control.replan_delay_s > 0:
            self.replan_at = self.now + self.control.replan_delay_s
            self.emit("replan.delayed", host=host, delay_s=self.control.replan_delay_s,
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

    def check_straggler(self, slot: Slot, load: list[Any] | None) -> None:
        """core.straggler for a stage of the active epoch; a straggler's host is treated as
        failing: the pipeline moves off it (a contingency plan, so at once where a standby
        waits) and it is tried again after the back-off. Not judged while a model loads on
        the host (that takes its CPU for a while), nor while the epoch is broken or another
        deploys (a re-plan would only supersede the epoch being deployed), nor again during
        its back-off: the move off it is under way (each new flag re-planned and superseded
        the epoch being deployed, so under machine load nothing was ever deployed again)."""
        active = self.active
        key = (slot.host, slot.port)
        if not self.stragglers.enabled or load is None or active is None or \
                active.state != "active" or active.number not in slot.routes or \
                active.broken or self.deploying is not None or \
                not self.usable(slot.host) or \
                any(s.host == slot.host and s.state != "ready" for s in self.slots.values()):
            self.stragglers.reset(key)
            return
        frames, observed_ms = load
        stage = slot.routes[active.number]
        planned_ms = active.compute_ms[stage]
        pace_ms = active.plan.bottleneck_ms * max(1, len(active.plan.chains))
        found = self.stragglers.observe(key, self.now, frames, observed_ms, planned_ms,
                                        pace_ms, [(s.host, s.port) for s in active.slots
                                                  if s is not slot])
        if found is None:
            return
        self.emit(ev.NODE_STRAGGLER, host=slot.host, epoch=active.number, stage=stage,
                  compute_ms=round(observed_ms, 3), planned_ms=round(planned_ms, 3),
                  factor=round(found.factor, 2))
        self.mark_unhealthy(slot.host, f"straggler: stage {stage} at {observed_ms:.0f} ms a "
                                       f"frame, {planned_ms:.0f} ms planned")
        self.straggling = True
        self.request_replan(f"{slot.host}: straggler")

    def mark_unhealthy(self, host: str, why: str) -> None:
        self.out.extend(self.health.fail(host, self.now, why))

    def check_hosts(self) -> None:
        """Suspicions (missed heartbeats), and hosts whose hold or back-off just ended."""
        serving = frozenset(self.active.hosts) if self.active else frozenset()
        for event in self.health.check(self.now, serving):
            self.out.append(event)
            host = event.fields["host"]
            if event.kind == ev.NODE_SUSPECTED:
                self.host_lost(host, "suspected (missed heartbeats)", suspected=True)
            else:                       # node.stable or node.healthy
                self.host_usable(host)

    def host_usable(self, host: str) -> None:
        """A host became usable again: plan with it if nothing fits without it, else see
        whether it makes a better plan."""
        deploying = self.deploying is not None and not self.deploying.broken
        if not deploying and (self.waiting_for_nodes or self.active is None or
                              self.active.broken):
            if self.active is not None or self.waiting_for_nodes:
                self.request_replan(f"{host} available", available=frozenset({host}))
        elif self.outage_left_s() > policy.QUICK_GAIN_S and self.escape is None:
            assert self.deploying is not None
            number = self.deploying.number
            self.escape = (number, frozenset({host}))
            self.request_replan(f"{host} available while nothing serves and epoch {number} "
                                f"needs about {self.outage_left_s():.1f} s more",
                                touches_deploying=True, available=frozenset({host}))
        else:
            # a sound epoch being deployed is let finish: a re-plan now would supersede it,
            # and under churn (a node back every few seconds, deploys of 5-10 s) none ever
            # finished; the host is weighed by the rejoin rule once it serves
            self.rejoin_hosts.add(host)

    def outage_left_s(self) -> float:
        """While nothing serves: how long the sound epoch being deployed still needs by its
        deploy estimate (0 when something serves or nothing deploys)."""
        deploying, active = self.deploying, self.active
        if deploying is None or deploying.broken or (active is not None and not active.broken):
            return 0.0
        return max(0.0, deploying.expected_ready - self.now)

    def escape_declined(self, prepared: Prepared, escape: Escape | None) -> bool:
        """Is this plan an escape (`host_usable`) that would not serve sooner than the epoch
        it was asked to replace (policy.escape_serves_sooner)? Then that epoch finishes, and
        the hosts are weighed by the rejoin rule once it serves. An epoch that broke
        meanwhile needs the plan; one that serves by now does not."""
        if escape is None:
            return False
        number, hosts = escape
        target = self.epochs.get(number)
        if target is None or target.broken:
            return False
        if target is self.deploying and policy.escape_serves_sooner(
                self.outage_left_s(), prepared.deploy_estimate_s):
            return False
        self.rejoin_hosts |= hosts
        self.out.extend(self.replans.defer(
            "failure", f"a plan with {', '.join(sorted(hosts))} would serve in "
            f"{prepared.deploy_estimate_s:.1f} s, not sooner than epoch {number}", number))
        return True

    def rejoin_done(self, prepared: Prepared) -> None:
        active = self.active
        if active is None or active.broken or self.deploying is not None:
            return
        verdict = judge(prepared.plan, active.plan, self.control.rejoin_margin,
                        prepared.request.reason)
        short = self.contingency.no_room(prepared) if verdict.accepted else []
        if short:
            # the epoch in force serves until the new one is ready and drained: a worker
            # loaded beside its workers must fit beside them (else the host runs out)
            verdict = replace(verdict, accepted=False,
                              reason=f"no memory for the hand-over on {', '.join(short)}")
        self.out.append(verdict.event())
        if verdict.accepted:
            self.new_epoch(prepared)

    # -- workers -------------------------------------------------------------------------------

    def new_slot(self, host: str, version: int, first: int, end: int, stage: StageFile,
                 standby: bool = False) -> Slot:
        slot = Slot(host, self.allocate_port(host), version, first, end, stage, standby,
                    keys=self.keypair() if self.curve else None)
        self.slots[(host, slot.port)] = slot
        self.models[stage.sha256] = stage.path
        return slot

    def allocate_port(self, host: str) -> int:
        """Ports rotate through the span per host, skipping ports in use (ours or reported),
        so a port is not handed out again while a worker released from it may still run."""
        span, base = self.cfg.data_port_span, self.cfg.data_port_base
        link = self.links.get(host)
        busy = {p for (h, p) in self.slots if h == host} | (link.reported if link else set())
        start = self.next_port.get(host, 0)
        for i in range(span):
            port = base + (start + i) % span
            if port not in busy:
                self.next_port[host] = (start + i + 1) % span
                return port
        raise InfeasibleError(f"no free data port on {host} (span {span})")

    def send_prepare(self, slot: Slot) -> None:
        slot.sent[0] = self.now
        f = slot.stage
        curve = {"curve": {"secret": slot.keys.secret.decode()}} if slot.keys else {}
        self.send(slot.host, "prepare", version=slot.version, sha256=f.sha256, size=f.size,
                  port=slot.port, inputs=f.inputs, outputs=f.outputs, **curve)

    def send_route(self, slot: Slot, epoch: Epoch) -> None:
        stage = slot.routes[epoch.number]
        slot.sent[epoch.number] = self.now
        f = slot.stage
        after = epoch.plan.next_stage(stage)
        curve = {}
        if slot.keys is not None:
            curve = {"curve": {"secret": slot.keys.secret.decode(),
                               "next_public": self.public(epoch, after),
                               "upstream": upstream_keys(epoch, stage,
                                                         self.public(epoch, None))}}
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
            self.emit("standby.released", host=slot.host, port=slot.port, reason=why)

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
                    self.emit(ev.PLAN_STALE, reason=f"the worker for segments "
                              f"{[stage.first, stage.end]} on {stage.node} is gone")
                    self.request_replan("a worker to re-use is gone",
                                        touches_deploying=True)
                    return
                slot = self.new_slot(stage.node, version, stage.first, stage.end, file)
                fresh.append(slot)
            taken.add((slot.host, slot.port))
            slots.append(slot)
        hosts = sorted({s.host for s in fresh})
        short = [h for h in hosts
                 if not self.contingency.make_room(h, slots, prepared, self.expendable())]
        active = self.active
        if short and active is not None and not active.broken:
            # the epoch in force would serve beside the new workers until it drained, and
            # they do not fit: it is replaced instead (its requests are replayed on the new
            # epoch, as after a failure), and its workers there make room
            active.broken = True
            for host in short:
                self.contingency.make_room(host, slots, prepared, self.expendable())
        number = self.numbers.allocate()
        prepared.epoch = number
        reused = len(slots) - len(fresh)
        epoch = Epoch(number, version, prepared.plan, slots, prepared.request.kind,
                      created=self.now, reused=reused, bridge=prepared.bridged is not None,
                      expected_ready=self.now + prepared.deploy_estimate_s,
                      compute_ms=pipelines_cost(prepared.request.version.instance,
                                                prepared.plan.pipelines)[2].compute_ms)
        for i, slot in enumerate(slots):
            slot.routes[number] = i
            slot.standby = False          # it serves now; its standby role is over
        self.emit(ev.PLAN_COMPUTED, epoch=number, reused_stages=reused,
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

    def expendable(self) -> list[Slot]:
        """Workers that serve only epochs that will never serve again: broken ones, and the
        epoch still deploying (a new epoch supersedes it)."""
        return [s for s in self.slots.values() if s.routes and all(
            e not in self.epochs or self.epochs[e].broken or self.epochs[e] is self.deploying
            for e in s.routes)]

    def maybe_deploy(self, epoch: Epoch) -> None:
        if epoch.state != "waiting":
            return
        if any(h not in self.health.nodes for h in epoch.hosts):
            return                  # deployed once every agent of the plan said hello
        epoch.state = "deploying"
        epoch.deployed = self.now
        for slot in epoch.slots:
            self.send_route(slot, epoch)
            self.emit(ev.DEPLOY_SENT, epoch=epoch.number, stage=slot.routes[epoch.number],
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
            self.emit("epoch.ready", epoch=epoch.number,
                      deploy_s=round(self.now - epoch.deployed, 3))
            self.activate(epoch)

    def activate(self, epoch: Epoch) -> None:
        old = self.active
        # a broken pipeline has lost requests: replay now; a healthy one finishes its own
        handover = old is not None and not old.broken
        epoch.state = "active"
        epoch.activated = self.now
        self.active, self.deploying = epoch, None
        replayed = self.dispatcher.switch(
            Route(epoch.number, epoch.version,
                  [Head(self.address(epoch, i), self.public(epoch, i) if self.curve else None)
                   for i in epoch.plan.heads],
                  epoch.slots[0].stage.inputs), replay=not handover)
        self.emit(ev.PLAN_DEPLOYED, epoch=epoch.number, version=epoch.version,
                  kind=epoch.kind, hosts=epoch.hosts, replayed=replayed, handover=handover,
                  reused_stages=epoch.reused, deploy_s=round(self.now - epoch.deployed, 3),
                  predicted_throughput_rps=epoch.plan.predicted_throughput_rps,
                  plan=epoch.plan.to_json())
        self.out.extend(self.versions.served(epoch.version, epoch.number))
        if epoch.bridge:
            # the plan it stood in for (or a better one) is looked for again, and adopted by
            # the rejoin rule, loaded beside this one
            self.improve = "a quick bridge serves; the plan it stood in for may follow"
        if old is not None:
            if handover:
                old.state = "draining"
                old.drain_until = self.now + self.control.drain_s
                self.draining.append(old)
                self.emit("epoch.draining", epoch=old.number,
                          in_flight=self.dispatcher.in_flight_on(old.number))
            else:
                self.retire(old, "replaced")

    def check_draining(self) -> None:
        for epoch in list(self.draining):
            left = self.dispatcher.in_flight_on(epoch.number)
            if left and self.now < epoch.drain_until and not epoch.broken:
                continue
            self.draining.remove(epoch)
            if left:
                self.dispatcher.replay_epochs({epoch.number}, "drain")
            self.retire(epoch, "drained" if not left else f"drain ended with {left} replayed")

    def retire(self, epoch: Epoch, why: str) -> None:
        self.withdraw(epoch, "retired")
        self.dispatcher.retire(epoch.number)
        self.emit("epoch.retired", epoch=epoch.number, reason=why)

    def abandon(self, epoch: Epoch, why: str) -> None:
        if self.deploying is epoch:
            self.deploying = None
        self.withdraw(epoch, "abandoned")
        self.emit("epoch.abandoned", epoch=epoch.number, reason=why)

    def withdraw(self, epoch: Epoch, state: str) -> None:
        """Take the epoch's routes away; a worker left serving nothing is released."""
        epoch.state = state
        for host in set(epoch.hosts):
            # not to a suspected host: if it comes back, its workers should still be up
            # to be taken back (`readopt`); it is told to stop when it heartbeats again
            record = self.health.nodes.get(host)
            if record is not None and not record.suspected:
                self.send(host, "stop", epoch=epoch.number)
        for slot in epoch.slots:
            slot.routes.pop(epoch.number, None)
            slot.confirmed.discard(epoch.number)
            if not slot.routes and not slot.standby and \
                    self.slots.get((slot.host, slot.port)) is slot:
                # the agent ends it on its own (no route, no standby); forget it here
                del self.slots[(slot.host, slot.port)]

    # -- agents --------------------------------------------------------------------------------

    def on_hello(self, host: str, f: dict[str, Any], now: float) -> None:
        self.now = now
        old = self.health.nodes.get(host)
        incarnation = incarnation_of(f)
        verdict = self.incarnations.admit(host, incarnation)
        if verdict == STALE:
            self.emit(ev.AGENT_STALE, host=host, incarnation=incarnation)
            return
        if verdict == SAME:
            if old is not None and old.pid == 0:
                old.pid = f["pid"]      # first heard of by a heartbeat: now its pid is known
            return
        # a new start (testbed.control.admission): a pid alone can repeat in a container
        restarted = verdict == RESTARTED and old is not None
        self.health.hello(host, f["pid"], now, returned=restarted)
        self.links[host] = AgentLink()
        self.emit("agent.restarted" if restarted else "agent.hello", host=host, pid=f["pid"],
                  incarnation=incarnation)
        if restarted:
            # its workers died with it; it is back, and held like any returning node
            self.suspended.pop(host, None)
            self.host_lost(host, "agent restarted", suspected=False)
        if self.waiting_for_nodes:
            self.request_replan(f"{host} available", available=frozenset({host}))
        if self.deploying is not None:
            self.maybe_deploy(self.deploying)

    def on_heartbeat(self, host: str, f: dict[str, Any], now: float) -> None:
        self.now = now
        known = host in self.health.nodes
        if "incarnation" in f:
            verdict = self.incarnations.verdict(host, f["incarnation"])
            if verdict == STALE:
                return                  # queued before its agent restarted
            known = known and verdict == SAME
        if not known:
            # we missed (or restarted before) its hello: a heartbeat is as good
            self.on_hello(host, {"pid": 0, **({"incarnation": f["incarnation"]}
                                              if "incarnation" in f else {})}, now)
        returned = self.health.beat(host, now)
        if returned:
            self.out.extend(returned)
            self.readopt(host, f["workers"])
            if self.waiting_for_nodes:
                self.request_replan(f"{host} returned", available=frozenset({host}))
        self.reconcile(host, f["workers"])

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
            self.emit("standby.readopted", host=host, port=slot.port, version=slot.version,
                      segments=[slot.first, slot.end])

    def reconcile(self, host: str, workers: list[dict[str, Any]]) -> None:
        """Make the host's workers what we want (core.reconcile; asks rate-limited)."""
        now = self.now
        link = self.links.setdefault(host, AgentLink())
        reported = {w["port"]: w for w in workers}
        link.reported = set(reported)
        mine = [s for s in self.slots.values() if s.host == host]
        states = {n: e.state for n, e in self.epochs.items()}
        for step in reconcile.compare(mine, reported, states, now, self.control.resend_s):
            if isinstance(step, reconcile.Failed):
                self.on_worker(host, {"port": step.slot.port, "epoch": 0, "stage": 0,
                                      "state": step.state, "detail": "from heartbeat"}, now)
            elif isinstance(step, reconcile.Observed):
                step.slot.state = step.state
                step.slot.confirmed = set(step.confirmed)
                self.check_straggler(step.slot, step.load)
            elif isinstance(step, reconcile.Resend):
                self.send_route(step.slot, self.epochs[step.epoch])
            else:
                self.send_prepare(step.slot)
        live = {e.number for e in (self.active, self.deploying, *self.draining)
                if e is not None}
        wanted = {p: s for (h, p), s in self.slots.items() if h == host}
        for ask in reconcile.unwanted(wanted, workers, live):
            if isinstance(ask, reconcile.Unwanted):
                self.ask(host, link, "release", ask.port, port=ask.port)
            else:
                self.ask(host, link, "stop", ask.epoch, epoch=ask.epoch)
        if self.deploying is not None:
            self.maybe_activate(self.deploying)

    def ask(self, host: str, link: AgentLink, kind: str, key: int, **fields: Any) -> None:
        if self.now - link.asked.get((kind, key), 0.0) > self.control.resend_s:
            link.asked[(kind, key)] = self.now
            self.send(host, kind, **fields)

    def on_worker(self, host: str, f: dict[str, Any], now: float) -> None:
        self.now = now
        slot = self.slots.get((host, f["port"]))
        state, reason = f["state"], f.get("reason")
        fields = {"host": host, "port": f["port"], "epoch": f["epoch"], "stage": f["stage"],
                  "detail": f["detail"], "reason": reason}
        if reason == "stopped":
            # a worker we stopped is not news; results.py reads worker.exited as a detection
            self.emit("worker.stopped", **fields)
            return
        if reason == "conflict":
            self.emit("deploy.conflict", **fields)   # retried from the heartbeats
            return
        if reason == "disk" and slot is not None:
            # ENOSPC/EROFS that eviction could not prevent: the host is left out (back-off)
            # and the stage planned elsewhere; requests in flight are replayed
            self.emit(ev.DISK_FAULT, **fields)
        if reason == "corrupt_model" and slot is not None:
            self.emit(ev.MODEL_CORRUPT, host=host, port=f["port"], sha256=slot.stage.sha256)
        if state in ("failed", "exited") and slot is None:
            return                      # already handled (one report per route)
        self.emit(f"worker.{state}", **fields)
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
        stalled = stall_s(self.last_tick, now, self.control.heartbeat_s)
        self.last_tick = self.now = now
        if stalled is not None:
            # we were not listening: silence during our own stall proves nothing
            self.health.stalled(stalled)
            self.emit(ev.CONTROLLER_STALLED, stall_ms=round(1000 * stalled))
        self.check_hosts()
        if self.replan_at is not None and now >= self.replan_at:
            self.replan_at = None
            self.request_replan("the simulated wait is over")
        self.check_timeouts()
        self.check_draining()
        self.next_job()

    def check_timeouts(self) -> None:
        now, epoch = self.now, self.deploying
        if epoch is not None and epoch.state == "waiting" and \
                now - epoch.created > self.control.hello_timeout_s:
            missing = [h for h in epoch.hosts if h not in self.health.nodes]
            self.emit("deploy.timeout", epoch=epoch.number, waiting_for=missing,
                      phase="hello")
            for host in missing:
                self.mark_unhealthy(host, "no hello")
            epoch.created = now     # once per timeout period
            self.request_replan(f"no hello from {missing}", touches_deploying=True)
        if epoch is not None and epoch.state == "deploying" and \
                now - epoch.deployed > self.control.deploy_timeout_s:
            late = [s for s in epoch.slots if epoch.number not in s.confirmed]
            self.emit("deploy.timeout", epoch=epoch.number,
                      waiting_for=[s.host for s in late], phase="ready")
            for slot in late:
                self.mark_unhealthy(slot.host, "workers not ready in time")
                self.slot_lost(slot)
                self.send(slot.host, "release", port=slot.port)
            epoch.deployed = now
            self.request_replan(f"workers on {[s.host for s in late]} not ready in time",
                                touches_deploying=True)

    # -- driver commands (already checked by testbed.control.commands) -------------------------

    def command(self, cmd: dict[str, Any], now: float) -> dict[str, Any]:
        self.now = now
        handler = {"status": self.cmd_status, "start_workload": self.cmd_start_workload,
                   "stop": self.cmd_stop, "replan": self.cmd_replan,
                   "rollback": self.cmd_rollback, "rollout": self.cmd_rollout,
                   }[cmd["cmd"]]
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
        now = self.now
        epoch = self.active
        shown = epoch or self.deploying
        nodes = self.health.nodes
        return {
            "ok": True, "state": self.state(), "reason": self.failure,
            **self.dispatcher.status(),
            "epoch": epoch.number if epoch else None,
            "version": epoch.version if epoch else None,
            "target_version": self.target_version,
            "versions": sorted(self.infos),
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
            "nodes": {h: {"seen": h in nodes,
                          "suspected": bool(nodes.get(h) and nodes[h].suspected),
                          "usable": self.usable(h),
                          "silent_ms": round(1000 * (now - nodes[h].last_seen))
                          if h in nodes else None}
                      for h in sorted(self.cfg.hosts)},
        }

    def cmd_start_workload(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.state() != "ready":
            raise RuntimeError(f"not ready to start a workload (state {self.state()})")
        overrides = cmd.get("workload", {})
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
        exclude = cmd.get("exclude", [])
        self.replan_exclude = set(exclude)
        self.request_replan(f"requested by the driver (exclude {exclude})", force=True)
        return {"ok": True}

    def cmd_rollback(self, _cmd: dict[str, Any]) -> dict[str, Any]:
        serving = self.active.version if self.active else None
        previous, events = self.versions.rollback(serving)
        self.out.extend(events)
        return {"ok": True, "version": previous}

    def cmd_rollout(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.out.extend(self.versions.rollout(cmd["version"]))
        return {"ok": True, "version": cmd["version"]}
