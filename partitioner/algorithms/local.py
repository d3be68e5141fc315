"""Heuristics on valid plans, for good upper bounds: the exact search prunes every state whose
bound exceeds the best known plan, so a plan close to the optimum makes its DPs and MILPs much
smaller, and it is what auto returns when the proof runs out of time.

`descend` lowers the bottleneck (a binary search over thresholds with quick, incomplete
tests); `improve` lowers the latency under a fixed threshold by local search. Its
neighbourhood is over node sequences (replace a node by an unused one, swap two, insert
an unused node, drop one); each sequence gets its best cuts exactly, by a DP over boundaries
(`best_cuts`), so a move is judged as if every cut were re-chosen. First improvement, until
no move helps or the evaluation budget is spent."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import numpy as np

from partitioner.algorithms import relaxed
from partitioner.algorithms.chains import chain_search, repair
from partitioner.algorithms.tables import Candidates, OutOfTime, Path, key_of

EVALUATIONS = 3000


def best_cuts(stage: np.ndarray, hop: np.ndarray, nodes: list[int],
              threshold: float) -> tuple[float, Path]:
    """Least-latency cuts for stages on `nodes` in this order, every cost <= threshold;
    (inf, []) when there are none."""
    s, n = stage.shape[0] - 1, stage.shape[2]
    reach = np.full(s + 1, math.inf)     # least latency with the chain so far ending at b
    reach[0] = 0.0
    starts = []
    previous = n
    for v in nodes:
        into = hop[:s, previous, v]
        ready = reach[:s] + np.where(into <= threshold, into, math.inf)
        work = stage[:s, :, v]
        total = ready[:, None] + np.where(work <= threshold, work, math.inf)
        start = total.argmin(axis=0)
        reach = total[start, np.arange(s + 1)]
        starts.append(start)
        previous = v
    out = hop[s, previous, n]
    value = reach[s] + (out if out <= threshold else math.inf)
    if not math.isfinite(value):
        return math.inf, []
    path: Path = []
    end = s
    for v, start in zip(reversed(nodes), reversed(starts)):
        first = int(start[end])
        path.append((first, end, v))
        end = first
    return float(value), path[::-1]


def improve(stage: np.ndarray, hop: np.ndarray, path: Path, threshold: float,
            budget: int = EVALUATIONS, deadline: float | None = None) -> Path:
    """A plan at least as good as `path` (by latency, every cost <= threshold); stops at
    `deadline` (time.monotonic()) with the best found so far."""
    n = stage.shape[2]
    nodes = [v for _, _, v in path]
    value, best = best_cuts(stage, hop, nodes, threshold)
    if not best or value > key_of(stage, hop, path)[1]:
        value, best = key_of(stage, hop, path)[1], path
    improved = True
    while improved and budget > 0:
        improved = False
        for candidate in _neighbours(nodes, n):
            budget -= 1
            if budget <= 0 or (deadline is not None and time.monotonic() > deadline):
                budget = 0
                break
            trial_value, trial = best_cuts(stage, hop, candidate, threshold)
            if trial_value < value * (1 - 1e-12):
                value, best, nodes, improved = trial_value, trial, candidate, True
                break
    return best


def _neighbours(nodes: list[int], n: int) -> Iterator[list[int]]:
    unused = [u for u in range(n) if u not in nodes]
    for i in range(len(nodes)):
        for u in unused:
            yield [*nodes[:i], u, *nodes[i + 1:]]
    for i in range(len(nodes)):
        for j in range(i + 1, len(nodes)):
            swapped = list(nodes)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            yield swapped
    if len(nodes) > 1:
        for i in range(len(nodes)):
            yield [*nodes[:i], *nodes[i + 1:]]
    for i in range(len(nodes) + 1):
        for u in unused:
            yield [*nodes[:i], u, *nodes[i:]]


def descend(stage: np.ndarray, hop: np.ndarray, path: Path, lower: float,
            deadline: float) -> Path:
    """A plan with a lower bottleneck than `path`, if quick tests find one: binary search over
    the candidate bottlenecks between `lower` (a lower bound) and the plan's, each test asking
    for a plan with every cost <= the candidate from the relaxation's least-latency path
    (repaired where it repeats nodes) or a short chain search. A heuristic: a failed test
    proves nothing, so the search may skip better plans, never return a worse one."""
    values = Candidates(stage, hop, deadline)
    lo, hi = lower, key_of(stage, hop, path)[0]
    while lo < hi and time.monotonic() < deadline:
        try:
            threshold, after = values.pick(lo, hi)
        except OutOfTime:
            break
        if threshold is None:
            break
        found = relaxed.best_path(stage, hop, "sum", [], threshold).path
        if found and not relaxed.distinct(found):
            found = repair(stage, hop, found, threshold)
        if not found:
            found = chain_search(stage, hop, threshold, max_expansions=50,
                                 deadline=deadline).path
        if found:
            hi, path = threshold, found
        else:
            lo = after
    return path
