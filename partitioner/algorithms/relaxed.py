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
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from partitioner.algorithms.tables import CHUNK_ENTRIES, OutOfTime, Path

# Relative slack when pruning against a known value: float sums must not cut off a tie.
SLACK = 1e-9


def _join(combine: str) -> np.ufunc:
    return np.maximum if combine == "max" else np.add


def capped(costs: np.ndarray, threshold: float) -> np.ndarray:
    return costs if math.isinf(threshold) else np.where(costs <= threshold, costs, math.inf)


@dataclass
class Bounds:
    """Lower bounds on the best relaxed value from the source to each state (`ready`, `done`)
    and from each state back to the source (`finish_ready`, `finish_done`); inf where no path
    exists. `reach` gives them for the plain relaxation; the masked DPs tighten them."""

    ready: np.ndarray         # (S, N)
    done: np.ndarray          # (S+1, N)
    finish_ready: np.ndarray  # (S, N)
    finish_done: np.ndarray   # (S+1, N)

    @property
    def feasible(self) -> bool:
        return bool(np.isfinite(self.ready[0] + self.finish_ready[0]).any())

    def tightened(self, ready: np.ndarray | None = None, done: np.ndarray | None = None,
                  finish_ready: np.ndarray | None = None,
                  finish_done: np.ndarray | None = None) -> Bounds:
        """Bounds that take the larger of each pair (both are valid lower bounds)."""
        def tighter(old: np.ndarray, new: np.ndarray | None) -> np.ndarray:
            return old if new is None else np.maximum(old, new)

        return Bounds(tighter(self.ready, ready), tighter(self.done, done),
                      tighter(self.finish_ready, finish_ready),
                      tighter(self.finish_done, finish_done))

    def finishing_from(self, back: Relaxed) -> Bounds:
        """Tightened by a DP on the reversed instance: what reaches a state there is what
        finishes from the mirrored state here."""
        finish_done = self.finish_done.copy()
        finish_done[1:] = np.maximum(finish_done[1:], back.ready[::-1])
        return Bounds(self.ready, self.done, np.maximum(self.finish_ready, back.done[1:][::-1]),
                      finish_done)

    def reversed(self) -> Bounds:
        """The same bounds for the reversed instance (see `reverse`): what reaches a state
        there is what finishes from the mirrored state here."""
        inf = np.full((1, self.ready.shape[1]), math.inf)
        return Bounds(self.finish_done[1:][::-1], np.vstack([inf, self.finish_ready[::-1]]),
                      self.done[1:][::-1], np.vstack([inf, self.ready[::-1]]))


def reach(stage: np.ndarray, hop: np.ndarray, threshold: float = math.inf,
          combine: str = "sum", deadline: float | None = None) -> Bounds:
    """Forward and backward relaxed optima over arcs costing at most `threshold`; OutOfTime
    once time.monotonic() passes `deadline` (checked every few boundaries: 900 segments x 60
    nodes take about a second)."""
    join = _join(combine)
    s, n = stage.shape[0] - 1, stage.shape[2]

    def cap(costs: np.ndarray) -> np.ndarray:
        # row by row: a capped copy of the whole tables (0.4 GB there) took as long as the
        # rest, before the first look at the clock
        return capped(costs, threshold)

    def check(b: int) -> None:
        if deadline is not None and b % 16 == 0 and time.monotonic() > deadline:
            raise OutOfTime("the time limit ran out")

    ready = np.full((s, n), math.inf)
    done = np.full((s + 1, n), math.inf)
    ready[0] = cap(hop[0, n, :n])
    for b in range(s):
        check(b)
        if b > 0:
            ready[b] = join(done[b][:, None], cap(hop[b, :n, :n])).min(axis=0)
        done[b + 1:] = np.minimum(done[b + 1:],
                                  join(ready[b][None, :], cap(stage[b, b + 1:, :])))
    finish_done = np.full((s + 1, n), math.inf)
    finish_ready = np.full((s, n), math.inf)
    finish_done[s] = cap(hop[s, :n, n])
    for b in range(s - 1, -1, -1):
        check(b)
        finish_ready[b] = join(cap(stage[b, b + 1:, :]), finish_done[b + 1:]).min(axis=0)
        if b > 0:
            finish_done[b] = join(cap(hop[b, :n, :n]), finish_ready[b][None, :]).min(axis=1)
    return Bounds(ready, done, finish_ready, finish_done)


