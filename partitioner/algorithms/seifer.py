"""`seifer`: the published method, re-implemented from its description (../shared/SEIFER.md),
as the baseline the exact planner is measured against.

1. Partition: SEIFER's min-sum partition under the smallest node's memory (minsum.py).
2. Placement, "K-path matching": the k-1 cuts are transfers between k slots (the stages).
   Every candidate transfer size (the bytes at each cut point) goes into a histogram of
   CLASSES equal-width bins; each chosen cut gets its bin. From the largest bin down, maximal
   runs of consecutive cuts in the bin are placed, longest first: a run of r cuts needs a
   simple path of r+1 nodes (ends pinned where a neighbouring slot is already placed, interior
   nodes unused) that maximises the smallest link bandwidth on it, found by binary search on a
   bandwidth threshold, each test a randomised colour-coding k-path search. As in the
   published cost model, compute time and the source's hops are ignored; a single stage goes
   to the node with the widest link to the source.

Where the description leaves a choice: colour coding runs COLOURINGS random colourings and is
used for up to MAX_COLOURED free nodes; longer runs (only with many near-equal cut sizes, e.g.
transformer blocks) use a budgeted depth-first search (Warnsdorff's rule: the node with the
fewest links first).
A run that cannot be placed at any threshold makes the method fail (InfeasibleError), and so
does a placement whose ends have no link to the source (it never looks at the source)."""

from __future__ import annotations

import math
import random

import numpy as np

from partitioner.algorithms.minsum import min_sum_partition
from partitioner.algorithms.tables import Path, Tables
from partitioner.instance import InfeasibleError

CLASSES = 20          # bandwidth classes, as in the deployed code
COLOURINGS = 60       # random colourings per k-path test
MAX_COLOURED = 5      # colour coding is exponential in the free nodes of a run
DFS_BUDGET = 5000     # node expansions for longer runs


def seifer(tables: Tables, seed: int = 0) -> Path:
    rng = random.Random(seed)
    groups = min_sum_partition(tables)
    k = len(groups)
    if k == 1:
        return [(0, tables.n_segments, int(tables.bandwidth[tables.source, :-1].argmax()))]
    cuts = [tables.boundary_bytes[g[0]] for g in groups[1:]]
    edges = np.histogram_bin_edges(tables.boundary_bytes[1:-1], bins=CLASSES)
    # Bin of each cut: 0 .. CLASSES-1 (the top edge belongs to the last bin).
    classes = np.clip(np.searchsorted(edges, cuts, side="right") - 1, 0, CLASSES - 1)
    slot: dict[int, int] = {}
    used = np.zeros(tables.n_nodes + 1, dtype=bool)
    used[tables.source] = True
    for cls in sorted(set(classes.tolist()), reverse=True):
        for first, last in sorted(_runs(classes, cls), key=lambda r: (r[0] - r[1], r[0])):
            # Cuts first..last join slots first..last+1.
            start, end = slot.get(first), slot.get(last + 1)
            free = (last + 2 - first) - (start is not None) - (end is not None)
            path = _widest_path(tables.bandwidth, used, free, start, end, rng)
            if path is None:
                raise InfeasibleError(f"seifer: no path of unused nodes for cuts "
                                      f"{first}..{last}")
            for i, node in enumerate(path):
                slot[first + i] = node
                used[node] = True
    path = [(g[0], g[1], slot[i]) for i, g in enumerate(groups)]
    if math.isinf(tables.key(path)[0]):
        # Blind to the source, the placement may pick ends the source has no link to.
        raise InfeasibleError("seifer: the first or last stage landed on a node without a "
                              "link to the source")
    return path


def _runs(classes: np.ndarray, cls: int) -> list[tuple[int, int]]:
    """Maximal runs [first, last] of consecutive transfers in class `cls`."""
    runs, begin = [], None
    for i, c in enumerate([*classes.tolist(), None]):
        if c == cls and begin is None:
            begin = i
        elif c != cls and begin is not None:
            runs.append((begin, i - 1))
            begin = None
    return runs


