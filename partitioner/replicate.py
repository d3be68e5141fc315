"""Data parallelism: several copies of the pipeline side by side on disjoint nodes.

Division of labour: `partitioner.algorithms.solve` finds the best single pipeline over a set
of nodes; this module decides how many pipelines to run and which nodes each gets, and
builds the combined plan (`Plan.chains`) whose cost `partitioner.instance.pipelines_cost`
states: the dispatcher deals requests to the pipelines in turn, so R pipelines whose slowest
has bottleneck b deliver R x 1000 / b requests a second, unless the source's own link is
slower.

Why it is needed: a single pipeline cannot go faster than its slowest unsplittable piece.
ResNet-50 on 0.1-core hosts behind 100 Mbit links is stuck at ~3.7 requests/s from 6 hosts
on, whatever the host count (its early cut points carry 1.6-3.2 MB, so one stage must span
several blocks); more hosts only help as more pipelines.

The search assumes nodes of the same kind are interchangeable, which holds on the stars and
trees this testbed builds (it is a heuristic, not a proof, on mixed clusters):
1. order the nodes best first (speed, memory, bandwidth to the source);
2. solve the single pipeline over the k best nodes, for every k up to what the plan over
   all nodes uses (more nodes never help one pipeline beyond that);
3. for every pipeline count R, estimate R x the best single pipeline that fits in
   floor(N / R) nodes, capped by the source's link and the CPU budget of an emulating
   machine (`Instance.cpu_budget`); take the best R (fewest on ties: spare nodes are where
   stages go when a node fails);
4. build that many pipelines for real, each solved over the best nodes still free, and keep
   the result only if its true cost beats the single pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from partitioner.instance import (
    InfeasibleError,
    Instance,
    Node,
    Plan,
    pipelines_cost,
    restrict,
)

SolveOne = Callable[[Instance], Plan]


def ranked_nodes(instance: Instance) -> list[Node]:
    """Nodes best first: fastest, then most memory, then widest path to the source."""
    return sorted(instance.nodes, key=lambda n: (
        -n.speed, -n.memory_bytes, -(instance.bandwidth(instance.source, n.name) or 0.0),
        n.name))


def best_by_size(instance: Instance, solve_one: SolveOne, largest: int,
                 ) -> dict[int, Plan]:
    """The single pipeline over the k best nodes, k = 1..largest (infeasible sizes absent)."""
    ranked = ranked_nodes(instance)
    plans: dict[int, Plan] = {}
    for k in range(1, min(largest, len(ranked)) + 1):
        try:
            plans[k] = solve_one(restrict(instance, {n.name for n in ranked[:k]}))
        except InfeasibleError:
            continue
    return plans


def estimate(instance: Instance, by_size: dict[int, Plan], count: int) -> float:
    """Requests a second of `count` pipelines, each the best that fits floor(N / count)
    nodes, costed as copies of it (the shared source link and CPU budget included)."""
    room = len(instance.nodes) // count
    fitting = [plan for k, plan in by_size.items() if k <= room]
    if not fitting:
        return 0.0
    bottleneck = min(pipelines_cost(instance, [plan.stages] * count)[0] for plan in fitting)
    return 1000.0 / bottleneck if bottleneck > 0 else math.inf


def replicate(instance: Instance, solve_one: SolveOne, max_pipelines: int | None = None,
              ) -> Plan:
    """The best plan of one or more pipelines (module docstring); `max_pipelines` caps R."""
    single = solve_one(instance)
    limit = len(instance.nodes) if max_pipelines is None else max_pipelines
    if limit <= 1 or len(instance.nodes) < 2:
        return single
    by_size = best_by_size(instance, solve_one, len(single.stages))
    best_count = max(range(1, limit + 1), key=lambda r: (estimate(instance, by_size, r), -r))
    if best_count == 1:
        return single
    room = len(instance.nodes) // best_count
    free = ranked_nodes(instance)
    pipelines: list[Plan] = []
    for _ in range(best_count):
        try:
            plan = solve_one(restrict(instance, {n.name for n in free[:room]}))
        except InfeasibleError:
            break
        used = {s.node for s in plan.stages}
        free = [n for n in free if n.name not in used]
        pipelines.append(plan)
    if len(pipelines) < 2:
        return single
    stages = [stage for plan in pipelines for stage in plan.stages]
    combined = Plan.of(instance, stages, f"{single.algorithm}x{len(pipelines)}",
                       optimal=False, chains=tuple(len(p.stages) for p in pipelines))
    return combined if combined.bottleneck_ms < single.bottleneck_ms else single


def keep_spare(instance: Instance, plan_over: SolveOne, spare: int) -> Plan:
    """The best plan that leaves at least `spare` nodes unused (`planner: {spare: N}`): where
    a lost node's stages can go, so a loss is recovered without moving the survivors' stages.
    Greedy, one node at a time: of the nodes the plan uses, keep out the one whose absence
    costs least (on ties the one with the most memory: a spare that can hold any stage).
    Stops early, serving with what is left, when no plan fits fewer nodes."""
    names = {n.name for n in instance.nodes}
    memory = {n.name: n.memory_bytes for n in instance.nodes}
    plan = plan_over(instance)
    kept_out: set[str] = set()
    while len(names) - len({s.node for s in plan.stages}) < spare \
            and len(names - kept_out) > 1:
        best: tuple[tuple[float, int], str, Plan] | None = None
        for node in sorted({s.node for s in plan.stages}):
            try:
                candidate = plan_over(restrict(instance, names - kept_out - {node}))
            except InfeasibleError:
                continue
            key = (candidate.bottleneck_ms, -memory[node])
            if best is None or key < best[0]:
                best = (key, node, candidate)
        if best is None:
            break
        kept_out.add(best[1])
        plan = best[2]
    return plan


def plan_pipelines(instance: Instance, algorithm: str, time_limit_s: float | None,
                   seed: int, pipelines: int = 1, spare: int = 0) -> Plan:
    """The plan the testbed deploys: one pipeline (`pipelines` 1, the default), or up to
    `pipelines` side by side (0: as many as pay off); with `spare`, the best such plan that
    leaves that many nodes out (`keep_spare`)."""
    from partitioner.algorithms import solve

    def solve_one(part: Instance) -> Plan:
        return solve(part, algorithm, time_limit_s=time_limit_s, seed=seed)

    if spare:
        return keep_spare(instance, lambda part: plan_pipelines(
            part, algorithm, time_limit_s, seed, pipelines), spare)
    if pipelines == 1:
        return solve_one(instance)
    return replicate(instance, solve_one, pipelines or None)
