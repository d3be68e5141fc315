"""Contingency plans and warm standbys of the embedded controller: while all is well, for
each node of the active plan, the plan it would move to if that node died (planned in the
background, one job at a time), and the stages those plans would newly need loaded as
standbys, on spare nodes first and on serving ones where memory and disk allow, so that a
failure that matches a contingency is a new epoch of existing workers: a few routes, no
model transfer, no model load. A new stage that found no memory for its standby still has
its model file sent ahead to its host's disk where the disk holds it (`stage_on_disk`):
that loss then loads a model but transfers none.

Division of labour: testbed.control.plane owns the workers, epochs and jobs and calls this
module; where standbys go is core.standby's rule; pipelines side by side get no contingency
plans (the pipelines a loss leaves whole are the plan for it: `surviving`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from formats.control import ControlSettings
from partitioner.instance import Node, Plan
from testbed.control import events as ev
from testbed.control import policy
from testbed.control.core import standby as standby_rule
from testbed.control.core.records import Epoch, Slot
from testbed.control.core.replan import Epochs
from testbed.control.disk import disk_holds, fits_disk
from testbed.control.planning import PlanRequest, Prepared, StageFile, VersionInfo
from testbed.control.policy import Held


def forked_runtime_bytes() -> int:
    """What each worker adds beside its segments (the first one's share of it is inside the
    node's runtime allowance, so a budget of node memory + this holds one worker's runtime).
    Imported here: partitioner.profile brings onnx, which the controller needs only then."""
    from partitioner.profile import FORKED_RUNTIME_BYTES

    return FORKED_RUNTIME_BYTES


class Plane(Protocol):
    """What this module uses of testbed.control.plane.ControlPlane."""

    active: Epoch | None
    control: ControlSettings
    slots: dict[tuple[str, int], Slot]
    infos: dict[int, VersionInfo]
    numbers: Epochs
    improve: str | None         # a better plan is to be looked for, and why
    models: dict[str, Any]      # sha256 -> stage file, served to agents

    @property
    def target_version(self) -> int: ...
    def held(self, exclude: set[str] | None = None) -> frozenset[Held]: ...
    def usable_hosts(self) -> set[str]: ...
    def start_job(self, kind: str, request: PlanRequest | None = None,
                  manifest: Any = None) -> None: ...
    def plan_request(self, kind: str, reason: str, live: set[str],
                     excluded: str | None = None,
                     full: frozenset[str] = frozenset()) -> PlanRequest: ...
    def release(self, slot: Slot, why: str) -> None: ...
    def new_slot(self, host: str, version: int, first: int, end: int, stage: StageFile,
                 standby: bool = False) -> Slot: ...
    def send_prepare(self, slot: Slot) -> None: ...
    def send(self, host: str, kind: str, blob: bytes | None = None, **fields: Any) -> None: ...
    def emit(self, kind: str, /, **fields: Any) -> None: ...


class Contingencies:
    """The contingency plans for the active epoch and live nodes `made_for`."""

    def __init__(self, plane: Plane) -> None:
        self.plane = plane
        self.plans: dict[str, Prepared] = {}      # host assumed lost -> plan
        self.queue: list[str] = []                # hosts whose loss is still to plan
        self.made_for: tuple[int, frozenset[str]] | None = None
        # losses planned again, once, with the nodes where their standbys found no room
        self.full: dict[str, frozenset[str]] = {}
        self.staged: dict[str, dict[str, int]] = {}   # host -> models told to keep on disk

    def promised(self) -> list[str]:
        """The nodes of the plans' new stages, one entry per stage (standby places)."""
        return [stage.node for planned in self.plans.values()
                for stage, file in zip(planned.plan.stages, planned.stages)
                if file is not None]

    def precomputed(self, live: set[str]) -> Prepared | None:
        """A contingency plan made for exactly this set of live nodes, if its workers are
        still there."""
        for prepared in self.plans.values():
            if set(prepared.request.live) != live or \
                    prepared.request.version.version != self.plane.target_version:
                continue
            held = self.plane.held()
            version = prepared.request.version.version
            if all(f is not None or policy.stage_key(s, version) in held
                   for s, f in zip(prepared.plan.stages, prepared.stages)):
                prepared.precomputed = True
                return prepared
        return None

    def surviving(self, live: set[str]) -> Prepared | None:
        """Pipelines side by side of which some lost a node: the others, as a plan ready at
        once (every worker is loaded and serving). It stands in for the contingency plans
        such epochs do not get; a better plan is looked for after it is deployed
        (`improve`)."""
        plane = self.plane
        active = plane.active
        if active is None or not active.plan.chains or active.version != plane.target_version:
            return None
        kept = [p for p in active.plan.pipelines if all(s.node in live for s in p)]
        if not kept or len(kept) == len(active.plan.chains):
            return None
        version = plane.infos[active.version]
        stages = [s for p in kept for s in p]
        plan = Plan.of(version.instance, stages, f"{active.plan.algorithm}-survivors", False,
                       chains=tuple(len(p) for p in kept))
        request = PlanRequest("failure", "the surviving pipelines", version, frozenset(live),
                              active.plan, plane.held(), generation=plane.numbers.next)
        plane.improve = f"{len(kept)} of {len(active.plan.chains)} pipelines left"
        return Prepared(request, plan, [None] * len(stages), None, precomputed=True)

    def next(self) -> None:
        """Start planning the next single loss (a job), when there is one to plan."""
        active = self.plane.active
        # pipelines side by side need none: the surviving ones are the plan for any loss
        control = self.plane.control
        if not (control.standby and control.replan) or active is None or \
                active.state != "active" or active.plan.chains:
            return
        live = frozenset(self.plane.usable_hosts())
        key = (active.number, live)
        if self.made_for != key:
            # the plan in force or the live nodes changed: plan every single loss again
            self.made_for = key
            self.plans = {}
            self.full = {}
            self.queue = [h for h in active.hosts if h in live]
        if not self.queue:
            return
        host = self.queue.pop(0)
        full = self.full.get(host, frozenset())
        reason = f"if {host} is lost" + (f" (no room on {', '.join(sorted(full))})"
                                         if full else "")
        self.plane.start_job("contingency", self.plane.plan_request(
            "contingency", reason, set(live) - {host}, excluded=host, full=full))

    def done(self, prepared: Prepared) -> None:
        host = prepared.request.excluded
        active = self.plane.active
        if host is None or active is None or self.made_for != (
                active.number, frozenset(self.plane.usable_hosts())):
            return                          # computed for a state that is gone
        self.plans[host] = prepared
        # each plan's standbys load as soon as it is known: with many nodes the whole queue
        # takes longer than the first fault may wait (two-tier-20: 10 plans of ~2.5 s)
        self.reconcile_standbys(complete=not self.queue)

    def reconcile_standbys(self, complete: bool = True) -> None:
        """Load what the contingency plans would newly need as standbys (core.standby): as
        each plan comes, its standbys where they fit (`choose`); once the plans are
        `complete`, every standby decided again together (`cover`: losses covered whole
        first) and those left out released; a loss not covered whole is then planned once
        more, told the nodes where its standbys found no room (`PlanRequest.full`), and
        `contingency.ready` is said when no plan is left to make."""
        plane = self.plane
        idle = {s.held: s for s in plane.slots.values() if s.standby and not s.routes}
        busy = {s.held for s in plane.slots.values() if s.held not in idle}
        origin: dict[Held, tuple[Prepared, StageFile]] = {}
        wanted: list[list[Held]] = []       # per plan: its stages no serving worker holds
        for prepared in self.plans.values():
            version = prepared.request.version.version
            keys = []
            for stage, file in zip(prepared.plan.stages, prepared.stages):
                key = policy.stage_key(stage, version)
                if key in busy or (file is None and key not in idle):
                    continue
                origin.setdefault(key, (prepared, file or idle[key].stage))
                keys.append(key)
            wanted.append(keys)
        serving = {s.host for s in plane.slots.values() if s.routes}
        per_node = plane.control.standby_per_node
        if complete:
            def room(key: Held, chosen: Sequence[Held]) -> bool:
                prepared, file = origin[key]
                return self.fits(key.node, prepared, key, file,
                                 [(k, origin[k][1]) for k in chosen], idle_too=False)

            def to_load(key: Held) -> int:
                slot = idle.get(key)
                return 0 if slot is not None and slot.state == "ready" else origin[key][1].size

            chosen = standby_rule.cover(wanted, set(idle), serving, per_node, room, to_load)
            # a loss whose new stages did not all find room is planned once more, told
            # where: another plan may share stages with the standbys that did
            unplaced = {host: frozenset(k.node for k in keys if k not in chosen)
                        for host, keys in zip(self.plans, wanted)}
            again = {host: nodes for host, nodes in unplaced.items()
                     if nodes and host not in self.full}
            self.full.update(again)
            self.queue.extend(again)
            for key, slot in idle.items():
                if key not in chosen:
                    plane.release(slot, "its room goes to losses covered whole"
                                  if key in origin else "no contingency plan needs it")
            new = [key for key in chosen if key not in idle]
        else:
            # choose() takes every key fits() accepts, in order: the room a pass has already
            # given away counts for the next key (three standbys chosen at once on a 256 MiB
            # host that each alone fitted were OOM-killed)
            pending: list[tuple[Held, StageFile]] = []

            def fits_now(key: Held) -> bool:
                prepared, file = origin[key]
                ok = self.fits(key.node, prepared, key, file, pending)
                if ok:
                    pending.append((key, file))
                return ok

            per_host = Counter(s.host for s in plane.slots.values() if s.standby)
            new = standby_rule.choose([k for k in origin if k not in idle], set(idle),
                                      serving, dict(per_host), per_node, fits_now)
        for key in new:
            file = origin[key][1]
            slot = plane.new_slot(key.node, key.version, key.first, key.end, file,
                                  standby=True)
            plane.send_prepare(slot)
            plane.emit("standby.prepared", host=slot.host, port=slot.port,
                       version=slot.version, segments=[slot.first, slot.end],
                       sha256=file.sha256, serving=key.node in serving)
        if not complete or self.queue:
            return
        staged = self.stage_on_disk()
        active = plane.active
        plane.emit(ev.CONTINGENCY_READY, epoch=active.number if active else None,
                   plans={h: {"hosts": [s.node for s in p.plan.stages],
                              "bottleneck_ms": round(p.plan.bottleneck_ms, 3),
                              "new_stages": sum(f is not None for f in p.stages)}
                          for h, p in self.plans.items()},
                   standbys=sorted(f"{s.host}:{s.port}"
                                   for s in plane.slots.values() if s.standby),
                   staged=staged)

    def stage_on_disk(self) -> list[str]:
        """The contingency plans' new stages that no worker holds (their standbys found no
        memory): their model files go to their hosts' disks where the disk holds them
        beside the files of the workers there, so that such a loss needs a model load but
        no transfer (on hetero-6 a 4.7 MB stage took 0.4 s of a 0.7 s switch to arrive).
        Each host is told its whole list when it changes (`stage`); the agent evicts
        staged files last. Returns them as "host:sha256[:12]" for `contingency.ready`."""
        plane = self.plane
        held = {s.held for s in plane.slots.values()}
        live = plane.usable_hosts()
        wanted: dict[str, dict[str, int]] = {}
        for prepared in self.plans.values():
            instance = prepared.request.version.instance
            version = prepared.request.version.version
            for stage, file in zip(prepared.plan.stages, prepared.stages):
                host = stage.node
                if file is None or host not in live or \
                        policy.stage_key(stage, version) in held:
                    continue
                on_host = wanted.setdefault(host, {})
                workers = [(s.stage.sha256, s.stage.size) for s in plane.slots.values()
                           if s.host == host]
                if fits_disk(instance.node(host).disk_bytes, [*workers, *on_host.items()],
                             (file.sha256, file.size)):
                    on_host[file.sha256] = file.size
                    plane.models[file.sha256] = file.path
        for host in sorted(set(wanted) | set(self.staged)):
            models = wanted.get(host, {})
            if models != self.staged.get(host, {}) and host in live:
                plane.send(host, "stage", models=[{"sha256": sha, "size": size}
                                                  for sha, size in sorted(models.items())])
        self.staged = {h: m for h, m in wanted.items() if m}
        return sorted(f"{h}:{sha[:12]}" for h, m in self.staged.items() for sha in m)

    def fits(self, host: str, prepared: Prepared, key: Held,
             file: StageFile | None = None,
             pending: list[tuple[Held, StageFile]] | None = None,
             idle_too: bool = True) -> bool:
        """Room for one more worker on `host`: the instance's node memory assumes one stage
        per host, so a second worker also pays the worker runtime allowance; and its model
        file on the host's disk beside the ones its workers hold (testbed.control.disk).
        `pending`: workers chosen for hosts but not made yet, counted like made ones;
        `idle_too=False`: standbys without routes not counted (they are being decided)."""
        instance = prepared.request.version.instance
        try:
            node = instance.node(host)
        except KeyError:
            return False
        pending = [(k, f) for k, f in pending or [] if k.node == host]
        here = [s for s in self.plane.slots.values() if s.host == host and
                (idle_too or s.routes or not s.standby)]
        if file is not None and not fits_disk(
                node.disk_bytes,
                [(s.stage.sha256, s.stage.size) for s in here]
                + [(f.sha256, f.size) for _, f in pending], (file.sha256, file.size)):
            return False
        return self.memory_holds(node, [key, *(s.held for s in here), *(k for k, _ in pending)])

    def worker_bytes(self, key: Held) -> int:
        """A loaded worker's memory: what a worker forked by the agent's launcher adds, and
        its segments (the node's memory in the instance has one worker's runtime taken off
        already)."""
        segments = self.plane.infos[key.version].instance.segments[key.first:key.end]
        return forked_runtime_bytes() + sum(s.memory_bytes for s in segments)

    def memory_holds(self, node: Node, keys: Iterable[Held]) -> bool:
        """The node's memory holds loaded workers of `keys`: the instance's node memory has
        one worker's runtime taken off already, so the budget is that and one forked
        worker's runtime."""
        return sum(self.worker_bytes(k) for k in keys) <= node.memory_bytes + \
            forked_runtime_bytes()

    def no_room(self, prepared: Prepared) -> list[str]:
        """The hosts where the plan's new workers do not fit beside the workers loaded
        there, standbys aside (make_room releases those)."""
        instance = prepared.request.version.instance
        version = prepared.request.version.version
        keys: dict[str, list[Held]] = {}
        for stage, file in zip(prepared.plan.stages, prepared.stages):
            if file is not None:
                keys.setdefault(stage.node, []).append(policy.stage_key(stage, version))
        for slot in self.plane.slots.values():
            if slot.host in keys and (slot.routes or not slot.standby):
                keys[slot.host].append(slot.held)
        return sorted(h for h, k in keys.items()
                      if not self.memory_holds(instance.node(h), k))

    def make_room(self, host: str, keep: list[Slot], prepared: Prepared,
                  broken: list[Slot]) -> bool:
        """A new epoch's worker shares `host`'s memory and disk with every worker loaded
        there: the planner counts only the stage itself, so what the epoch does not use is
        released until it fits: first standbys (expendable: the contingency plans are made
        again for the new epoch), then `broken`, workers that serve only broken epochs (those
        can never serve again; their requests are replayed on the new epoch). The instance's
        node memory holds one worker's runtime; the agent evicts the model files of released
        workers before it writes (testbed.control.disk). True when the host's workers fit."""
        try:
            node = prepared.request.version.instance.node(host)
        except KeyError:
            return True
        spare = [s for s in self.plane.slots.values() if s.host == host and s.standby and
                 not s.routes and all(s is not k for k in keep)]
        spare = [s for s in broken if s.host == host and all(s is not k for k in keep)] + \
            spare

        def fits() -> bool:
            here = [s for s in self.plane.slots.values() if s.host == host]
            return disk_holds(node.disk_bytes, ((s.stage.sha256, s.stage.size) for s in here)) \
                and self.memory_holds(node, (s.held for s in here))

        while spare and not fits():
            self.plane.release(spare.pop(), "room for a new epoch's worker")
        return fits()

    def release_standbys(self, keep_version: int | None = None) -> None:
        for slot in list(self.plane.slots.values()):
            if slot.standby and not slot.routes and slot.version != keep_version:
                self.plane.release(slot, "rollout: room for the new version")
        self.plans, self.queue, self.made_for = {}, [], None