def _widest_path(bandwidth: np.ndarray, used: np.ndarray, free: int, start: int | None,
                 end: int | None, rng: random.Random) -> list[int] | None:
    """Nodes for a run's slots, ends included, maximising the narrowest link: binary search
    over the link bandwidths, each a k-path test; the best path found, or None."""
    pool = np.nonzero(~used)[0]
    if free == 0:
        return [start, end] if bandwidth[start, end] > 0 else None
    nodes = np.concatenate([pool, [e for e in (start, end) if e is not None]]).astype(int)
    links = bandwidth[np.ix_(nodes, nodes)]
    levels = np.unique(links[links > 0])
    best, lo, hi = None, 0, len(levels) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        found = _k_path(bandwidth >= levels[mid], pool, free, start, end, rng)
        if found is None:
            hi = mid - 1
        else:
            best, lo = found, mid + 1
    return best


def _k_path(adj: np.ndarray, pool: np.ndarray, free: int, start: int | None, end: int | None,
            rng: random.Random) -> list[int] | None:
    """A simple path start -> `free` nodes of `pool` -> end over `adj` (ends optional)."""
    inner = adj[np.ix_(pool, pool)]
    enter = adj[start, pool] if start is not None else np.ones(len(pool), dtype=bool)
    leave = adj[pool, end] if end is not None else np.ones(len(pool), dtype=bool)
    if free > len(pool):
        return None
    if free <= MAX_COLOURED:
        for _ in range(COLOURINGS):
            colour = np.array([rng.randrange(free) for _ in pool])
            found = _colourful_path(inner, enter, leave, colour, free)
            if found is not None:
                break
        else:
            return None
    else:
        found = _dfs_path(inner, enter, leave, free)
        if found is None:
            return None
    nodes = [int(pool[i]) for i in found]
    return [*([start] if start is not None else []), *nodes, *([end] if end is not None else [])]


def _colourful_path(inner: np.ndarray, enter: np.ndarray, leave: np.ndarray,
                    colour: np.ndarray, free: int) -> list[int] | None:
    """Colour coding: a path whose nodes have all `free` colours (hence distinct nodes), by a
    DP over sets of colours; indices into the pool, or None."""
    full = (1 << free) - 1
    reach: dict[int, np.ndarray] = {}
    parent: dict[tuple[int, int], int] = {}
    bits = 1 << colour
    for v in np.nonzero(enter)[0]:
        reach.setdefault(int(bits[v]), np.zeros(len(colour), dtype=bool))[v] = True
    for mask in range(1, full + 1):
        here = reach.get(mask)
        if here is None or not here.any():
            continue
        if mask == full:
            ends = np.nonzero(here & leave)[0]
            if not len(ends):
                return None
            path, v = [int(ends[0])], int(ends[0])
            while (mask, v) in parent:
                u = parent[mask, v]
                mask ^= int(bits[v])
                path.append(u)
                v = u
            return path[::-1]
        step = inner[here].any(axis=0) & ((bits & mask) == 0)
        for w in np.nonzero(step)[0]:
            nxt = mask | int(bits[w])
            target = reach.setdefault(nxt, np.zeros(len(colour), dtype=bool))
            if not target[w]:
                target[w] = True
                parent[nxt, int(w)] = int(np.nonzero(here & inner[:, w])[0][0])
    return None


def _dfs_path(inner: np.ndarray, enter: np.ndarray, leave: np.ndarray,
              free: int) -> list[int] | None:
    """Depth-first search for a simple path of `free` pool nodes over the links the caller's
    threshold kept, within DFS_BUDGET expansions."""
    budget = [DFS_BUDGET]
    degree = inner.sum(axis=1)

    def extend(path: list[int], on: np.ndarray) -> list[int] | None:
        if len(path) == free:
            return path if leave[path[-1]] else None
        if budget[0] <= 0:
            return None
        budget[0] -= 1
        options = np.nonzero(inner[path[-1]] & ~on)[0] if path else np.nonzero(enter)[0]
        # Fewest onward links first: hard-to-reach nodes are placed while they still can be.
        for w in options[np.argsort(degree[options], kind="stable")]:
            on[w] = True
            found = extend([*path, int(w)], on)
            on[w] = False
            if found is not None:
                return found
        return None

    return extend([], np.zeros(len(inner), dtype=bool))
