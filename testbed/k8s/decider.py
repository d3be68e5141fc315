"""The k3s backend's decisions: `Decider` decides and does nothing else: no sockets, no API,
no clock of its own (every call takes `now`). It is fed Node and Pod watch events (as the
official client's model objects, read through testbed.k8s.backend's pure functions), our
stage heartbeats and the outcome of its own actions, and answers with actions: `Replan`,
`Deploy`, `ForceDelete`, `Prune`, `Event`. The rules it shares with the embedded controller
are testbed.control.core's; node health (the API and the stages' heartbeats must agree) is
described in testbed.k8s.loop, the I/O shell that runs it. Unit-tested without a cluster
(tests/test_k8s_control.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kubernetes import client

from formats.control import ControlSettings
from partitioner.instance import Plan
from testbed.control import events as ev
from testbed.control.core.actions import Event
from testbed.control.core.backoff import backoff_s
from testbed.control.core.health import stall_s
from testbed.control.core.rejoin import RejoinHold, judge
from testbed.control.core.replan import Epochs, Replans, lost_while_planning, stale_event
from testbed.k8s.backend import (
    NodeHealth,
    epoch_ready,
    node_hostname,
    node_ready,
    node_usable,
    stage_pod,
)

# -- actions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Replan:
    """Plan over `live` (solve + split, in the job thread); the outcome goes back to
    Decider.planned or Decider.plan_failed. `kind`: initial | failure | rejoin."""

    kind: str
    reason: str
    live: frozenset[str]
    base: Plan | None = None        # the plan in force: repairs keep its cuts


@dataclass(frozen=True)
class Deploy:
    """Apply `plan` as epoch `epoch`; the outcome goes to Decider.deployed/deploy_failed."""

    epoch: int
    plan: Plan
    kind: str


@dataclass(frozen=True)
class ForceDelete:
    """Delete our pods on these nodes with grace 0: their kubelets cannot confirm it."""

    nodes: frozenset[str]


@dataclass(frozen=True)
class Prune:
    """Delete the per-epoch objects of epochs before the one before `epoch`."""

    epoch: int


Action = Replan | Deploy | ForceDelete | Prune | Event


def api_problem(node: client.V1Node) -> str | None:
    """Why the API says a stage cannot run on this node (None: it can)."""
    if node_usable(node):
        return None
    if not node_ready(node):
        return "NotReady (API)"
    if node.spec and node.spec.unschedulable:
        return "cordoned (API)"
    taints = (node.spec.taints if node.spec else None) or []
    return "tainted (API): " + ", ".join(f"{t.key}:{t.effect}" for t in taints
                                         if t.effect in ("NoSchedule", "NoExecute"))


# -- the decision core ------------------------------------------------------------------------

@dataclass
class Down:
    """A node we found dead: since when, who said so (api | heartbeat | deploy), and whether
    the API has reported it unusable since (it saw the failure, so it will see the return)."""

    since: float
    source: str
    api_saw_down: bool = False


class Decider:
    """What the loop should do, from what it was told (module docstring: node health). Single
    threaded; every method is quick and does no I/O."""

    def __init__(self, candidates: Iterable[str], timing: ControlSettings | None = None,
                 next_epoch: int = 1, version: int = 1) -> None:
        self.candidates = frozenset(candidates)      # the instance's nodes
        self.timing = timing or ControlSettings()
        self.version = version
        # API usability per node, and the heartbeats of the epoch in force (a node is in
        # last_heartbeat only once its stage has beaten for this epoch: see heartbeat())
        self.health = NodeHealth(heartbeat_timeout_s=self.timing.silence_s)
        self.api_reason: dict[str, str | None] = {}
        self.pods: dict[str, client.V1Pod] = {}
        self.synced = False             # the node list has been read once
        self.numbers = Epochs(next_epoch)
        self.epoch = 0
        self.plan: Plan | None = None
        self.plan_kind = ""
        self.deployed_at: float | None = None     # when the epoch in force was applied
        self.ready = False
        self.dead: dict[str, Down] = {}
        self.returning = RejoinHold()             # alive again, waiting out the hold
        self.failures: dict[str, int] = {}        # deaths while serving (the hold doubles)
        self.replans = Replans()            # the re-plan to start (core.replan)
        self.busy = False               # a plan or deploy job is running
        self.retry_at = 0.0
        self.waiting: str | None = None     # no plan fits the live nodes: why
        self.last_tick: float | None = None

    # -- inputs --------------------------------------------------------------------------------

    def nodes_listed(self, nodes: Iterable[client.V1Node]) -> None:
        """The first full list of Nodes: decisions start after it."""
        for node in nodes:
            self.node_event("ADDED", node)
        self.synced = True

    def node_event(self, kind: str, node: client.V1Node) -> None:
        host = node_hostname(node)
        if kind == "DELETED":
            self.health.forget_node(node)
            self.api_reason.pop(host, None)
        else:
            self.health.observe_node(node)
            self.api_reason[host] = api_problem(node)
        if host in self.dead and self.api_reason.get(host, "deleted") is not None:
            self.dead[host].api_saw_down = True

    def pod_event(self, kind: str, pod: client.V1Pod) -> None:
        if stage_pod(pod) is None:
            return
        if kind == "DELETED":
            self.pods.pop(pod.metadata.name, None)
        else:
            self.pods[pod.metadata.name] = pod

    def heartbeat(self, host: str, epoch: int, stage: int, at: float) -> bool:
        """A stage heartbeat received at `at`. Only a beat of the epoch in force, for a stage
        that its plan puts on that host, counts: an old epoch's pod still running, or a pod
        of a previous controller, proves nothing about the pipeline in force."""
        plan = self.plan
        if plan is None or epoch != self.epoch or not 0 <= stage < len(plan.stages) \
                or plan.stages[stage].node != host:
            return False
        self.health.heartbeat(host, max(at, self.health.last_heartbeat.get(host, at)))
        return True

    # -- views ---------------------------------------------------------------------------------

    def plan_hosts(self) -> frozenset[str]:
        return frozenset(s.node for s in self.plan.stages) if self.plan else frozenset()

    def usable(self) -> frozenset[str]:
        """Nodes a plan may use now."""
        return frozenset(h for h in self.candidates
                         if h not in self.dead and not self.returning.waiting(h)
                         and self.health.api_usable.get(h, False))

    def broken(self) -> bool:
        """The epoch in force cannot serve: none yet, not applied, or a node of it is dead."""
        return self.plan is None or self.deployed_at is None or \
            any(h in self.dead for h in self.plan_hosts())

    def hold_s(self, host: str) -> float:
        if self.waiting is not None or self.plan is None:
            return 0.0
        return backoff_s(self.timing.rejoin_hold_s, self.failures.get(host, 0))

    def serving(self, host: str) -> bool:
        """The host's stage of the epoch in force has beaten, or its pod is Ready."""
        if host in self.health.last_heartbeat:
            return True
        for pod in self.pods.values():
            info = stage_pod(pod)
            if info and info.epoch == self.epoch and info.node == host and info.ready \
                    and not info.terminating:
                return True
        return False

    def death(self, host: str, now: float) -> tuple[str, str] | None:
        """(source, reason) when the host cannot be used now, else None."""
        if host not in self.health.api_usable:
            return "api", "not a node of the cluster"
        problem = self.api_reason.get(host)
        if problem is not None:
            return "api", problem
        down = self.dead.get(host)
        seen = self.health.last_heartbeat.get(host)
        if down is not None and (seen is None or seen <= down.since):
            # both must agree: its stage is in the epoch in force, so it must beat again
            if seen is not None:
                return "heartbeat", "no heartbeat since it was found dead"
            # the API's "Ready" may just be late: it must have seen the failure, or have had
            # the time to (else our pod or its path failed, not the node)
            if not down.api_saw_down and now - down.since < self.timing.api_grace_s:
                return down.source, "no sign of life since it was found dead"
        if not self.health.alive(host, now):
            silent = now - self.health.last_heartbeat[host]
            return "heartbeat", f"no heartbeat for {round(1000 * silent)} ms"
        if self.deployed_at is not None and host in self.plan_hosts() \
                and now - self.deployed_at > self.timing.deploy_timeout_s \
                and not self.serving(host):
            return "deploy", (f"its stage does not serve {self.timing.deploy_timeout_s:g} s "
                              f"after the deploy")
        return None

    # -- the clock -----------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        stalled = stall_s(self.last_tick, now, self.timing.heartbeat_s)
        if stalled is not None:
            # we were not looking: silence during our own stall proves nothing
            for host in self.health.last_heartbeat:
                if host not in self.dead:       # (a dead host's beats are judged by date)
                    self.health.last_heartbeat[host] += stalled
            out.append(Event(ev.CONTROLLER_STALLED, {"stall_ms": round(1000 * stalled)}))
        self.last_tick = now
        if not self.synced:
            return out
        for host in sorted(self.candidates | self.plan_hosts()):
            found = self.death(host, now)
            out += self._down(host, *found, now) if found else self._up(host, now)
        if self.plan is None and self.replans.pending is None and not self.busy \
                and self.waiting is None:
            out += self.want("initial", "controller started")
        plan = self.plan
        if plan is not None and self.deployed_at is not None and not self.ready \
                and epoch_ready(self.pods.values(), self.epoch, len(plan.stages)):
            self.ready = True
            out.append(Event("plan.deployed", {
                "epoch": self.epoch, "version": self.version, "kind": self.plan_kind,
                "hosts": [s.node for s in plan.stages],
                "deploy_s": round(now - self.deployed_at, 3),
                "predicted_throughput_rps": plan.predicted_throughput_rps,
                "plan": plan.to_json()}))
        out += self._start_replan(now)
        return out

    def _down(self, host: str, source: str, reason: str, now: float) -> list[Action]:
        if host in self.dead:
            return []
        self.returning.cancel(host)             # a new suspicion restarts the hold
        self.dead[host] = Down(now, source, api_saw_down=source == "api")
        serving = host in self.plan_hosts()
        if serving:
            self.failures[host] = self.failures.get(host, 0) + 1
        out: list[Action] = [Event("node.suspected", {"host": host, "source": source,
                                                      "reason": reason, "serving": serving})]
        if serving and self.waiting is None:
            out += self.want("failure", f"{host}: {reason}")
        return out

    def _up(self, host: str, now: float) -> list[Action]:
        out: list[Action] = []
        if host in self.dead:
            down_s = now - self.dead.pop(host).since
            self.returning.start(host, now)
            out.append(Event(ev.NODE_RETURNED, {"host": host, "down_s": round(down_s, 3),
                                                "hold_s": self.hold_s(host)}))
        if not self.returning.due(host, now, self.hold_s(host)):
            return out
        out.append(Event("node.stable", {"host": host}))
        if self.waiting is not None or self.broken():
            out += self.want("failure", f"{host} available")
        else:
            out += self.want("rejoin", f"{host} stable")
        return out

    def want(self, kind: str, reason: str) -> list[Action]:
        """Ask for a re-plan (started when no job runs). A failure outranks a rejoin."""
        if self.plan is None:
            kind = "initial"
        return self.replans.want(kind, reason)

    def _start_replan(self, now: float) -> list[Action]:
        if self.replans.pending is None or self.busy or now < self.retry_at:
            return []
        request = self.replans.take()
        assert request is not None
        kind, reason = request.kind, request.reason
        if kind == "rejoin" and self.broken():
            kind = "failure"
        live = self.usable()
        if not live:
            return self._infeasible("no live node to place a stage on")
        self.busy = True
        return [Replan(kind, reason, live, self.plan)]

    # -- outcomes of the actions ---------------------------------------------------------------

    def planned(self, kind: str, plan: Plan, now: float) -> list[Action]:
        """A Replan's plan is ready: deploy it as a new epoch, or not (stale, unchanged, or a
        rejoin that does not win by the margin)."""
        self.busy = False
        lost = lost_while_planning(plan, self.usable())
        if lost:
            return [stale_event(lost)] + (
                self.want(kind, "plan again: hosts lost while planning")
                if kind != "rejoin" else [])
        current = self.plan
        out: list[Action] = []
        if current is not None and not self.broken():
            verdict = judge(plan, current, self.timing.rejoin_margin,
                            "the plan with the returned nodes")
            if verdict.same:
                self.waiting = None       # the epoch in force is whole again
                if kind == "rejoin":
                    return [verdict.event()]
                return [Event(ev.PLAN_KEPT, {
                    "reason": verdict.reason,
                    "current_bottleneck_ms": round(current.bottleneck_ms, 3),
                    "candidate_bottleneck_ms": round(plan.bottleneck_ms, 3)})]
            if kind == "rejoin":
                out.append(verdict.event())
                if not verdict.accepted:
                    return out
        epoch = self.numbers.allocate()
        self.epoch, self.plan, self.plan_kind = epoch, plan, kind
        self.deployed_at, self.ready, self.waiting = None, False, None
        self.health.last_heartbeat.clear()      # every stage must beat for the new epoch
        self.busy = True
        return [*out, Deploy(epoch, plan, kind)]

    def plan_failed(self, kind: str, reason: str, now: float,
                    infeasible: bool) -> list[Action]:
        self.busy = False
        if kind == "rejoin" and not self.broken():
            return [Event("rejoin.declined", {"reason": reason})]
        if infeasible:
            return self._infeasible(reason)
        self.retry_at = now + self.timing.retry_s
        return [Event("plan.failed", {"kind": kind, "reason": reason}),
                *self.want(kind, f"retry after: {reason}")]

    def _infeasible(self, reason: str) -> list[Action]:
        """Wait for a node to return (it is tried at once, see hold_s). Pods stuck on dead
        nodes are removed now: their Deployments recreate them, pending, until the node is
        back, and a stage that comes back whole makes the epoch in force serve again."""
        self.waiting = reason
        out: list[Action] = [Event("plan.infeasible", {
            "reason": reason, "live": sorted(self.usable()), "version": self.version})]
        if self.dead:
            out.append(ForceDelete(frozenset(self.dead)))
        return out

    def deployed(self, epoch: int, now: float) -> list[Action]:
        """The epoch's objects are applied: its clock starts; pods on dead nodes go now
        (before, their ReplicaSet would have made new ones there), then old epochs."""
        self.busy = False
        if epoch != self.epoch:
            return []
        self.deployed_at = now
        out: list[Action] = []
        if self.dead:
            out.append(ForceDelete(frozenset(self.dead)))
        out.append(Prune(epoch))
        return out

    def deploy_failed(self, epoch: int, reason: str, now: float) -> list[Action]:
        """Part of the epoch may be applied; its number is spent (an epoch's ConfigMap and
        Secret are immutable). Plan again after `retry_s`."""
        self.busy = False
        self.retry_at = now + self.timing.retry_s
        return [Event("deploy.failed", {"epoch": epoch, "reason": reason}),
                *self.want("failure", f"the deploy of epoch {epoch} failed")]


