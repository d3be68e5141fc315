"""The controller's placement rules, as pure functions on plans (no sockets, no clocks), so
each rule is stated once and tested alone.

Division of labour: `partitioner.algorithms.solve` finds the best plan for an instance; this
module decides *which* good plan the running system should move to, given what already runs:

- Repair candidates: the current plan's cuts kept, every stage on a live node left where it
  is, the stages of lost nodes moved to spare live nodes (every assignment tried, up to a cap).
  They keep the stage models, so surviving workers and warm standbys can serve them at once.
- Snapped candidates: a candidate's nodes kept, its cuts moved onto where loaded stages on
  those nodes start or end, so that one warm standby can serve the contingency plans of
  several losses (two plans that want the same node's stage one segment apart would
  otherwise need two standbys there, and a host often has room for one).
- The reuse rule: among all candidates (the planner's plan and the repairs), take those whose
  bottleneck is within `tolerance` (default 5%) of the best; of those, the one that reuses
  the most running stages (a stage is reused when a worker of the same model version already
  holds the same segment range on the same node, serving or standing by); ties go to the
  fewest new stages on `avoid` nodes, then the smaller bottleneck, then the smaller latency.
  A reused stage costs no model transfer and no model load. `avoid` holds the nodes that
  serve, for a new model version (loading it beside the running one takes their CPU), and
  the nodes that hold or are promised a standby, for contingency plans (one per node).
  Before `avoid` come `full` nodes: for a contingency plan asked again because some of its
  new stages found no room for a standby, the nodes where they did not fit.
- The quick-bridge rule: after a failure (nothing serves), when the chosen plan's new stages
  would take long to deploy (a model over a slow link, loaded on a slow node:
  `deploy_estimate_s`), a candidate that serves at least `QUICK_GAIN_S` sooner and delivers
  at least `QUICK_SHARE` of its rate is deployed first; the better plan follows once it
  serves, by the rejoin rule, loaded beside it (no second outage).
- The outage-escape rule: while nothing serves, an epoch being deployed is let finish (under
  churn, replacing it at every returning node meant none ever served), unless a plan made
  with a node that returned meanwhile serves at least `QUICK_GAIN_S` sooner than what that
  epoch's deploy estimate still says it needs (`escape_serves_sooner`). Each escape serves
  sooner than the epoch it replaces, so churn cannot keep it from serving.
- The rejoin rule: a plan that would take a returned node back is adopted only if its
  bottleneck is at least `margin` (default 10%) below the bottleneck of the plan in force;
  with the hold time the controller applies first, this is what keeps a flapping node from
  moving the pipeline back and forth.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from partitioner.instance import Instance, Plan, Stage, plan_problems

MAX_REPAIRS = 5040          # assignments tried per repair (7! keeps it well under 100 ms)
MAX_SNAPS = 4096            # cut choices tried per candidate when snapping to loaded stages
# What a new stage costs before it serves (the quick-bridge rule): its weights cross the link
# from the model server (the instance's source) and onnxruntime loads them at the node's speed
# (measured on Mininet hosts: 20.9 MB in 0.69 s at 0.15 cores, about 200 MB a core-second;
# half that is assumed, as a worker's start adds its own).
LOAD_BYTES_PER_CORE_S = 100e6
LOAD_FIXED_S = 0.3
QUICK_GAIN_S = 2.0          # a bridge serves at least this much sooner than the plan it bridges
QUICK_SHARE = 0.5           # and delivers at least this share of its predicted throughput


@dataclass(frozen=True)
class Held:
    """A stage model loaded on a node: (node, first segment, end segment, model version)."""

    node: str
    first: int
    end: int
    version: int


def stage_key(stage: Stage, version: int) -> Held:
    return Held(stage.node, stage.first, stage.end, version)


def reused_stages(stages: Sequence[Stage], version: int, held: set[Held]) -> int:
    return sum(stage_key(s, version) in held for s in stages)


def repair_candidates(instance: Instance, base: Plan, limit: int = MAX_REPAIRS) -> list[Plan]:
    """Plans with `base`'s cuts on `instance`'s nodes (the live ones): stages whose node is
    still there stay; the others go to nodes `base` does not use. Empty when there are not
    enough spare nodes or no assignment is valid."""
    live = {n.name for n in instance.nodes}
    if any(p[-1].end != len(instance.segments) for p in base.pipelines):
        return []                                   # another model version's plan
    lost = [i for i, s in enumerate(base.stages) if s.node not in live]
    spares = sorted(live - {s.node for s in base.stages})
    if len(lost) > len(spares):
        return []
    plans = []
    for nodes in itertools.islice(itertools.permutations(spares, len(lost)), limit):
        stages = list(base.stages)
        for i, node in zip(lost, nodes):
            stages[i] = Stage(stages[i].first, stages[i].end, node)
        if not plan_problems(instance, stages, base.chains):
            plans.append(Plan.of(instance, stages, f"{base.algorithm}+repair", False,
                                 chains=base.chains))
    return plans


def new_stages_on(stages: Sequence[Stage], version: int, held: set[Held],
                  nodes: frozenset[str]) -> int:
    return sum(s.node in nodes and stage_key(s, version) not in held for s in stages)


def snapped_candidates(instance: Instance, plans: list[Plan], version: int,
                       held: set[Held], full: frozenset[str] = frozenset(),
                       limit: int = MAX_SNAPS) -> list[Plan]:
    """Variants of single-pipeline `plans` (same nodes, same order) whose cuts each stay or
    move to where a `held` stage of `version` on either neighbouring node ends or starts;
    only valid ones that re-use more loaded stages than the plan they vary, or as many with
    fewer new stages on `full` nodes."""
    segments = len(instance.segments)
    mine = [h for h in held if h.version == version]

    def standing(stages: Sequence[Stage]) -> tuple[int, int]:
        return (reused_stages(stages, version, held),
                -new_stages_on(stages, version, held, full))

    out: list[Plan] = []
    for plan in plans:
        stages = plan.stages
        if plan.chains or stages[-1].end != segments:
            continue
        options = [sorted({left.end} | {h.end for h in mine if h.node == left.node}
                          | {h.first for h in mine if h.node == right.node})
                   for left, right in itertools.pairwise(stages)]
        better = standing(stages)
        for cuts in itertools.islice(itertools.product(*options), limit):
            bounds = (0, *cuts, segments)
            if any(a >= b for a, b in itertools.pairwise(bounds)):
                continue
            variant = [Stage(a, b, s.node)
                       for (a, b), s in zip(itertools.pairwise(bounds), stages)]
            if standing(variant) <= better or plan_problems(instance, variant):
                continue
            out.append(Plan.of(instance, variant, f"{plan.algorithm}+snap", False))
    return out


@dataclass(frozen=True)
class Choice:
    """The plan chosen by the reuse rule, and why."""

    plan: Plan
    reused: int                     # stages served by workers already loaded
    best_bottleneck_ms: float       # the best of all candidates
    candidates: int
    within: int                     # candidates inside the tolerance

    def describe(self) -> dict[str, object]:
        return {"reused_stages": self.reused, "stages": len(self.plan.stages),
                "bottleneck_ms": round(self.plan.bottleneck_ms, 3),
                "best_bottleneck_ms": round(self.best_bottleneck_ms, 3),
                "candidates": self.candidates, "within_tolerance": self.within}


def choose(candidates: list[Plan], version: int, held: set[Held], tolerance: float,
           avoid: frozenset[str] = frozenset(), full: frozenset[str] = frozenset()) -> Choice:
    """The reuse rule (module docstring). `candidates` must not be empty."""
    if not candidates:
        raise ValueError("no candidate plan")
    best = min(p.bottleneck_ms for p in candidates)
    limit = best * (1.0 + tolerance) if math.isfinite(best) else best
    within = [p for p in candidates if p.bottleneck_ms <= limit]

    def key(plan: Plan) -> tuple[float, ...]:
        stages = plan.stages
        return (-reused_stages(stages, version, held), new_stages_on(stages, version, held, full),
                new_stages_on(stages, version, held, avoid), plan.bottleneck_ms,
                plan.latency_ms)

    plan = min(within, key=key)
    return Choice(plan, reused_stages(plan.stages, version, held), best, len(candidates),
                  len(within))


def stage_deploy_s(instance: Instance, stage: Stage) -> float:
    """Seconds before a new worker of `stage` could serve: its weights (`model_bytes`; 0 when
    the instance does not say) over the link from the source, then its session load."""
    size = sum(s.model_bytes for s in instance.segments[stage.first:stage.end])
    mbps = instance.bandwidth(instance.source, stage.node)
    transfer = size * 8 / (mbps * 1e6) if mbps and math.isfinite(mbps) else 0.0
    return transfer + LOAD_FIXED_S + size / (LOAD_BYTES_PER_CORE_S
                                             * instance.node(stage.node).speed)


def deploy_estimate_s(instance: Instance, plan: Plan, version: int, held: set[Held]) -> float:
    """Seconds before every stage of `plan` could serve: the slowest new stage's
    `stage_deploy_s` (loaded workers serve at once; new ones load side by side)."""
    return max((stage_deploy_s(instance, s) for s in plan.stages
                if stage_key(s, version) not in held), default=0.0)


def slowest_new_node(instance: Instance, plan: Plan, version: int,
                     held: set[Held]) -> str | None:
    """The node of the plan's new stage that takes longest to deploy (None: all loaded)."""
    new = [s for s in plan.stages if stage_key(s, version) not in held]
    return max(new, key=lambda s: stage_deploy_s(instance, s)).node if new else None


