"""SEIFER's partition step, shared by the `seifer` and `greedy` baselines: among the ways to
group consecutive segments so that every group fits one memory capacity (the smallest node's:
the published system assumes all nodes are alike) and, where disks are counted, the smallest
counted disk (a stage's model file is written there), the one whose cuts transfer the fewest
bytes in total; any group then fits any node, so the placements need not check. A shortest
path over the DAG of (start, end) groups; compute is ignored, as in the published cost
model."""

from __future__ import annotations

import math

import numpy as np

from partitioner.algorithms.tables import Tables
from partitioner.instance import InfeasibleError


def min_sum_partition(tables: Tables, capacity: int | None = None) -> list[tuple[int, int]]:
    """Groups [first, end) of the min-sum partition; ties go to fewer groups. Raises
    InfeasibleError when a segment exceeds the capacity or more groups than nodes are needed
    (the published method rejects such a partition rather than repairing it)."""
    cap = int(tables.memory.min()) if capacity is None else capacity
    s = tables.n_segments
    memory = tables.prefix_memory
    disks = [n.disk_bytes for n in tables.instance.nodes if n.disk_bytes]
    disk_cap = min(disks, default=0)
    files = np.concatenate([[0], np.cumsum([g.model_bytes for g in tables.instance.segments])])
    # best[j] = (bytes over the cuts, groups) of the best grouping of segments [0, j).
    best: list[tuple[float, int]] = [(0.0, 0)] + [(math.inf, 0)] * s
    parent = [0] * (s + 1)
    for end in range(1, s + 1):
        if end % 64 == 0:
            tables.check_time()     # quadratic in the segments: 10,000 took minutes
        cut = 0.0 if end == s else float(tables.boundary_bytes[end])
        for first in range(end - 1, -1, -1):
            if memory[end] - memory[first] > cap or \
                    (disk_cap and files[end] - files[first] > disk_cap):
                break
            total, groups = best[first]
            option = (total + cut, groups + 1)
            if option < best[end]:
                best[end], parent[end] = option, first
    if math.isinf(best[s][0]):
        raise InfeasibleError(f"a segment needs more than the uniform memory cap of {cap} bytes"
                              + (f" or disk cap of {disk_cap} bytes" if disk_cap else ""))
    groups = []
    end = s
    while end > 0:
        groups.append((parent[end], end))
        end = parent[end]
    groups.reverse()
    if len(groups) > tables.n_nodes:
        raise InfeasibleError(f"the min-sum partition needs {len(groups)} stages, more than the "
                              f"{tables.n_nodes} nodes")
    return groups
