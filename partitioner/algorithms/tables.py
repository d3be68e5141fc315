"""Cost tables: an Instance turned into numpy arrays indexed by segment boundary and node, so
the searches never look names up. The costs mirror partitioner.instance.plan_cost (the one cost
function); every algorithm still builds its final Plan through Plan.of, so the tables only guide
the search and never decide what a plan reports."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from formats.errors import InputError
from partitioner.instance import InfeasibleError, Instance, Stage


class OutOfTime(Exception):
    """A search passed Tables.deadline before finding anything."""


# A path through the tables: (first segment, end segment, node index) per stage.
Path = list[tuple[int, int, int]]


@dataclass
class Tables:
    """Boundary b (0..S) is the cut before segment b: b = 0 is the model input, b = S its output.
    Node indices 0..N-1 are the instance's nodes in order; index N is the source."""

    instance: Instance
    names: list[str]
    speed: np.ndarray            # (N,)
    memory: np.ndarray           # (N,) bytes a node offers
    prefix_compute: np.ndarray   # (S+1,) compute_ms of segments [0, b)
    prefix_memory: np.ndarray    # (S+1,) memory_bytes of segments [0, b)
    boundary_bytes: np.ndarray   # (S+1,) bytes that cross boundary b
    bandwidth: np.ndarray        # (N+1, N+1) Mbps, 0 where the pair is missing or the same node
    # time.monotonic() by which a search must give up (None: no limit); the long loops of the
    # baselines check it through `check_time`, so auto's time limit holds on any size.
    deadline: float | None = None

    @classmethod
    def of(cls, instance: Instance) -> Tables:
        nodes = instance.nodes
        names = [n.name for n in nodes]
        endpoints = [*names, instance.source]
        size = len(endpoints)
        bandwidth = np.zeros((size, size))
        for i, a in enumerate(endpoints):
            for j, b in enumerate(endpoints):
                mbps = instance.bandwidth(a, b) if i != j else None
                # A node "hopping" to itself never happens in a plan (one stage per node), so
                # the diagonal is unusable rather than free.
                bandwidth[i, j] = mbps if mbps is not None and mbps > 0 else 0.0
        segments = instance.segments
        compute = np.concatenate([[0.0], np.cumsum([s.compute_ms for s in segments])])
        memory = np.concatenate([[0], np.cumsum([s.memory_bytes for s in segments])])
        boundary = np.array([instance.input_bytes, *(s.output_bytes for s in segments)],
                            dtype=float)
        return cls(instance, names, np.array([n.speed for n in nodes], dtype=float),
                   np.array([n.memory_bytes for n in nodes], dtype=np.int64),
                   compute, memory.astype(np.int64), boundary, bandwidth)

    def check_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OutOfTime("the time limit ran out")

    @property
    def n_segments(self) -> int:
        return len(self.prefix_compute) - 1

    @property
    def n_nodes(self) -> int:
        return len(self.names)

    @property
    def source(self) -> int:
        return self.n_nodes

    @cached_property
    def stage(self) -> np.ndarray:
        """(S+1, S+1, N) compute ms of stage [i, j) on node v; inf where j <= i or the stage
        does not fit the node's memory (or its model file the node's disk)."""
        s = self.n_segments
        work = self.prefix_compute[None, :] - self.prefix_compute[:, None]
        need = self.prefix_memory[None, :] - self.prefix_memory[:, None]
        upper = np.triu(np.ones((s + 1, s + 1), dtype=bool), k=1)
        overhead = self.instance.frame_overhead_ms    # per stage, see Instance
        costs = (work[:, :, None] + overhead) / self.speed[None, None, :]
        fits = upper[:, :, None] & (need[:, :, None] <= self.memory[None, None, :])
        disk = np.array([n.disk_bytes for n in self.instance.nodes], dtype=np.int64)
        if disk.any():
            # its model file must fit the node's disk too (0: a disk not counted)
            files = np.concatenate([[0], np.cumsum([s.model_bytes
                                                    for s in self.instance.segments])])
            on_disk = files[None, :] - files[:, None]
            fits &= (disk[None, None, :] == 0) | (on_disk[:, :, None] <= disk[None, None, :])
        return np.where(fits, costs, math.inf)

    @cached_property
    def hop(self) -> np.ndarray:
        """(S+1, N+1, N+1) ms to send boundary b's bytes from u to v; inf where unusable."""
        with np.errstate(divide="ignore"):
            per_byte = np.where(self.bandwidth > 0, 8.0 / (self.bandwidth * 1000.0), math.inf)
        with np.errstate(invalid="ignore"):
            hops = self.boundary_bytes[:, None, None] * per_byte[None, :, :]
        # 0 bytes over a missing link is still impossible (inf * 0 is nan).
        return np.where(np.isinf(per_byte)[None, :, :], math.inf, hops)

    def key(self, path: Path | None) -> tuple[float, float]:
        return key_of(self.stage, self.hop, path)

    def stages(self, path: Path) -> list[Stage]:
        return [Stage(first, end, self.names[v]) for first, end, v in path]

    def path_of(self, stages: list[Stage]) -> Path:
        index = {name: i for i, name in enumerate(self.names)}
        return [(s.first, s.end, index[s.node]) for s in stages]


