"""The relaxation every exact and bounding step starts from: plans where a node may hold several
stages as long as they are not consecutive. Over (boundary, node) states it is a DAG, so its
optimum is a dynamic programme, polynomial in segments and nodes; it bounds the true optimum
from below, and when its best path happens to use each node once it *is* the optimum.

States: `ready[b, w]` = boundary b's data has arrived on w (a stage may start there);
`done[b, u]` = a stage on u has just finished segment b-1 (its output is at u)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from partitioner.algorithms.tables import Path


@dataclass
class Reach:
    """Least relaxed latency to reach each state from the source (`ready`, `done`) and from
    each state back to the source (`finish_ready`, `finish_done`), over arcs costing at most a
    threshold; inf where there is no such path. Finite on both sides = on some relaxed path."""

    ready: np.ndarray         # (S, N)
    done: np.ndarray          # (S+1, N)
    finish_ready: np.ndarray  # (S, N)
    finish_done: np.ndarray   # (S+1, N)

    @property
    def feasible(self) -> bool:
        return bool(np.isfinite(self.ready[0] + self.finish_ready[0]).any())

    @property
    def latency(self) -> float:
        """Least relaxed latency under the threshold: a lower bound on the true one."""
        return float((self.ready[0] + self.finish_ready[0]).min())


def reach(stage: np.ndarray, hop: np.ndarray, threshold: float) -> Reach:
    """Forward and backward least latencies over arcs costing at most `threshold`."""
    s, n = stage.shape[0] - 1, stage.shape[2]
    stage = np.where(stage <= threshold, stage, math.inf)
    hop = np.where(hop <= threshold, hop, math.inf)
    ready = np.full((s, n), math.inf)
    done = np.full((s + 1, n), math.inf)
    ready[0] = hop[0, n, :n]
    for b in range(s):
        if b > 0:
            ready[b] = (done[b][:, None] + hop[b, :n, :n]).min(axis=0)
        done[b + 1:] = np.minimum(done[b + 1:], ready[b][None, :] + stage[b, b + 1:, :])
    finish_done = np.full((s + 1, n), math.inf)
    finish_ready = np.full((s, n), math.inf)
    finish_done[s] = hop[s, :n, n]
    for b in range(s - 1, -1, -1):
        finish_ready[b] = (stage[b, b + 1:, :] + finish_done[b + 1:]).min(axis=0)
        if b > 0:
            finish_done[b] = (hop[b, :n, :n] + finish_ready[b][None, :]).min(axis=1)
    return Reach(ready, done, finish_ready, finish_done)


def best_path(stage: np.ndarray, hop: np.ndarray, combine: str, critical: list[int] = (),
              threshold: float = math.inf) -> tuple[float, Path]:
    """Best relaxed path for `combine` = "max" (bottleneck) or "sum" (latency), using only
    costs <= threshold, in which the `critical` nodes appear at most once (the others may
    repeat, just never on consecutive stages). A lower bound on the true optimum; the true
    optimum when the path found uses each node once.

    The critical nodes used so far are tracked as a bit mask, so the work grows as 2^len
    (decremental state-space relaxation: callers add the nodes a path repeats and retry)."""
    join = np.maximum if combine == "max" else np.add
    if math.isfinite(threshold):
        stage = np.where(stage <= threshold, stage, math.inf)
        hop = np.where(hop <= threshold, hop, math.inf)
    s, n = stage.shape[0] - 1, stage.shape[2]
    masks = 1 << len(critical)
    bit = np.zeros(n, dtype=np.int64)
    bit[list(critical)] = 1 << np.arange(len(critical))
    every = np.arange(masks)
    ready = np.full((s, n, masks), math.inf)
    ready_from = np.full((s, n, masks), -1, dtype=np.int32)   # previous node (source: n)
    done = np.full((s + 1, n, masks), math.inf)
    done_from = np.full((s + 1, n, masks), -1, dtype=np.int32)  # boundary the stage began at
    ready[0, :, 0] = hop[0, n, :n]
    ready_from[0] = n
    plain = np.nonzero(bit == 0)[0]
    for b in range(s):
        if b > 0:
            via = join(done[b][:, None, :], hop[b, :n, :n, None])   # (from, to, mask)
            ready_from[b] = via.argmin(axis=0)
            ready[b] = np.take_along_axis(via, ready_from[b][None], axis=0)[0]
        tail = stage[b, b + 1:, :, None]                             # (end, node, 1)
        # Nodes outside the critical set keep the mask as it is.
        cand = join(ready[b][None, plain, :], tail[:, plain])
        better = cand < done[b + 1:, plain]
        done[b + 1:, plain] = np.where(better, cand, done[b + 1:, plain])
        done_from[b + 1:, plain] = np.where(better, b, done_from[b + 1:, plain])
        # A critical node may start a stage only under masks without its bit, and sets it.
        for w in critical:
            free = every[(every & bit[w]) == 0]
            cand = join(ready[b, w, free][None, :], tail[:, w])
            target = free | bit[w]
            better = cand < done[b + 1:, w, target]
            done[b + 1:, w, target] = np.where(better, cand, done[b + 1:, w, target])
            done_from[b + 1:, w, target] = np.where(better, b, done_from[b + 1:, w, target])
    total = join(done[s], hop[s, :n, n, None])
    last, mask = np.unravel_index(int(total.argmin()), total.shape)
    value = float(total[last, mask])
    if math.isinf(value):
        return value, []
    path: Path = []
    end, node, mask = s, int(last), int(mask)
    while end > 0:
        first = int(done_from[end, node, mask])
        path.append((first, end, node))
        mask &= ~int(bit[node])
        end, node = first, int(ready_from[first, node, mask])
    return value, path[::-1]


def min_bottleneck(stage: np.ndarray, hop: np.ndarray) -> tuple[float, Path]:
    """Smallest relaxed bottleneck (a lower bound on the true one) and a path reaching it."""
    return best_path(stage, hop, "max")


def min_latency(stage: np.ndarray, hop: np.ndarray, threshold: float) -> tuple[float, Path]:
    """Smallest relaxed latency among paths whose every cost is <= `threshold`."""
    return best_path(stage, hop, "sum", threshold=threshold)


def distinct(path: Path) -> bool:
    nodes = [v for _, _, v in path]
    return len(set(nodes)) == len(nodes)


def repeated(path: Path) -> list[int]:
    nodes = [v for _, _, v in path]
    return sorted({v for v in nodes if nodes.count(v) > 1})
