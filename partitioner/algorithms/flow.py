"""The exact check behind `optimal`: a unit flow through the relaxed DAG of (boundary, node)
states, restricted to arcs costing at most a threshold, with one extra row per node saying it
holds at most one stage. That row is all the relaxation lacks, so an integral solution is
exactly a valid plan whose bottleneck is <= the threshold; HiGHS (branch and bound on this
MILP) either finds one, proves there is none, or runs out of time.

Arcs: source -> ready[0, w] (input hop), ready[b, w] -> done[b', w] (stage [b, b') on w),
done[b, u] -> ready[b, w] (hop of boundary b), done[S, u] -> sink (output hop). The DAG has no
cycles, so an integral unit flow is a single path."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import highspy
import numpy as np

from partitioner.algorithms.relaxed import Bounds, useful_arcs
from partitioner.algorithms.tables import OutOfTime, Path

Status = Literal["feasible", "infeasible", "unknown"]

# Relative MIP gap for the latency objective: latencies equal to 1e-9 are the same plan cost.
LATENCY_GAP = 1e-9


@dataclass
class FlowResult:
    status: Status
    path: Path | None = None
    proven: bool = False          # for the latency objective: the path's latency is optimal


@dataclass
class _Model:
    """Columns of the MILP as parallel lists (CSC built once at the end)."""

    rows: int = 0
    entries: list[tuple[int, int, float]] | None = None   # (column, row, value)
    cost: list[float] | None = None
    stages: dict[int, tuple[int, int, int]] | None = None  # column -> (first, end, node)

    def __post_init__(self) -> None:
        self.entries, self.cost, self.stages = [], [], {}

    def row(self) -> int:
        self.rows += 1
        return self.rows - 1

    def column(self, cost: float, *coefficients: tuple[int, float]) -> int:
        col = len(self.cost)
        self.cost.append(cost)
        self.entries.extend((col, r, v) for r, v in coefficients)
        return col


def solve_flow(stage: np.ndarray, hop: np.ndarray, threshold: float, *,
               latency: bool, time_limit_s: float | None, prune_above: float = math.inf,
               bounds: Bounds | None = None, max_columns: int = 200_000) -> FlowResult:
    """Find a valid plan with every cost <= threshold; with `latency`, the one of least latency.

    `prune_above` is the latency of a known valid plan: arcs on no relaxed path cheaper than
    it (by `bounds`, latency bounds for this threshold) are left out (they cannot be on a
    better plan), which shrinks the MILP many times over. If the pruned model is infeasible,
    no plan beats the known one. No MIP start is passed:
    HiGHS 1.16 misprices a start after presolve (it compares the start's objective without
    presolve's offset and stops early, "optimal" with a worse plan). Models with more than
    `max_columns` arcs are not attempted ("unknown"): HiGHS would not finish them in any budget
    we give it, and building them alone costs seconds; nor are they past `time_limit_s`
    (the arc scan stops there)."""
    s, n = stage.shape[0] - 1, stage.shape[2]
    # the time limit covers the arc scan too (seconds on 20 x 1000), not only HiGHS
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    try:
        arcs = useful_arcs(stage, hop, threshold, "sum", prune_above, bounds, deadline)
    except OutOfTime:
        return FlowResult("unknown")
    columns = len(arcs.stage) + len(arcs.hop)
    if not len(arcs.stage):
        return FlowResult("infeasible")
    if columns > max_columns:
        return FlowResult("unknown")

    m = _Model()
    ready_row = np.full((s + 1, n + 1), -1)
    done_row = np.full((s + 1, n + 1), -1)
    for b, w in np.unique(arcs.stage[:, [0, 2]], axis=0):
        ready_row[b, w] = m.row()
    for e, u in np.unique(arcs.stage[:, [1, 2]], axis=0):
        done_row[e, u] = m.row()
    source_row = m.row()
    # The source sends the input and receives the output: as a sender it is the source row,
    # as a receiver it needs no row (the flow just ends there).
    done_row[0, n] = source_row
    colour_row = [m.row() for _ in range(n)]

    for first, end, w in arcs.stage:
        col = m.column(stage[first, end, w], (ready_row[first, w], -1.0),
                       (done_row[end, w], 1.0), (colour_row[w], 1.0))
        m.stages[col] = (int(first), int(end), int(w))
    hops = arcs.hop[(done_row[arcs.hop[:, 0], arcs.hop[:, 1]] >= 0)
                    & ((arcs.hop[:, 2] == n) | (ready_row[arcs.hop[:, 0], arcs.hop[:, 2]] >= 0))]
    for b in range(s + 1):
        at = hops[hops[:, 0] == b]
        senders, receivers = np.unique(at[:, 1]), np.unique(at[:, 2])
        self_pairs = len(np.intersect1d(senders, receivers))
        complete = len(at) == len(senders) * len(receivers) - self_pairs
        if not latency and complete and len(at) > len(senders) + len(receivers):
            # Every pair may talk: route through one hub row instead of |U|*|W| arcs. The hub
            # would also let u hand over to itself, but then u holds two stages and its colour
            # row already forbids that.
            hub = m.row()
            for u in senders:
                m.column(0.0, (done_row[b, u], -1.0), (hub, 1.0))
            for w in receivers:
                m.column(0.0, (hub, -1.0), (ready_row[b, w], 1.0))
            continue
        for _, u, w in at:
            # Out of the source: +1 on the source row (it must send exactly one unit).
            sign = 1.0 if u == n else -1.0
            if w == n:
                m.column(hop[b, u, w], (done_row[b, u], sign))
            else:
                m.column(hop[b, u, w], (done_row[b, u], sign), (ready_row[b, w], 1.0))

    return _run(m, source_row, colour_row, latency, time_limit_s)


def _quiet_highs() -> highspy.Highs:
    """A Highs instance with its output off. HiGHS 1.16 prints its banner to file
    descriptor 1 when the instance is constructed, before any option can be set, which put
    two lines of text in front of `solve`'s JSON: the construction runs with descriptor 1
    pointing at stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    return h


def _run(m: _Model, source_row: int, colour_row: list[int], latency: bool,
         time_limit_s: float | None) -> FlowResult:
    cols = len(m.cost)
    entries = np.array(m.entries, dtype=float).reshape(-1, 3)
    order = np.lexsort((entries[:, 1], entries[:, 0]))
    entries = entries[order]
    start = np.searchsorted(entries[:, 0], np.arange(cols + 1))

    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = cols, m.rows
    lp.col_cost_ = np.array(m.cost) if latency else np.zeros(cols)
    lp.col_lower_, lp.col_upper_ = np.zeros(cols), np.ones(cols)
    lower = np.zeros(m.rows)
    upper = np.zeros(m.rows)
    lower[source_row] = upper[source_row] = 1.0   # one unit leaves the source
    upper[colour_row] = 1.0                       # at most one stage per node
    lp.row_lower_, lp.row_upper_ = lower, upper
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = start.astype(np.int32)
    lp.a_matrix_.index_ = entries[:, 1].astype(np.int32)
    lp.a_matrix_.value_ = entries[:, 2]
    lp.integrality_ = [highspy.HighsVarType.kInteger] * cols

    h = _quiet_highs()
    h.setOptionValue("threads", 1)       # the machine is shared; one core is plenty
    h.setOptionValue("mip_rel_gap", LATENCY_GAP)
    h.setOptionValue("mip_abs_gap", 0.0)
    # Presolve's probing spends seconds on these pure 0/1 flow models and removes little: on
    # 20 nodes x 60 segments it took 4 of 11 s; without it the same proofs take 2-6 s.
    h.setOptionValue("presolve", "off")
    if time_limit_s is not None:
        h.setOptionValue("time_limit", max(0.01, float(time_limit_s)))
    h.passModel(lp)
    h.run()
    status = h.getModelStatus()
    info = h.getInfo()
    has_solution = info.primal_solution_status == 2   # kSolutionStatusFeasible
    path = None
    if has_solution:
        values = np.array(h.getSolution().col_value)
        path = sorted(m.stages[c] for c in m.stages if values[c] > 0.5)
    if status == highspy.HighsModelStatus.kOptimal:
        return FlowResult("feasible", path, proven=True)
    if status == highspy.HighsModelStatus.kInfeasible:
        return FlowResult("infeasible")
    if path:
        return FlowResult("feasible", path, proven=False)
    return FlowResult("unknown")
