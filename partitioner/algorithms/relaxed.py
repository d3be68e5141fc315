"""The relaxation every exact and bounding step works on: plans in which a node may hold several
stages, as long as they are not consecutive, except the nodes of a *critical* set, which hold
at most one. Over (boundary, node, used critical nodes) states it is a DAG, so its optimum is a
dynamic programme; it bounds the true optimum from below, and when its best path happens to use
each node once it *is* the optimum (optimal.py grows the critical set until it does).

States: `ready[b, w]` = boundary b's data has arrived on w (a stage may start there);
`done[b, u]` = a stage on u has just finished segment b-1 (its output is at u). Objectives:
"max" (the bottleneck) or "sum" (the latency), always over arcs costing <= a threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from partitioner.algorithms.tables import Path

# Relative slack when pruning against a known value: float sums must not cut off a tie.
SLACK = 1e-9


def _join(combine: str):  # noqa: ANN202 - a numpy ufunc
    return np.maximum if combine == "max" else np.add


def capped(costs: np.ndarray, threshold: float) -> np.ndarray:
    return costs if math.isinf(threshold) else np.where(costs <= threshold, costs, math.inf)


@dataclass
class Reach:
    """Best relaxed value from the source to each state (`ready`, `done`) and from each state
    back to the source (`finish_ready`, `finish_done`), critical set empty; inf where no path
    exists. Finite on both sides = the state lies on some relaxed path."""

    ready: np.ndarray         # (S, N)
    done: np.ndarray          # (S+1, N)
    finish_ready: np.ndarray  # (S, N)
    finish_done: np.ndarray   # (S+1, N)

    @property
    def feasible(self) -> bool:
        return bool(np.isfinite(self.ready[0] + self.finish_ready[0]).any())


def reach(stage: np.ndarray, hop: np.ndarray, threshold: float = math.inf,
          combine: str = "sum") -> Reach:
    """Forward and backward relaxed optima over arcs costing at most `threshold`."""
    join = _join(combine)
    s, n = stage.shape[0] - 1, stage.shape[2]
    stage, hop = capped(stage, threshold), capped(hop, threshold)
    ready = np.full((s, n), math.inf)
    done = np.full((s + 1, n), math.inf)
    ready[0] = hop[0, n, :n]
    for b in range(s):
        if b > 0:
            ready[b] = join(done[b][:, None], hop[b, :n, :n]).min(axis=0)
        done[b + 1:] = np.minimum(done[b + 1:], join(ready[b][None, :], stage[b, b + 1:, :]))
    finish_done = np.full((s + 1, n), math.inf)
    finish_ready = np.full((s, n), math.inf)
    finish_done[s] = hop[s, :n, n]
    for b in range(s - 1, -1, -1):
        finish_ready[b] = join(stage[b, b + 1:, :], finish_done[b + 1:]).min(axis=0)
        if b > 0:
            finish_done[b] = join(hop[b, :n, :n], finish_ready[b][None, :]).min(axis=1)
    return Reach(ready, done, finish_ready, finish_done)


@dataclass
class Arcs:
    """The arcs that lie on some relaxed path whose value is <= an upper limit."""

    stage: np.ndarray   # (k, 3) first, end, node
    hop: np.ndarray     # (k, 3) boundary, from, to   (source and sink are node N)


def useful_arcs(stage: np.ndarray, hop: np.ndarray, threshold: float, combine: str,
                upper: float = math.inf) -> Arcs:
    """Arcs through which the best relaxed path is finite and at most `upper` (with SLACK)."""
    s, n = stage.shape[0] - 1, stage.shape[2]
    join = _join(combine)
    r = reach(stage, hop, threshold, combine)
    limit = upper * (1 + SLACK)
    stage, hop = capped(stage, threshold), capped(hop, threshold)

    def keep(through: np.ndarray) -> np.ndarray:
        return np.isfinite(through) & (through <= limit)

    stage_keep = keep(join(join(r.ready[:, None, :], stage[:s]), r.finish_done[None, :, :]))
    hop_keep = np.zeros((s + 1, n + 1, n + 1), dtype=bool)
    hop_keep[1:s, :n, :n] = keep(join(join(r.done[1:s, :, None], hop[1:s, :n, :n]),
                                      r.finish_ready[1:, None, :]))
    hop_keep[0, n, :n] = keep(join(hop[0, n, :n], r.finish_ready[0]))
    hop_keep[s, :n, n] = keep(join(r.done[s], hop[s, :n, n]))
    return Arcs(np.argwhere(stage_keep), np.argwhere(hop_keep))


def best_path(stage: np.ndarray, hop: np.ndarray, combine: str, critical: list[int] = (),
              threshold: float = math.inf, upper: float = math.inf,
              max_cells: int | None = None) -> tuple[float, Path] | None:
    """Best relaxed path with every cost <= threshold in which the `critical` nodes appear at
    most once; (inf, []) when there is none with value <= `upper`; None when the DP would keep
    more than `max_cells` values (states x masks).

    The critical nodes used so far are a bit mask carried by every state, so the work grows as
    2^len(critical) times the number of useful arcs (those on a relaxed path within `upper`:
    a good upper bound prunes most of them)."""
    join = _join(combine)
    s, n = stage.shape[0] - 1, stage.shape[2]
    arcs = useful_arcs(stage, hop, threshold, combine, upper)
    if not len(arcs.stage):
        return math.inf, []
    masks = 1 << len(critical)
    bit = np.zeros(n + 1, dtype=np.int64)
    bit[list(critical)] = 1 << np.arange(len(critical))
    every = np.arange(masks)

    # Number the live states; values are (state, mask) arrays. Column n stands for the
    # source (as sender of the input, receiver of the output): always live.
    ready_id = np.full((s + 1, n + 1), -1)
    done_id = np.full((s + 1, n + 1), -1)
    ready_id[:, n] = done_id[:, n] = 0
    starts = np.unique(arcs.stage[:, [0, 2]], axis=0)
    ends = np.unique(arcs.stage[:, [1, 2]], axis=0)
    ready_id[starts[:, 0], starts[:, 1]] = np.arange(len(starts))
    done_id[ends[:, 0], ends[:, 1]] = np.arange(len(ends))
    if max_cells is not None and (len(starts) + len(ends)) * masks > max_cells:
        return None
    ready = np.full((len(starts), masks), math.inf)
    done = np.full((len(ends), masks), math.inf)

    hops = arcs.hop
    hops = hops[(done_id[hops[:, 0], hops[:, 1]] >= 0) & (ready_id[hops[:, 0], hops[:, 2]] >= 0)]
    hops = hops[np.lexsort((hops[:, 1], hops[:, 2], hops[:, 0]))]   # by boundary, receiver
    hop_cost = hop[hops[:, 0], hops[:, 1], hops[:, 2]]
    hop_at = np.searchsorted(hops[:, 0], np.arange(s + 2))
    stage_arcs = arcs.stage                                          # sorted by first segment
    stage_cost = stage[stage_arcs[:, 0], stage_arcs[:, 1], stage_arcs[:, 2]]
    stage_at = np.searchsorted(stage_arcs[:, 0], np.arange(s + 2))
    # A critical node's stage moves mask t - bit to mask t, for the masks t that have its bit.
    with_bit = {w: every[(every & bit[w]) != 0] for w in critical}
    ready[ready_id[0, hops[:hop_at[1], 2]], 0] = hop_cost[:hop_at[1]]

    for b in range(s):
        lo, hi = hop_at[b], hop_at[b + 1]
        if b > 0 and hi > lo:
            cand = join(done[done_id[b, hops[lo:hi, 1]]], hop_cost[lo:hi, None])
            dst = ready_id[b, hops[lo:hi, 2]]
            heads = np.flatnonzero(np.r_[True, dst[1:] != dst[:-1]])
            ready[dst[heads]] = np.minimum(ready[dst[heads]],
                                           np.minimum.reduceat(cand, heads, axis=0))
        lo, hi = stage_at[b], stage_at[b + 1]
        node = stage_arcs[lo:hi, 2]
        src = ready_id[b, node]
        dst = done_id[stage_arcs[lo:hi, 1], node]   # distinct: one arc per (end, node) here
        cost = stage_cost[lo:hi, None]
        plain = bit[node] == 0
        done[dst[plain]] = np.minimum(done[dst[plain]], join(ready[src[plain]], cost[plain]))
        for w in np.unique(node[~plain]):
            sel = node == w
            t = with_bit[w]
            rows = np.ix_(dst[sel], t)
            done[rows] = np.minimum(done[rows], join(ready[src[sel]][:, t ^ bit[w]], cost[sel]))

    last_hops = np.nonzero(hops[:, 2] == n)[0]
    if not len(last_hops):
        return math.inf, []
    totals = join(done[done_id[s, hops[last_hops, 1]]], hop_cost[last_hops][:, None])
    k, mask = np.unravel_index(int(totals.argmin()), totals.shape)
    value = float(totals[k, mask])
    if math.isinf(value):
        return value, []
    return value, _unwind(stage, hop, join, stage_arcs, stage_cost, hops, hop_cost, bit,
                          ready, done, ready_id, done_id, int(hops[last_hops[k], 1]), int(mask))


def _unwind(stage: np.ndarray, hop: np.ndarray, join, stage_arcs: np.ndarray,  # noqa: ANN001
            stage_cost: np.ndarray, hops: np.ndarray, hop_cost: np.ndarray, bit: np.ndarray,
            ready: np.ndarray, done: np.ndarray, ready_id: np.ndarray, done_id: np.ndarray,
            last: int, mask: int) -> Path:
    """Walk back from the best final state: each value was computed as join(predecessor, arc)
    and kept by min, so recomputing the same expression finds a predecessor exactly."""
    s, n = stage.shape[0] - 1, stage.shape[2]
    path: Path = []
    end, node = s, last
    while True:
        target = done[done_id[end, node], mask]
        arcs = np.nonzero((stage_arcs[:, 1] == end) & (stage_arcs[:, 2] == node))[0]
        before = mask & ~int(bit[node])
        first = next(int(stage_arcs[a, 0]) for a in arcs
                     if join(ready[ready_id[stage_arcs[a, 0], node], before],
                             stage_cost[a]) == target)
        path.append((first, end, node))
        mask = before
        if first == 0:
            return path[::-1]
        target = ready[ready_id[first, node], mask]
        arcs = np.nonzero((hops[:, 0] == first) & (hops[:, 2] == node) & (hops[:, 1] < n))[0]
        node = next(int(hops[a, 1]) for a in arcs
                    if join(done[done_id[first, hops[a, 1]], mask], hop_cost[a]) == target)
        end = first


def distinct(path: Path) -> bool:
    nodes = [v for _, _, v in path]
    return len(set(nodes)) == len(nodes)


def repeated(path: Path) -> list[int]:
    nodes = [v for _, _, v in path]
    return sorted({v for v in nodes if nodes.count(v) > 1})
