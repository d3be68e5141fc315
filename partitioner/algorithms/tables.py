"""Cost tables: an Instance turned into numpy arrays indexed by segment boundary and node, so
the searches never look names up. The costs mirror partitioner.instance.plan_cost (the one cost
function); every algorithm still builds its final Plan through Plan.of, so the tables only guide
the search and never decide what a plan reports."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from formats.errors import InputError
from partitioner.instance import InfeasibleError, Instance, Stage


class OutOfTime(Exception):
    """A search passed Tables.deadline before finding anything."""


# Entries of the stage table built between two looks at the clock (about 20 ms of work).
CHUNK_ENTRIES = 1_000_000

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
    disk: np.ndarray             # (N,) bytes of disk a node offers (0: not counted)
    prefix_files: np.ndarray     # (S+1,) model file bytes of segments [0, b)
    # time.monotonic() by which a search must give up (None: no limit); the long loops of the
    # baselines and the building of the tables check it through `check_time`, so auto's time
    # limit holds on any size.
    deadline: float | None = None

    @classmethod
    def of(cls, instance: Instance) -> Tables:
        nodes = instance.nodes
        names = [n.name for n in nodes]
        endpoints = [*names, instance.source]
        index = {name: i for i, name in enumerate(endpoints)}
        pairs = [(index[a], index[b], mbps) for (a, b), mbps in instance.bandwidth_mbps.items()
                 if a in index and b in index and a != b]
        bandwidth = np.zeros((len(endpoints), len(endpoints)))
        if pairs:
            rows, columns, values = (np.array(x) for x in zip(*pairs))
            # As Instance.bandwidth: symmetric, and an (a, b) entry wins over a (b, a) one.
            bandwidth[columns, rows] = values
            bandwidth[rows, columns] = values
            # A node "hopping" to itself never happens in a plan (one stage per node), so the
            # diagonal is unusable rather than free (0, as a missing pair).
            bandwidth = np.where(bandwidth > 0, bandwidth, 0.0)
        segments = instance.segments
        compute = np.concatenate([[0.0], np.cumsum([s.compute_ms for s in segments])])
        memory = np.concatenate([[0], np.cumsum([s.memory_bytes for s in segments])])
        boundary = np.array([instance.input_bytes, *(s.output_bytes for s in segments)],
                            dtype=float)
        files = np.concatenate([[0], np.cumsum([s.model_bytes for s in segments])])
        return cls(instance, names, np.array([n.speed for n in nodes], dtype=float),
                   np.array([n.memory_bytes for n in nodes], dtype=np.int64),
                   compute, memory.astype(np.int64), boundary, bandwidth,
                   np.array([n.disk_bytes for n in nodes], dtype=np.int64),
                   files.astype(np.int64))

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
        does not fit the node's memory (or its model file the node's disk). Built a block of
        rows at a time with the deadline checked in between (OutOfTime): 300 segments x 200
        nodes take over a second, more than a short time limit leaves after the baselines."""
        s, n = self.n_segments, self.n_nodes
        table = np.empty((s + 1, s + 1, n))
        rows = max(1, CHUNK_ENTRIES // table[0].size)
        ends = np.arange(s + 1)[None, :]
        for first in range(0, s + 1, rows):
            self.check_time()
            last = min(first + rows, s + 1)
            table[first:last] = self.stage_costs(np.arange(first, last)[:, None], ends)
        return table

    def stage_costs(self, first: np.ndarray, end: np.ndarray,
                    node: np.ndarray | None = None) -> np.ndarray:
        """Entries [first, end, node] of `stage` (broadcast against each other; no `node`:
        every node, on a last axis), by the same arithmetic: `key` uses it, so that the
        baselines never need the whole table."""
        if node is None:
            first, end, node = first[..., None], end[..., None], np.arange(self.n_nodes)
        work = self.prefix_compute[end] - self.prefix_compute[first]
        need = self.prefix_memory[end] - self.prefix_memory[first]
        # per stage: fixed, and per MiB it receives (Instance.stage_overhead_ms)
        overhead = self.instance.overhead_for(self.boundary_bytes[first])
        costs = (work + overhead) / self.speed[node]
        fits = (end > first) & (need <= self.memory[node])
        if self.disk.any():
            # its model file must fit the node's disk too (0: a disk not counted)
            disk = self.disk[node]
            fits &= (disk == 0) | (self.prefix_files[end] - self.prefix_files[first] <= disk)
        return np.where(fits, costs, math.inf)

    @cached_property
    def per_byte(self) -> np.ndarray:
        """(N+1, N+1) ms per byte from u to v; inf where unusable."""
        with np.errstate(divide="ignore"):
            return np.where(self.bandwidth > 0, 8.0 / (self.bandwidth * 1000.0), math.inf)

    @cached_property
    def hop(self) -> np.ndarray:
        """(S+1, N+1, N+1) ms to send boundary b's bytes from u to v; inf where unusable.
        Built like `stage`, a block at a time with the deadline checked in between."""
        s, size = self.n_segments, self.n_nodes + 1
        table = np.empty((s + 1, size, size))
        rows = max(1, CHUNK_ENTRIES // table[0].size)
        endpoints = np.arange(size)
        for first in range(0, s + 1, rows):
            self.check_time()
            last = min(first + rows, s + 1)
            table[first:last] = self.hop_costs(np.arange(first, last)[:, None, None],
                                               endpoints[:, None], endpoints[None, :])
        return table

    def hop_costs(self, boundary: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Entries [boundary, u, v] of `hop` (broadcast against each other), by the same
        arithmetic."""
        per_byte = self.per_byte[u, v]
        with np.errstate(invalid="ignore"):
            hops = self.boundary_bytes[boundary] * per_byte
        # 0 bytes over a missing link is still impossible (inf * 0 is nan).
        return np.where(np.isinf(per_byte), math.inf, hops)

    def key(self, path: Path | None) -> tuple[float, float]:
        """key_of without the tables: each cost computed on its own (the baselines compare
        hundreds of plans before the search needs, and builds, the whole tables)."""
        if not path:
            return (math.inf, math.inf)
        firsts, ends, nodes = (np.array(column) for column in zip(*path))
        costs = self.stage_costs(firsts, ends, nodes)
        n = self.n_nodes
        previous = np.array([n, *nodes[:-1]])
        hops = self.hop_costs(firsts, previous, nodes)
        out = float(self.hop_costs(ends[-1], nodes[-1], n))
        bottleneck = float(max(hops.max(), costs.max(), out))
        latency = 0.0
        for hop, cost in zip(hops.tolist(), costs.tolist()):
            latency += hop + cost
        return (bottleneck, latency + out)

    def quick_bound(self) -> float:
        """A lower bound on the bottleneck from the instance's totals alone: the input's
        cheapest hop from the source, the output's back to it, the largest segment on the
        fastest node, and all the compute spread over every node in proportion to its speed
        (a stage on v costs (work + overhead) / speed_v, so no plan beats
        (total + overhead) / sum of speeds; the fixed overhead: the per-MiB part only adds)."""
        n, overhead = self.n_nodes, self.instance.frame_overhead_ms
        compute = np.diff(self.prefix_compute)
        nodes = np.arange(n)
        return float(max(self.hop_costs(0, n, nodes).min(),
                         self.hop_costs(self.n_segments, nodes, n).min(),
                         (compute.max() + overhead) / self.speed.max(),
                         (self.prefix_compute[-1] + overhead) / self.speed.sum()))

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


class Candidates:
    """The finite cost values of the tables, in which every bottleneck is one, searched without
    sorting them all (300 segments x 200 nodes have 18 M; np.unique over them took 2.8 s).
    Scans go a block of rows at a time and raise OutOfTime past `deadline` in between. A fixed
    random sample of the entries picks thresholds near the middle (by count) of a wide
    interval; once an interval holds at most WINDOW values they are listed exactly, so the
    search ends on exact candidates as if all were sorted."""

    def __init__(self, stage: np.ndarray, hop: np.ndarray, deadline: float | None = None,
                 seed: int = 0) -> None:
        self.arrays = (stage, hop)
        self.deadline = deadline
        self.size = stage.size + hop.size
        rng = np.random.default_rng(seed)
        picked = []
        self.drawn = 0      # entries drawn, finite or not: the sample's share of the size
        for a in self.arrays:
            share = min(a.size, max(1, SAMPLE * a.size // self.size))
            picks = a.reshape(-1) if share == a.size else a.flat[rng.integers(0, a.size, share)]
            picked.append(picks[np.isfinite(picks)])
            self.drawn += share
        self.sample = np.sort(np.concatenate(picked))
        # Every candidate in [low, high] (sorted, unique) of the last interval listed.
        self.window: tuple[float, float, np.ndarray] | None = None

    def _blocks(self) -> Iterator[np.ndarray]:
        for a in self.arrays:
            rows = max(1, CHUNK_ENTRIES // max(1, a[0].size))
            for first in range(0, a.shape[0], rows):
                if self.deadline is not None and time.monotonic() > self.deadline:
                    raise OutOfTime("the time limit ran out")
                yield a[first:first + rows]

    def at_least(self, low: float) -> float:
        """The smallest candidate >= low (inf: none)."""
        best = math.inf
        for block in self._blocks():
            above = block[(block >= low) & (block < best)]
            if above.size:
                best = float(above.min())      # inf is never < best, so never taken
        return best

    def within(self, low: float, high: float) -> np.ndarray | None:
        """Every candidate in [low, high], sorted and unique; None when there are too many to
        list (the sample estimates more than WINDOW entries, or the scan finds them)."""
        if self.window is not None and self.window[0] <= low and high <= self.window[1]:
            # the intervals of a bisection only shrink: the list at hand still covers them
            listed = self.window[2]
            return listed[(listed >= low) & (listed <= high)]
        inside = np.count_nonzero((self.sample >= low) & (self.sample <= high))
        if inside * self.size > WINDOW * self.drawn:
            return None
        found, count = [], 0
        for block in self._blocks():
            values = block[(block >= low) & (block <= high) & np.isfinite(block)]
            count += values.size
            if count > 4 * WINDOW:
                return None
            found.append(values)
        listed = np.unique(np.concatenate(found)) if found else np.empty(0)
        self.window = (low, high, listed)
        return listed

    def pick(self, low: float, high: float, first: bool = False) -> tuple[float | None, float]:
        """The next threshold of a binary search whose candidates below `low` are settled and
        whose `high` is a candidate (or inf): the middle candidate of [low, high), or the
        least one when `first`; and the least value above it that is still unsettled (the
        next candidate where they are listed). None when [low, high) holds no candidate."""
        listed = self.within(low, high)
        if listed is not None:
            if not listed.size or listed[0] >= high:
                return None, high
            # high itself is listed when finite: the middle of the ones below it
            below = len(listed) - 1 if math.isfinite(high) else len(listed)
            mid = 0 if first else below // 2
            after = float(listed[mid + 1]) if mid + 1 < len(listed) else math.inf
            return float(listed[mid]), after
        drawn = self.sample[(self.sample >= low) & (self.sample < high)]
        if first or not drawn.size:
            threshold = self.at_least(low)
        else:
            threshold = float(drawn[len(drawn) // 2])
        if threshold >= high:
            return None, high
        return threshold, float(np.nextafter(threshold, math.inf))


# Entries drawn for Candidates' sample, and the most candidates it lists exactly.
SAMPLE = 100_000
WINDOW = 50_000


# Of the memory available now, the share the cost tables may take: the searches allocate
# temporaries of the same shapes, and the rest of the run needs the remainder.
MEMORY_SHARE = 0.5
# And at most this much whatever the machine has: the tables are built at roughly 0.1 GB/s on
# the 2-core machine under load (2,000 segments x 5 nodes, 0.4 GB: 4.7 s), so a search on
# larger ones would rarely get past building them within a planning time limit (it stops
# there with the baselines' plan). Models here have at most a few hundred segments.
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