def quick_bridge(candidates: list[Plan], chosen: Plan, estimate: Callable[[Plan], float],
                 ) -> Plan | None:
    """The quick-bridge rule (module docstring): the candidate to serve before `chosen`, or
    None. Of those at least QUICK_GAIN_S sooner with at least QUICK_SHARE of its throughput,
    the soonest (to the second), then the fastest."""
    slow = estimate(chosen)
    options = [p for p in candidates
               if estimate(p) <= slow - QUICK_GAIN_S
               and p.predicted_throughput_rps >= QUICK_SHARE * chosen.predicted_throughput_rps]
    if not options:
        return None
    return min(options, key=lambda p: (math.ceil(estimate(p)), p.bottleneck_ms,
                                       p.latency_ms))


def escape_serves_sooner(left_s: float, estimate_s: float) -> bool:
    """The outage-escape rule (module docstring): does a plan that needs `estimate_s` to
    deploy serve QUICK_GAIN_S sooner than the epoch still `left_s` from serving?"""
    return estimate_s <= left_s - QUICK_GAIN_S


def better_by_margin(candidate: Plan, current: Plan, margin: float) -> bool:
    """The rejoin rule: move only for a bottleneck at least `margin` below the current one."""
    return candidate.bottleneck_ms <= current.bottleneck_ms * (1.0 - margin)


def same_placement(a: Plan, b: Plan) -> bool:
    return [(s.first, s.end, s.node) for s in a.stages] == [(s.first, s.end, s.node)
                                                             for s in b.stages]