def bottleneck_of(stage: np.ndarray, hop: np.ndarray, path: Path) -> float:
    n = stage.shape[2]
    worst, previous = 0.0, n
    for first, end, v in path:
        worst = max(worst, hop[first, previous, v], stage[first, end, v])
        previous = v
    return float(max(worst, hop[path[-1][1], previous, n]))


def path_latency(stage: np.ndarray, hop: np.ndarray, path: Path | None) -> float:
    if not path:
        return math.inf
    n = stage.shape[2]
    total, previous = 0.0, n
    for first, end, v in path:
        total += hop[first, previous, v] + stage[first, end, v]
        previous = v
    return float(total + hop[path[-1][1], previous, n])


def key_of(stage: np.ndarray, hop: np.ndarray, path: Path | None) -> tuple[float, float]:
    """(bottleneck, latency) of a path, the order plans are compared in; (inf, inf) for no
    path, so any plan beats it."""
    if not path:
        return (math.inf, math.inf)
    return (bottleneck_of(stage, hop, path), path_latency(stage, hop, path))


def candidates(stage: np.ndarray, hop: np.ndarray, low: float, high: float) -> np.ndarray:
    """Every finite cost value in [low, high], sorted and unique: a bottleneck is one."""
    values = [a[(a >= low) & (a <= high) & np.isfinite(a)] for a in (stage, hop)]
    return np.unique(np.concatenate(values))


# Of the memory available now, the share the cost tables may take: the searches allocate
# temporaries of the same shapes, and the rest of the run needs the remainder.
MEMORY_SHARE = 0.5
# And at most this much whatever the machine has: building the tables is not interruptible
# and runs at roughly 0.1 GB/s on the 2-core machine under load (2,000 segments x 5 nodes,
# 0.4 GB: 4.7 s), so larger tables alone would blow any planning time limit. Models here have
# at most a few hundred segments (a few MB of tables).
MAX_TABLE_BYTES = 1024**3


def table_bytes(segments: int, nodes: int) -> int:
    """Peak bytes of building Tables.stage and Tables.hop for an instance of this size:
    (S+1)^2 x N float64 costs plus their temporaries (17 bytes an entry all told), and
    (S+1) x (N+1)^2 hop times with theirs."""
    boundaries = segments + 1
    return 17 * (boundaries**2 * (nodes + 1) + boundaries * (nodes + 1) ** 2)


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (the kernel's estimate of what can be allocated without
    swapping)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def check_size(instance: Instance) -> None:
    """Refuse, before allocating anything, an instance whose tables would not fit this
    machine (InputError: exit 2 with the figures); 200 nodes once asked numpy for 149 GiB."""
    need = table_bytes(len(instance.segments), len(instance.nodes))
    available = available_bytes()
    budget = min(int(available * MEMORY_SHARE), MAX_TABLE_BYTES)
    if need > budget:
        raise InputError(
            f"too big for the planner: {len(instance.segments)} segments x "
            f"{len(instance.nodes)} nodes need about {need / 1024**3:.1f} GiB of cost tables; "
            f"the limit is {budget / 1024**3:.1f} GiB (at most {MAX_TABLE_BYTES / 1024**3:g} "
            f"GiB, and {MEMORY_SHARE:.0%} of the {available / 1024**3:.1f} GiB available "
            "now); merge segments (fewer cut points) or plan for fewer nodes",
            field="segments")


def check_basic_feasibility(tables: Tables) -> None:
    """Reasons no plan can exist that are visible without a search (InfeasibleError)."""
    instance = tables.instance
    largest = max(range(tables.n_segments), key=lambda i: instance.segments[i].memory_bytes)
    need = instance.segments[largest].memory_bytes
    if need > tables.memory.max():
        raise InfeasibleError(
            f"segment {largest} needs {need} bytes of memory, more than any node has "
            f"(largest: {int(tables.memory.max())} bytes)")
    if not (tables.bandwidth[tables.source, :tables.n_nodes] > 0).any():
        raise InfeasibleError(f"the source {instance.source} has no bandwidth to any node")
    needed = min_stages(tables, int(tables.memory.max()))
    if needed > tables.n_nodes:
        raise InfeasibleError(
            f"the segments need at least {needed} stages to fit even the largest node's memory "
            f"({int(tables.memory.max())} bytes), but there are only {tables.n_nodes} nodes")


def min_stages(tables: Tables, capacity: int) -> int:
    """Fewest contiguous groups of segments with at most `capacity` bytes each (greedy: taking
    as many segments as fit is optimal for a single capacity); a huge number if one never
    fits."""
    count, start = 0, 0
    s = tables.n_segments
    while start < s:
        end = int(np.searchsorted(tables.prefix_memory, tables.prefix_memory[start] + capacity,
                                  side="right")) - 1
        if end <= start:
            return s + len(tables.names) + 1
        count, start = count + 1, end
    return count
