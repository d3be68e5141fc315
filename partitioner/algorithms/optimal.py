"""`optimal`: the exact optimum of the DESIGN.md objective (smallest bottleneck, then smallest
latency), with a proof or an honest lower bound.

Why it is exact. A plan is a path through the DAG of (segment boundary, node) states; the only
rule a path can break is "each node holds at most one stage". Relaxing that rule for all nodes
but a *critical* set K gives a dynamic programme (relaxed.best_path) whose optimum is a lower
bound, and which is the true optimum as soon as its best path uses each node once. Decremental
state-space relaxation: solve with K = {}, add the nodes the best path repeats to K, solve
again; K only grows, so the loop ends, at worst with K = every node (the exact problem).

1. Bottleneck: the min-max DP over K gives a lower bound V. If its path, or any path found by
   the quick chain search with every cost <= V, is valid, then V is the optimum T*.
2. Latency: with every cost capped at T* (times 1 + TIE, for float rounding), the min-sum DP
   over K, grown the same way, ends with a valid path: the least latency among optimal plans.

The DP costs 2^|K| times the relaxed one, so it is run only while its predicted time and
memory fit (MAX_DP_S, MAX_CRITICAL, MAX_CELLS, the deadline). Past that, phase 1
becomes a binary search over the finitely many candidate bottlenecks (each a stage compute or
a hop time) from V upwards, each test settled by the chain search (a valid plan: feasible) or
by HiGHS on the flow MILP (partitioner.algorithms.flow; proven feasible or infeasible), and
phase 2 becomes that MILP with the latency objective. Anything that runs out of time stops
the search: the result keeps the best plan found, proven=False, and the largest lower bound
established (the smallest candidate not proven infeasible)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from partitioner.algorithms import relaxed
from partitioner.algorithms.chains import chain_search, repair
from partitioner.algorithms.flow import solve_flow
from partitioner.algorithms.tables import Path, key_of, path_latency
from partitioner.instance import InfeasibleError

# Costs within this relative distance of the optimal bottleneck count as equal to it when the
# latency is minimised: rounding in sums of floats must not turn a tie into a strict order.
TIE = 1e-9
# Limits of the masked DP: the critical set, and the values it keeps (states x masks; 2^24
# float64 = 128 MiB per array). Within them, the time left decides (see _Clock).
MAX_CRITICAL = 16
MAX_CELLS = 1 << 24
# A DP predicted to take longer than this hands over to the MILP, which on such instances
# (many stages fighting for the same fast nodes) usually proves faster.
MAX_DP_S = 8.0


@dataclass
class ExactResult:
    path: Path                  # empty only when time ran out before any plan was found
    proven: bool
    lower_bound_ms: float       # on the bottleneck
    critical: int = 0           # size of the final critical set
    milp_calls: int = 0


def candidates(stage: np.ndarray, hop: np.ndarray, low: float, high: float) -> np.ndarray:
    """Every finite cost value in [low, high], sorted and unique: the bottleneck is one."""
    values = [a[(a >= low) & (a <= high) & np.isfinite(a)] for a in (stage, hop)]
    return np.unique(np.concatenate(values))


class _Clock:
    """The deadline, and a guess of whether one more masked DP still fits before it: a DP costs
    a fixed part (the first, unmasked run) plus a part that doubles with each critical node."""

    def __init__(self, time_limit_s: float | None) -> None:
        self.deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
        self.base_s: float | None = None
        self.last: tuple[int, float] = (0, 0.0)   # critical set size, seconds

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    def dp(self, stage: np.ndarray, hop: np.ndarray, combine: str, critical: list[int],
           threshold: float = math.inf, upper: float = math.inf) -> tuple[float, Path] | None:
        """Run the masked DP unless it would overrun the deadline or MAX_CRITICAL or
        MAX_CELLS (None)."""
        if len(critical) > MAX_CRITICAL:
            return None
        left = self.remaining()
        if self.base_s is not None:
            size, seconds = self.last
            guess = self.base_s + max(0.0, seconds - self.base_s) * 2 ** (len(critical) - size)
            if guess > min(MAX_DP_S, math.inf if left is None else left):
                return None
        start = time.monotonic()
        result = relaxed.best_path(stage, hop, combine, critical, threshold, upper, MAX_CELLS)
        elapsed = time.monotonic() - start
        if self.base_s is None:
            self.base_s = elapsed
        if result is not None:
            self.last = (len(critical), elapsed)
        return result


def exact_search(stage: np.ndarray, hop: np.ndarray, incumbent: Path | None = None,
                 time_limit_s: float | None = None) -> ExactResult:
    """The optimum by the two phases of the module docstring. `incumbent` is any valid path:
    its costs prune the DPs and it is the answer if time runs out before a better one."""
    clock = _Clock(time_limit_s)
    best = incumbent

    def keep(path: Path | None) -> None:
        nonlocal best
        if path and key_of(stage, hop, path) < key_of(stage, hop, best):
            best = path

    critical: list[int] = []
    lower = 0.0
    while True:
        upper = key_of(stage, hop, best)[0]
        solved = clock.dp(stage, hop, "max", critical, upper=upper)
        if solved is None:
            # The DP has grown too costly: the MILP takes over (see the module docstring).
            if clock.expired():
                return ExactResult(best or [], False, lower, len(critical))
            result = _bisect(stage, hop, lower, best, clock)
            if result.latency_proven:
                return ExactResult(result.path, True, result.lower_bound_ms, len(critical),
                                   result.milp_calls)
            keep(result.path)
            if not result.proven:
                return ExactResult(best or [], False, result.lower_bound_ms, len(critical),
                                   result.milp_calls)
            optimum = result.lower_bound_ms
            break
        value, path = solved
        if math.isinf(value):
            if best is None:
                raise InfeasibleError(_infeasible_reason(critical))
            # Only float noise hides the incumbent from the DP: nothing beats it.
            optimum = upper
            break
        lower = value
        if relaxed.distinct(path):
            keep(path)
            optimum = value
            break
        found = chain_search(stage, hop, value)
        if found is not None:
            keep(found)
            optimum = value
            break
        keep(repair(stage, hop, path, math.inf))
        critical += relaxed.repeated(path)

    # Phase 2. `best` now has the optimal bottleneck; its latency is the upper limit.
    tied = optimum * (1 + TIE)
    calls = 0
    while True:
        upper = path_latency(stage, hop, best)
        solved = clock.dp(stage, hop, "sum", critical, tied, upper)
        if solved is None:
            if clock.expired():
                break
            calls += 1
            result = solve_flow(stage, hop, tied, latency=True, time_limit_s=clock.remaining(),
                                prune_above=upper)
            if result.status == "infeasible":
                # Nothing under the pruning limit: the known plan is the best there is.
                return ExactResult(best, True, optimum, len(critical), calls)
            if result.path and path_latency(stage, hop, result.path) <= upper:
                if result.proven:
                    return ExactResult(result.path, True, optimum, len(critical), calls)
                best = result.path
            break
        value, path = solved
        if math.isinf(value):
            return ExactResult(best, True, optimum, len(critical), calls)
        if relaxed.distinct(path):
            return ExactResult(path, True, optimum, len(critical), calls)
        fixed = repair(stage, hop, path, tied)
        if fixed and path_latency(stage, hop, fixed) < upper:
            best = fixed
        critical += relaxed.repeated(path)
    # Out of time in phase 2: the bottleneck is optimal, the latency perhaps not.
    return ExactResult(best, False, optimum, len(critical), calls)


@dataclass
class _Bisection:
    path: Path | None
    proven: bool                # the bottleneck is optimal
    lower_bound_ms: float
    milp_calls: int
    latency_proven: bool = False


def _bisect(stage: np.ndarray, hop: np.ndarray, lower: float, best: Path | None,
            clock: _Clock) -> _Bisection:
    """Smallest feasible candidate bottleneck >= lower (see the module docstring). The DP's
    bound is usually the optimum itself, so the first test is at the bound, and asks the MILP
    for the least latency too: when that is feasible both phases are done at once."""
    upper = key_of(stage, hop, best)[0]
    values = candidates(stage, hop, lower, upper)
    lo, hi = 0, len(values) - 1 if best else len(values)
    witness, calls, first = best, 0, True
    # Invariant: every candidate below values[lo] is infeasible; values[hi] is feasible (or,
    # with no plan yet, hi is past the end).
    while lo < hi:
        mid = lo if first else (lo + hi) // 2
        threshold = float(values[mid])
        found = chain_search(stage, hop, threshold)
        if found is None:
            if clock.expired():
                break
            calls += 1
            result = solve_flow(stage, hop, threshold * (1 + TIE) if first else threshold,
                                latency=first, time_limit_s=clock.remaining())
            if result.status == "unknown":
                break
            if result.status == "infeasible":
                lo, first = mid + 1, False
                continue
            found = result.path
            if first and result.proven:
                return _Bisection(found, True, threshold, calls, latency_proven=True)
        hi, witness, first = mid, found, False
    if lo >= len(values):
        raise InfeasibleError(_infeasible_reason([0]))
    return _Bisection(witness, lo == hi, float(values[lo]), calls)


def _infeasible_reason(critical: list[int]) -> str:
    if not critical:
        return ("no chain of stages fits the nodes' memory and is connected by links from "
                "the source and back to it")
    return ("no plan places each stage on its own node: too few nodes fit the segments' "
            "memory and are connected by links")

