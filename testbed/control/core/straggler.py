"""The straggler rule: a stage of the epoch in force whose frames take `factor` x its planned
compute time, and longer than its pipeline's pace, for `after_s` (a noisy neighbour, a
throttled CPU) is a straggler; its host is then treated as failing (core.health.fail).

A slow stage that still keeps up with its pipeline's pace costs no throughput (each of R
pipelines side by side gets every R-th request), so the pace is the bottleneck x R. A second
without frames is no evidence either way; the backend resets the clock while a model loads
on the host (that takes its CPU for a while).

Slow relative to its peers: when the machine itself is loaded (an emulating machine shared
with other work, every host's CPU share stretched alike), every stage computes slower than
planned; that is not one host straggling. Both bounds are scaled by the median slowdown
(measured / planned) of the epoch's other stages, when it is above 1: under machine load
every stage used to be flagged in turn.
"""

from __future__ import annotations

import statistics
from collections.abc import Hashable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Straggling:
    compute_ms: float
    planned_ms: float

    @property
    def factor(self) -> float:
        return self.compute_ms / self.planned_ms


class StragglerWatch:
    """Per worker (any hashable key): since when it has been too slow."""

    def __init__(self, factor: float, after_s: float) -> None:
        self.factor, self.after_s = factor, after_s
        self.slow_since: dict[Hashable, float] = {}
        self.ratios: dict[Hashable, float] = {}     # last measured / planned, per worker

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def reset(self, key: Hashable) -> None:
        self.slow_since.pop(key, None)

    def slowdown(self, peers: Iterable[Hashable]) -> float:
        """The median slowdown of `peers` (1 when none is known or they are on time)."""
        known = sorted(self.ratios[p] for p in peers if p in self.ratios)
        return max(1.0, statistics.median(known)) if known else 1.0

    def observe(self, key: Hashable, now: float, frames: int, compute_ms: float,
                planned_ms: float, pace_ms: float,
                peers: Iterable[Hashable] = ()) -> Straggling | None:
        """One second of load; a Straggling once it has been too slow for `after_s` (the
        clock then starts over), relative to its `peers` (module docstring)."""
        if not self.enabled:
            return None
        if frames == 0:
            return None
        if planned_ms > 0:
            self.ratios[key] = compute_ms / planned_ms
        machine = self.slowdown(peers)
        if compute_ms < machine * max(self.factor * planned_ms, pace_ms):
            self.reset(key)
            return None
        since = self.slow_since.setdefault(key, now)
        if now - since < self.after_s:
            return None
        self.reset(key)
        return Straggling(compute_ms, planned_ms)
