"""A fast test of "is there a valid plan with every cost <= T?": depth-first search over chains
of distinct nodes, each chain carrying every boundary it can end at, pruned by the relaxation's
backward reachability (a state from which even the relaxed problem cannot finish is never
entered) and by the stages still needed. The search is complete, so it answers with a valid
path, or with "none" when it ran to the end (a proof), or with "don't know" when its budget
ran out first. Plans of a few stages over many nodes are settled here in milliseconds either
way; long chains over few nodes are left to the DP and the MILP."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from partitioner.algorithms.relaxed import reach
from partitioner.algorithms.tables import OutOfTime, Path

# Expansions before giving up (each costs segments^2 x nodes boolean operations).
MAX_EXPANSIONS = 500


@dataclass
class Chain:
    path: Path | None       # a valid path with every cost <= the threshold
    exhausted: bool         # no path and the search was complete: there is none


def chain_search(stage: np.ndarray, hop: np.ndarray, threshold: float,
                 max_expansions: int = MAX_EXPANSIONS, deadline: float | None = None) -> Chain:
    """A valid path whose every cost is <= threshold, or the proof that there is none, or
    neither when the budget runs out first, or time.monotonic() passes `deadline` (on 300
    segments x 200 nodes one expansion takes tens of milliseconds)."""
    s, n = stage.shape[0] - 1, stage.shape[2]
    try:
        r = reach(stage, hop, threshold, deadline=deadline)
    except OutOfTime:
        return Chain(None, False)
    if not r.feasible:
        return Chain(None, True)
    # stage_ok[b, e, w]: stage [b, e) on w is cheap enough and the relaxation can finish from e.
    stage_ok = (stage[:s] <= threshold) & np.isfinite(r.finish_done)[None, :, :]
    finish_ready = np.isfinite(r.finish_ready)
    hop_ok = hop <= threshold
    need = _fewest_stages(stage, threshold)
    budget = [max_expansions]

    def extend(last: int, frontier: np.ndarray, used: np.ndarray,
               chain: list[tuple[int, np.ndarray]]) -> Path | None:
        """`frontier[b]`: the chain so far can end at boundary b on `last`."""
        if deadline is not None and time.monotonic() > deadline:
            budget[0] = 0       # out of time: "don't know", as with the budget spent
        if budget[0] <= 0:
            return None
        budget[0] -= 1
        # starts[b, w]: w can take over at boundary b.
        starts = frontier[:s, None] & hop_ok[:s, last, :n] & finish_ready & ~used[None, :]
        # ends[e, w]: w, starting at some allowed b, can end at e, and the nodes left over
        # are enough for the stages still needed after e.
        left = n - int(used.sum()) - 1
        ends = (starts[:, None, :] & stage_ok).any(axis=0) & (need <= left)[:, None]
        candidates = np.nonzero(ends.any(axis=0))[0]
        if not len(candidates):
            return None
        finishing = candidates[ends[s, candidates]]
        if len(finishing):
            w = int(finishing[0])
            return _unwind([*chain, (w, starts[:, w])], s, stage_ok)
        # Try first the nodes that get furthest: fewer stages left to place.
        furthest = np.array([np.nonzero(ends[:, w])[0].max() for w in candidates])
        for w in candidates[np.argsort(-furthest, kind="stable")]:
            used[w] = True
            found = extend(int(w), ends[:, w], used, [*chain, (int(w), starts[:, w])])
            used[w] = False
            if found is not None or budget[0] <= 0:
                return found
        return None

    start = np.zeros(s + 1, dtype=bool)
    start[0] = True
    found = extend(n, start, np.zeros(n, dtype=bool), [])
    return Chain(found, found is None and budget[0] > 0)


def _fewest_stages(stage: np.ndarray, threshold: float) -> np.ndarray:
    """need[e]: fewest stages that can cover segments [e, S) if every node were free (so a
    lower bound for any set of free nodes); a chain with fewer nodes left is dead."""
    s = stage.shape[0] - 1
    fits = (stage <= threshold).any(axis=2)
    need = np.full(s + 1, np.inf)
    need[s] = 0
    for b in range(s - 1, -1, -1):
        reachable = need[b + 1:][fits[b, b + 1:]]
        if len(reachable):
            need[b] = 1 + reachable.min()
    return need


def _unwind(chain: list[tuple[int, np.ndarray]], end: int, stage_ok: np.ndarray) -> Path:
    """Turn a chain of (node, possible start boundaries) into stages, back to front: each stage
    ends where the next one starts, and starts where its predecessor could hand over."""
    path: Path = []
    for k in range(len(chain) - 1, -1, -1):
        w, starts = chain[k]
        # Every start on the list is an end the previous node can reach, so any will do.
        first = int(np.nonzero(starts[:end] & stage_ok[:end, end, w])[0][0])
        path.append((first, end, w))
        end = first
    return path[::-1]


def repair(stage: np.ndarray, hop: np.ndarray, path: Path, threshold: float) -> Path | None:
    """Make a relaxed path valid: each node keeps its first stage, and every later stage on
    it moves to the unused node that makes it cheapest (hop in + compute + hop out), all costs
    <= threshold. None when some stage finds no such node."""
    n = stage.shape[2]
    spare = set(range(n)) - {v for _, _, v in path}
    seen: set[int] = set()
    out: Path = []
    previous = n
    for k, (first, end, v) in enumerate(path):
        if v in seen:
            following = path[k + 1][2] if k + 1 < len(path) else n
            costs = {w: hop[first, previous, w] + stage[first, end, w] + hop[end, w, following]
                     for w in spare
                     if max(hop[first, previous, w], stage[first, end, w],
                            hop[end, w, following]) <= threshold}
            if not costs:
                return None
            v = min(costs, key=costs.__getitem__)
            spare.discard(v)
        seen.add(v)
        out.append((first, end, v))
        previous = v
    # A replacement chosen against a neighbour that was itself replaced later is re-checked.
    last = n
    for first, _, v in out:
        if hop[first, last, v] > threshold:
            return None
        last = v
    return out if hop[out[-1][1], last, n] <= threshold else None
