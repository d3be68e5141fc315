"""`greedy`: the published joint baseline. SEIFER's min-sum partition, then from every start
node a chain that always hops to the unused node with the highest bandwidth from the current
one; the start whose plan has the lowest bottleneck (then latency) wins."""

from __future__ import annotations

import math

import numpy as np

from partitioner.algorithms.minsum import min_sum_partition
from partitioner.algorithms.tables import Path, Tables
from partitioner.instance import InfeasibleError


def greedy(tables: Tables) -> Path:
    groups = min_sum_partition(tables)
    n = tables.n_nodes
    bandwidth = tables.bandwidth[:n, :n]
    best: Path | None = None
    for start in range(n):
        used = np.zeros(n, dtype=bool)
        chain = [start]
        used[start] = True
        for _ in groups[1:]:
            options = np.where(used, 0.0, bandwidth[chain[-1]])
            nxt = int(options.argmax())
            if options[nxt] <= 0:       # no unused node is linked to the current one
                break
            chain.append(nxt)
            used[nxt] = True
        if len(chain) < len(groups):
            continue
        path = [(first, end, v) for (first, end), v in zip(groups, chain)]
        if tables.key(path) < tables.key(best):
            best = path
    if best is None or math.isinf(tables.key(best)[0]):
        raise InfeasibleError("greedy: no start node yields a chain connected to the source")
    return best
