"""`optimal`: the exact optimum of the DESIGN.md objective (smallest bottleneck, then smallest
latency), with a proof or an honest lower bound.

Why it is exact. A plan is a path through the DAG of (segment boundary, node) states; the only
rule a path can break is "each node holds at most one stage". Relaxing that rule for all nodes
but a *critical* set K gives a label-setting DP (relaxed.best_path) whose optimum is a lower
bound, and which is the true optimum as soon as its best path uses each node once. Decremental
state-space relaxation: solve with K = {}, add the nodes the best path repeats to K, solve
again; K only grows, so the loop ends, at worst with K = every node (the exact problem).

1. Bottleneck: the min-max DP over K gives a lower bound V. If its path, or a path the quick
   chain search finds with every cost <= V, is valid, V is the optimum T*. Otherwise phase 2
   is run with the threshold V: it ends with a valid plan (V = T*) or with the proof that no
   plan fits under V, having grown K, so the next min-max DP returns a larger V.
2. Latency: with every cost capped at T* (times 1 + TIE, for float rounding), the min-sum DP
   over K, grown the same way, ends with a valid path: the least latency among optimal plans.
   Each round also runs the DP on the mirrored instance (segments backwards): its values and
   the forward ones are lower bounds from either side, and with the best known plan (local
   search, local.py) they discard every label that cannot beat it.

The DP may keep up to 2^|K| labels per state, so it runs only while its predicted time and
memory fit (MAX_DP_S, MAX_CRITICAL, MAX_LABELS, the deadline). Past that, phase 1 becomes a
binary search over the finitely many candidate bottlenecks (each a stage compute or a hop
time) from the last bound upwards, each test settled by the chain search (a valid plan:
feasible) or by HiGHS on the flow MILP (partitioner.algorithms.flow; proven feasible or
infeasible), and phase 2 becomes that MILP with the latency objective. Anything that runs out
of time stops the search: the result keeps the best plan found, proven=False, and the largest
lower bound established."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from partitioner.algorithms import relaxed
from partitioner.algorithms.chains import chain_search, repair
from partitioner.algorithms.flow import solve_flow
from partitioner.algorithms.local import descend, improve
from partitioner.algorithms.tables import (
    Candidates,
    OutOfTime,
    Path,
    key_of,
    path_latency,
)
from partitioner.instance import InfeasibleError

# Costs within this relative distance of the optimal bottleneck count as equal to it when the
# latency is minimised: rounding in sums of floats must not turn a tie into a strict order.
TIE = 1e-9
# Limits of the masked DP: the critical set (masks are int64), and the labels it keeps (about
# 50 bytes each). Within them, the time left decides (see _Clock).
MAX_CRITICAL = 62
MAX_LABELS = 4_000_000
# A DP predicted to take longer than this hands over to the MILP: the prediction is rough, and
# one runaway DP must not hold the whole search.
MAX_DP_S = 8.0
# Seconds per table entry that relaxed.useful_arcs takes to scan before the DP proper starts
# (measured: 300 segments x 200 nodes, 30 M entries, 11 s on the loaded 2-core machine):
# a DP whose set-up alone would overrun the time left is not started.
ARC_SCAN_S = 3e-7
# Share of the time left for the heuristic descent before the proof starts.
DESCENT_SHARE = 0.25
# Labels per layer of the beam search that seeds the latency phase with a good plan.
BEAM = 500


@dataclass
class ExactResult:
    path: Path                  # empty only when time ran out before any plan was found
    proven: bool
    lower_bound_ms: float       # on the bottleneck


class _Clock:
    """The deadline, and how many labels one more masked DP may keep before it: its time grows
    with its labels, at a rate learnt from the DPs run so far."""

    def __init__(self, time_limit_s: float | None) -> None:
        self.deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
        self.per_label_s = 2e-6     # measured on this project's 2-core machine

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    def share(self, fraction: float) -> float:
        """A deadline `fraction` of the time left away (of MAX_DP_S without a limit)."""
        left = self.remaining()
        return time.monotonic() + fraction * (MAX_DP_S if left is None else left)

    def dp(self, stage: np.ndarray, hop: np.ndarray, combine: str, critical: list[int],
           threshold: float, upper: float, bounds: relaxed.Bounds) -> relaxed.Relaxed | None:
        """Run the masked DP unless it would overrun the deadline, MAX_DP_S, MAX_CRITICAL or
        MAX_LABELS (None)."""
        left = self.remaining()
        if len(critical) > MAX_CRITICAL or (left is not None and left <= 0):
            return None
        allowed = min(MAX_DP_S, math.inf if left is None else left)
        if (stage.size + hop.size) * ARC_SCAN_S > allowed:
            return None         # even its set-up (relaxed.useful_arcs) would overrun
        start = time.monotonic()
        result = relaxed.best_path(stage, hop, combine, critical, threshold, upper, bounds,
                                   min(MAX_LABELS, allowed / self.per_label_s),
                                   deadline=start + allowed)
        if result is not None and result.labels > 100_000:
            # Large DPs only: below that the fixed costs dominate and would skew the rate.
            self.per_label_s = (time.monotonic() - start) / result.labels
        return result


def exact_search(stage: np.ndarray, hop: np.ndarray, incumbent: Path | None = None,
                 time_limit_s: float | None = None) -> ExactResult:
    """The optimum by the two phases of the module docstring. `incumbent` is any valid path:
    its costs prune the DPs and it is the answer if time runs out before a better one."""
    search = _Search(stage, hop, _Clock(time_limit_s))
    search.keep(incumbent)
    bounds = relaxed.reach(stage, hop, math.inf, "max")
    lower, refuted = 0.0, -math.inf
    while True:
        upper = search.key(search.best)[0]
        found = search.clock.dp(stage, hop, "max", search.critical, math.inf, upper, bounds)
        if found is None or found.value <= refuted:
            # The DP has grown too costly, or the MILP refuted its bound without growing the
            # critical set: the binary search takes over (see the module docstring).
            return search.bisect(max(lower, np.nextafter(refuted, math.inf)))
        if math.isinf(found.value):
            if search.best is None:
                raise InfeasibleError(_infeasible_reason(search.critical))
            # Nothing within the incumbent's bottleneck but itself.
            return search.least_latency(upper).result(upper, search)
        lower = max(lower, found.value)
        if relaxed.distinct(found.path):
            return search.least_latency(found.value).result(found.value, search)
        chain = chain_search(stage, hop, found.value, deadline=search.clock.deadline)
        if chain.path is not None:
            return search.least_latency(found.value).result(found.value, search)
        if chain.exhausted:
            # No plan fits under V: the next candidates are settled by the binary search,
            # whose tests the chain search mostly proves either way in this case.
            return search.bisect(np.nextafter(found.value, math.inf))
        if not search.critical and search.best:
            # First round: a quick descent from the incumbent towards V gives every later DP
            # a tighter upper bound (and auto a better answer if time runs out).
            search.keep(descend(stage, hop, search.best, found.value,
                                search.clock.share(DESCENT_SHARE)))
        # V = found.value is a lower bound that no quick search could reach: settle it with
        # the latency search capped at V, which either finds the optimum (V is feasible) or
        # proves that nothing fits under V and grows the critical set on the way.
        search.keep(repair(stage, hop, found.path, math.inf))
        outcome = search.least_latency(found.value)
        if outcome.status != "infeasible":
            return outcome.result(found.value, search)
        refuted = found.value
        bounds = bounds.tightened(ready=found.ready, done=found.done)


@dataclass
class _Outcome:
    status: str                 # "optimal", "infeasible" or "timeout"
    path: Path | None = None

    def result(self, bottleneck: float, search: _Search) -> ExactResult:
        """The answer once `bottleneck` is known to be optimal."""
        if self.status == "optimal":
            return ExactResult(self.path, True, bottleneck)
        # Out of time: the bottleneck is optimal, the latency perhaps not.
        search.keep(self.path)
        return ExactResult(search.best or [], False, bottleneck)


class _Search:
    """State shared by the phases: the best plan so far, the critical set, the clock."""

    def __init__(self, stage: np.ndarray, hop: np.ndarray, clock: _Clock) -> None:
        self.stage, self.hop, self.clock = stage, hop, clock
        self.mirrored = relaxed.reverse(stage, hop)
        self.best: Path | None = None
        self.critical: list[int] = []

    def key(self, path: Path | None) -> tuple[float, float]:
        return key_of(self.stage, self.hop, path)

    def keep(self, path: Path | None) -> None:
        if path and self.key(path) < self.key(self.best):
            self.best = path

    def least_latency(self, threshold: float) -> _Outcome:
        """Phase 2 at `threshold`: the least-latency valid plan with every cost <= threshold
        (optimal), or the proof that there is none (infeasible), or timeout with the best
        plan found."""
        stage, hop, s = self.stage, self.hop, self.stage.shape[0] - 1
        tied = threshold * (1 + TIE)
        bounds = relaxed.reach(stage, hop, tied, "sum")
        if not bounds.feasible:
            return _Outcome("infeasible")
        best = self.best if self.best and self.key(self.best)[0] <= tied else None
        if best:
            best = improve(stage, hop, best, tied, deadline=self.clock.deadline)
        n = stage.shape[2]
        if n <= MAX_CRITICAL and not self.clock.expired():
            # A beam search with every node critical: a valid plan, usually near the optimum,
            # so the exact DPs below start with a tight upper bound.
            guess = relaxed.best_path(stage, hop, "sum", list(range(n)), tied,
                                      path_latency(stage, hop, best), bounds, beam=BEAM,
                                      deadline=self.clock.deadline)
            if guess is not None and guess.path and \
                    path_latency(stage, hop, guess.path) < path_latency(stage, hop, best):
                best = improve(stage, hop, guess.path, tied, deadline=self.clock.deadline)
        while True:
            upper = path_latency(stage, hop, best)
            found = self.clock.dp(stage, hop, "sum", self.critical, tied, upper, bounds)
            if found is None:
                if self.clock.expired():
                    return _Outcome("timeout", best)
                result = solve_flow(stage, hop, tied, latency=True,
                                    time_limit_s=self.clock.remaining(), prune_above=upper,
                                    bounds=bounds)
                if result.status == "infeasible":
                    # Nothing under the pruning limit: the known plan is the best there is.
                    return _Outcome("optimal", best) if best else _Outcome("infeasible")
                if result.proven:
                    return _Outcome("optimal", result.path)
                if result.path and path_latency(stage, hop, result.path) < upper:
                    best = result.path
                return _Outcome("timeout", best)
            if math.isinf(found.value):
                return _Outcome("optimal", best) if best else _Outcome("infeasible")
            if relaxed.distinct(found.path):
                return _Outcome("optimal", found.path)
            fixed = repair(stage, hop, found.path, tied)
            if fixed and path_latency(stage, hop, fixed) < upper:
                best = improve(stage, hop, fixed, tied, deadline=self.clock.deadline)
            bounds = bounds.tightened(ready=found.ready, done=found.done)
            self.critical.extend(relaxed.repeated(found.path))
            # The mirrored DP tightens the other side of the bounds and is a second chance at
            # a valid path.
            back = self.clock.dp(*self.mirrored, "sum", self.critical, tied,
                                 path_latency(stage, hop, best), bounds.reversed())
            if back is None:
                continue
            if math.isinf(back.value):
                return _Outcome("optimal", best) if best else _Outcome("infeasible")
            if relaxed.distinct(back.path):
                return _Outcome("optimal", relaxed.unreverse(back.path, s))
            bounds = bounds.finishing_from(back)
            self.critical.extend(v for v in relaxed.repeated(back.path)
                                 if v not in self.critical)

    def bisect(self, lower: float) -> ExactResult:
        result = _bisect(self.stage, self.hop, lower, self.best, self.clock)
        if result.latency_proven:
            return ExactResult(result.path, True, result.lower_bound_ms)
        self.keep(result.path)
        if not result.proven:
            return ExactResult(self.best or [], False, result.lower_bound_ms)
        return self.least_latency(result.lower_bound_ms).result(result.lower_bound_ms, self)


@dataclass
class _Bisection:
    path: Path | None
    proven: bool                # the bottleneck is optimal
    lower_bound_ms: float
    latency_proven: bool = False


def _bisect(stage: np.ndarray, hop: np.ndarray, lower: float, best: Path | None,
            clock: _Clock) -> _Bisection:
    """Smallest feasible candidate bottleneck >= lower (see the module docstring). The DP's
    bound is usually the optimum itself, so the first test is at the bound, and asks the MILP
    for the least latency too: when that is feasible both phases are done at once. The
    candidates are never all sorted (tables.Candidates): thresholds come from a sample until
    the interval is small enough to list, then from the list, as a plain binary search."""
    values = Candidates(stage, hop, clock.deadline)
    hi = key_of(stage, hop, best)[0] if best else math.inf
    # (a bound at or above the incumbent's bottleneck proves it optimal)
    lo, witness, first = min(lower, hi), best, True
    # Invariant: every candidate below lo is infeasible; hi is a feasible candidate (witness's
    # bottleneck is at most hi), or inf with no plan yet.
    while lo < hi and not clock.expired():
        try:
            threshold, after = values.pick(lo, hi, first)
        except OutOfTime:
            break
        if threshold is None:
            lo = hi         # no candidate in [lo, hi): hi is the least (inf: no plan at all)
            break
        chain = chain_search(stage, hop, threshold, deadline=clock.deadline)
        found = chain.path
        if chain.exhausted:
            lo, first = after, False
            continue
        if found is None:
            if clock.expired():
                break       # (building the MILP alone takes seconds on big instances)
            result = solve_flow(stage, hop, threshold * (1 + TIE) if first else threshold,
                                latency=first, time_limit_s=clock.remaining())
            if result.status == "unknown":
                break
            if result.status == "infeasible":
                lo, first = after, False
                continue
            found = result.path
            if first and result.proven:
                return _Bisection(found, True, threshold, latency_proven=True)
        hi, witness, first = threshold, found, False
    if math.isinf(lo) and witness is None:
        raise InfeasibleError(_infeasible_reason([0]))
    return _Bisection(witness, lo == hi, lo)


def _infeasible_reason(critical: list[int]) -> str:
    if not critical:
        return ("no chain of stages fits the nodes' memory and is connected by links from "
                "the source and back to it")
    return ("no plan places each stage on its own node: too few nodes fit the segments' "
            "memory and are connected by links")

