"""`random`: the published random baseline, made memory- and disk-aware per node. Nodes are
taken in a random order; each takes the next segments, as many as a uniformly random choice
among those whose stage fits its memory and, where counted, its disk (`Tables.stage`). Draws
that run out of nodes or use a missing link are retried."""

from __future__ import annotations

import math
import random

import numpy as np

from partitioner.algorithms.tables import Path, Tables
from partitioner.instance import InfeasibleError

ATTEMPTS = 200


def random_plan(tables: Tables, seed: int = 0) -> Path:
    rng = random.Random(seed)
    s, stage = tables.n_segments, tables.stage
    for _ in range(ATTEMPTS):
        order = list(range(tables.n_nodes))
        rng.shuffle(order)
        path: Path = []
        start = 0
        for node in order:
            if start == s:
                break
            # Ends e with segments [start, e) fitting the node's memory and disk: both grow
            # with e, so they are the first run of finite stage costs.
            fits = np.isfinite(stage[start, start + 1:, node])
            last = start + (int(fits.argmin()) if not fits.all() else len(fits))
            if last <= start:
                continue
            end = rng.randint(start + 1, min(last, s))
            path.append((start, end, node))
            start = end
        if start == s and math.isfinite(tables.key(path)[0]):
            return path
    raise InfeasibleError(f"random: no valid plan in {ATTEMPTS} draws")
