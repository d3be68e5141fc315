"""Partition + placement: the algorithms behind `--algorithm`, all on the same cost model.

Division of labour: partitioner.instance owns the instance, the plan and the one cost function
(plan_cost); tables.py turns an instance into cost arrays; this package only searches. Every
algorithm returns a path of (first, end, node) stages and `solve` turns it into a Plan through
Plan.of, so what a plan reports is always computed by plan_cost.

- optimal.py    exact: decremental state-space relaxation over a label-setting DP
                (relaxed.py), HiGHS on a flow MILP (flow.py) as the fallback proof, quick
                searches for upper bounds (chains.py, local.py); optimal=True only when proven.
- seifer.py     the published method (min-sum partition, minsum.py; K-path matching).
- greedy.py     the published joint baseline (min-sum partition, widest-next-hop chains).
- randomised.py the published random baseline.
- auto          (here) the better of seifer and greedy as the incumbent, then the exact search
                within the time budget: proven optimal, or the best plan found with a lower
                bound (so never worse than either baseline).
"""

from __future__ import annotations

import time

from formats.errors import InputError
from partitioner.algorithms.greedy import greedy
from partitioner.algorithms.optimal import ExactResult, exact_search
from partitioner.algorithms.randomised import random_plan
from partitioner.algorithms.seifer import seifer
from partitioner.algorithms.tables import (
    OutOfTime,
    Path,
    Tables,
    check_basic_feasibility,
    check_size,
)
from partitioner.instance import InfeasibleError, Instance, Plan

ALGORITHMS = ("auto", "optimal", "seifer", "greedy", "random")
AUTO_BUDGET_S = 2.0
# `optimal` without a time limit has no budget of its own; this only keeps a hopeless instance
# from running forever (it then answers optimal=false with its lower bound, like auto).
OPTIMAL_CAP_S = 300.0


def solve(instance: Instance, algorithm: str = "auto", time_limit_s: float | None = None,
          seed: int = 0) -> Plan:
    """Plan `instance` with `algorithm`. `time_limit_s` bounds the whole call for auto
    (default AUTO_BUDGET_S) and optimal (default OPTIMAL_CAP_S); stopped by it, both return
    the best plan found with a certified lower bound (the gap). `seed` drives the randomised
    baselines. InfeasibleError (with the reason) when no plan exists, or when a baseline
    finds none; InputError for an unknown algorithm."""
    if algorithm not in ALGORITHMS:
        raise InputError(f"unknown algorithm {algorithm!r} (one of {', '.join(ALGORITHMS)})",
                         field="--algorithm")
    started = time.monotonic()
    check_size(instance)
    tables = Tables.of(instance)
    check_basic_feasibility(tables)
    lower_bound = None
    proven = False
    if algorithm == "seifer":
        path = seifer(tables, seed)
    elif algorithm == "greedy":
        path = greedy(tables)
    elif algorithm == "random":
        path = random_plan(tables, seed)
    else:
        default = OPTIMAL_CAP_S if algorithm == "optimal" else AUTO_BUDGET_S
        budget = default if time_limit_s is None else time_limit_s
        tables.deadline = started + budget
        incumbent = _best_baseline(tables, seed)
        try:
            stage, hop = tables.stage, tables.hop
        except OutOfTime:
            # Not even the cost tables were built in time: the baselines' plan.
            result = ExactResult(incumbent or [], False, 0.0)
        else:
            left = max(0.0, budget - (time.monotonic() - started))
            result = exact_search(stage, hop, incumbent, left)
        # No plan yet only when time ran out first and both baselines failed: draw one.
        path = result.path or random_plan(tables, seed)
        proven = result.proven
        # (the search's bound is 0 when it was stopped before its first round)
        lower_bound = None if proven else max(result.lower_bound_ms, tables.quick_bound())
    plan = Plan.of(instance, tables.stages(path), algorithm, proven, lower_bound,
                   time.monotonic() - started)
    if lower_bound is not None:
        # The search's sums and plan_cost's may differ in the last bits (and costs within TIE
        # count as tied): a bound a hair above the plan would print a negative gap.
        plan.lower_bound_ms = min(lower_bound, plan.bottleneck_ms)
    return plan


def _best_baseline(tables: Tables, seed: int) -> Path | None:
    """The better of greedy and seifer (either may fail on its own terms, or run out of the
    time limit on a huge instance): auto starts from it, so it is never worse than either."""
    best = None
    for heuristic in (greedy, lambda t: seifer(t, seed)):
        try:
            path = heuristic(tables)
        except (InfeasibleError, OutOfTime):
            continue
        if tables.key(path) < tables.key(best):
            best = path
    return best