def reverse(stage: np.ndarray, hop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The instance run backwards (segments from last to first, output hop first): the same
    plans, mirrored, with the same costs. Stage [i, j) becomes [S-j, S-i); boundary b, S-b."""
    return stage[::-1, ::-1, :].transpose(1, 0, 2), hop[::-1].transpose(0, 2, 1)


def unreverse(path: Path, s: int) -> Path:
    return [(s - end, s - first, v) for first, end, v in reversed(path)]


@dataclass
class Arcs:
    """The arcs that lie on some relaxed path whose value is <= an upper limit."""

    stage: np.ndarray   # (k, 3) first, end, node
    hop: np.ndarray     # (k, 3) boundary, from, to   (source and sink are node N)


def useful_arcs(stage: np.ndarray, hop: np.ndarray, threshold: float, combine: str,
                upper: float = math.inf, bounds: Bounds | None = None,
                deadline: float | None = None) -> Arcs:
    """Arcs through which the best relaxed path (by `bounds`, by default `reach`'s) is finite
    and at most `upper` (with SLACK). A block of rows at a time, raising OutOfTime once
    time.monotonic() passes `deadline` (20 x 1000 takes seconds: 21 M hop entries)."""
    s, n = stage.shape[0] - 1, stage.shape[2]
    join = _join(combine)
    r = bounds if bounds is not None else reach(stage, hop, threshold, combine)
    limit = upper * (1 + SLACK)

    def keep(through: np.ndarray) -> np.ndarray:
        return np.isfinite(through) & (through <= limit)

    def blocks(first: int, last: int, table: np.ndarray) -> Iterator[tuple[int, int]]:
        rows = max(1, CHUNK_ENTRIES // max(1, table[0].size))
        for a in range(first, last, rows):
            if deadline is not None and time.monotonic() > deadline:
                raise OutOfTime("the time limit ran out")
            yield a, min(a + rows, last)

    stage_keep = np.zeros((s, s + 1, n), dtype=bool)
    for a, b in blocks(0, s, stage):
        stage_keep[a:b] = keep(join(join(r.ready[a:b, None, :], capped(stage[a:b], threshold)),
                                    r.finish_done[None, :, :]))
    hop_keep = np.zeros((s + 1, n + 1, n + 1), dtype=bool)
    for a, b in blocks(1, s, hop):
        hop_keep[a:b, :n, :n] = keep(join(join(r.done[a:b, :, None],
                                               capped(hop[a:b, :n, :n], threshold)),
                                          r.finish_ready[a:b, None, :]))
    hop = capped(hop[[0, s]], threshold)        # boundaries 0 and S, now rows 0 and 1
    hop_keep[0, n, :n] = keep(join(hop[0, n, :n], r.finish_ready[0]))
    hop_keep[s, :n, n] = keep(join(r.done[s], hop[1, :n, n]))
    return Arcs(np.argwhere(stage_keep), np.argwhere(hop_keep))


@dataclass
class Relaxed:
    """A masked DP's answer: its optimum and path, and per state the best value reaching it
    over all masks (a lower bound for any path through the state: inf where pruned)."""

    value: float
    path: Path
    ready: np.ndarray   # (S, N)
    done: np.ndarray    # (S+1, N)
    labels: int = 0     # (state, mask) labels the DP kept: what its time grows with


@dataclass
class _Labels:
    """Labels of one boundary: a node, the critical nodes used so far, a value, and the index
    of the label it was extended from (in the previous layer; -1: from the source)."""

    node: np.ndarray
    mask: np.ndarray
    value: np.ndarray
    parent: np.ndarray
    origin: np.ndarray | None = None   # done labels: the boundary their stage started at

    def best_per_key(self) -> _Labels:
        """One label per (node, mask): the least value."""
        order = np.lexsort((self.value, self.mask, self.node))
        node, mask = self.node[order], self.mask[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = (node[1:] != node[:-1]) | (mask[1:] != mask[:-1])
        keep = order[first]
        return _Labels(self.node[keep], self.mask[keep], self.value[keep], self.parent[keep],
                       None if self.origin is None else self.origin[keep])

    def minima(self, size: int) -> np.ndarray:
        out = np.full(size, math.inf)
        np.minimum.at(out, self.node, self.value)
        return out


def _pairs(label_node: np.ndarray, arc_node: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (label, arc) index pairs with the same node."""
    order = np.argsort(label_node, kind="stable")
    lo = np.searchsorted(label_node[order], arc_node, side="left")
    hi = np.searchsorted(label_node[order], arc_node, side="right")
    counts = hi - lo
    arc = np.repeat(np.arange(len(arc_node)), counts)
    offsets = np.arange(len(arc)) - np.repeat(np.cumsum(counts) - counts, counts)
    return order[np.repeat(lo, counts) + offsets], arc


def best_path(stage: np.ndarray, hop: np.ndarray, combine: str, critical: list[int] = (),
              threshold: float = math.inf, upper: float = math.inf,
              bounds: Bounds | None = None, max_labels: float | None = None,
              beam: int | None = None, deadline: float | None = None) -> Relaxed | None:
    """Best relaxed path with every cost <= threshold in which the `critical` nodes appear at
    most once; value inf when there is none with value <= `upper`; None when it would keep
    more than `max_labels` labels or time.monotonic() passes `deadline` (checked once per
    boundary, so the time limit holds whatever the instance's size). With `beam`, only the
    `beam` most promising labels of each layer are kept: a heuristic (its path is still valid
    for the critical set, but neither its value nor its per-state values bound anything).

    A label is a state (boundary, node) with the set of critical nodes used on its way (a bit
    mask) and its best value, so there can be 2^len(critical) per state; every label that
    cannot finish within `upper` by `bounds` (default: the plain relaxation's) is dropped, so
    tight bounds and a good upper bound keep the count small."""
    join = _join(combine)
    s, n = stage.shape[0] - 1, stage.shape[2]
    r = bounds if bounds is not None else reach(stage, hop, threshold, combine)
    try:
        arcs = useful_arcs(stage, hop, threshold, combine, upper, r, deadline)
    except OutOfTime:
        return None
    limit = upper * (1 + SLACK)
    bit = np.zeros(n + 1, dtype=np.int64)
    bit[list(critical)] = np.left_shift(1, np.arange(len(critical), dtype=np.int64))
    stage_at = np.searchsorted(arcs.stage[:, 0], np.arange(s + 2))   # sorted by first
    hops = arcs.hop
    hop_at = np.searchsorted(hops[:, 0], np.arange(s + 2))            # sorted by boundary
    ready_min = np.full((s, n), math.inf)
    done_min = np.full((s + 1, n), math.inf)
    pending: list[list[_Labels]] = [[] for _ in range(s + 1)]   # done labels by boundary
    ready_layers: list[_Labels | None] = [None] * s
    done_layers: list[_Labels | None] = [None] * (s + 1)
    total = 0

    def alive(values: np.ndarray, to_go: np.ndarray) -> np.ndarray:
        through = join(values, to_go)
        return np.isfinite(through) & (through <= limit)

    for b in range(s + 1):
        done = None
        if b > 0:
            if not pending[b]:
                continue
            chunks = pending[b]
            done = _Labels(*(np.concatenate([getattr(c, f) for c in chunks])
                             for f in ("node", "mask", "value", "parent", "origin")))
            done = done.best_per_key()
            if beam is not None and len(done.node) > beam:
                promise = join(done.value, r.finish_done[b, done.node])
                done = _select(done, np.argsort(promise, kind="stable")[:beam])
            done_layers[b] = done
            done_min[b] = done.minima(n)
            total += len(done.node)
            if b == s:
                break
        # Hops at boundary b: out of the source (b = 0) or out of a done label.
        lo, hi = hop_at[b], hop_at[b + 1]
        at = hops[lo:hi]
        cost = hop[at[:, 0], at[:, 1], at[:, 2]]
        if done is None:
            ready = _Labels(at[:, 2], np.zeros(len(at), dtype=np.int64), cost,
                            np.full(len(at), -1))
        else:
            label, arc = _pairs(done.node, at[:, 1])
            ready = _Labels(at[arc, 2], done.mask[label], join(done.value[label], cost[arc]),
                            label)
        ready = _select(ready, alive(ready.value, r.finish_ready[b, ready.node])).best_per_key()
        if beam is not None and len(ready.node) > beam:
            promise = join(ready.value, r.finish_ready[b, ready.node])
            ready = _select(ready, np.argsort(promise, kind="stable")[:beam])
        ready_layers[b] = ready
        ready_min[b] = ready.minima(n)
        total += len(ready.node)
        if max_labels is not None and total > max_labels:
            return None
        if deadline is not None and time.monotonic() > deadline:
            return None
        # Stages starting at b.
        lo, hi = stage_at[b], stage_at[b + 1]
        st = arcs.stage[lo:hi]
        label, arc = _pairs(ready.node, st[:, 2])
        own = bit[st[arc, 2]]
        free = (ready.mask[label] & own) == 0
        label, arc, own = label[free], arc[free], own[free]
        ends = st[arc, 1]
        value = join(ready.value[label], stage[b, ends, st[arc, 2]])
        ok = alive(value, r.finish_done[ends, st[arc, 2]])
        for e in np.unique(ends[ok]):
            here = ok & (ends == e)
            pending[e].append(_Labels(st[arc[here], 2], ready.mask[label[here]] | own[here],
                                      value[here], label[here], np.full(int(here.sum()), b)))

    final = done_layers[s]
    if final is None:
        return Relaxed(math.inf, [], ready_min, done_min, total)
    totals = join(final.value, hop[s, final.node, n])
    k = int(totals.argmin())
    value = float(totals[k])
    if math.isinf(value) or value > limit:
        return Relaxed(math.inf, [], ready_min, done_min, total)
    path: Path = []
    end = s
    while end > 0:
        node, first = int(final.node[k]), int(final.origin[k])
        path.append((first, end, node))
        k = int(final.parent[k])               # the ready label at `first`
        k = int(ready_layers[first].parent[k])  # the done label it came from (-1: source)
        end, final = first, done_layers[first]
    return Relaxed(value, path[::-1], ready_min, done_min, total)


def _select(labels: _Labels, keep: np.ndarray) -> _Labels:
    return _Labels(labels.node[keep], labels.mask[keep], labels.value[keep],
                   labels.parent[keep], None if labels.origin is None else labels.origin[keep])


def distinct(path: Path) -> bool:
    nodes = [v for _, _, v in path]
    return len(set(nodes)) == len(nodes)


def repeated(path: Path) -> list[int]:
    nodes = [v for _, _, v in path]
    return sorted({v for v in nodes if nodes.count(v) > 1})
