"""Per-host CPU and memory over a run, for timeseries.csv.

Division of labour: `testbed.emulation.network` gives every host a cpuacct and a memory cgroup named
after it; this module only reads their counters from the root namespace (`cpuacct.usage`,
nanoseconds of CPU used so far; `memory.usage_in_bytes`, which includes the host's tmpfs
pages), once a second in a thread, and turns the readings into the 1 s buckets of the
results (`testbed.experiment.results.write_timeseries(..., host_samples=...)`).
Reading a cgroup file
costs microseconds and no host CPU, so the sampler does not disturb what it measures.

    monitor = HostMonitor.for_network(net)
    monitor.start()
    ...
    monitor.stop()
    samples = monitor.buckets(window_start, duration_s)   # {0: {"edge1_cpu": 0.19, ...}}
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from testbed.emulation.records import CGROUP_ROOT

Reading = dict[str, tuple[int, int]]    # host -> (cpu ns used so far, memory bytes)


class HostMonitor:
    """Samples the hosts' cgroups every `interval_s` from a thread."""

    def __init__(self, cgroups: dict[str, str], interval_s: float = 1.0) -> None:
        self.cgroups = dict(cgroups)   # host -> its cgroup name (the Mininet node name)
        self.interval_s = interval_s
        self.readings: list[tuple[float, Reading]] = []   # (unix time, reading)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_network(cls, net: Any, interval_s: float = 1.0) -> HostMonitor:
        return cls({host: net.names[host] for host in net.topology.hosts}, interval_s)

    def read(self) -> Reading:
        """One reading of every host whose cgroups exist (a torn-down host is left out)."""
        reading = {}
        for host, name in self.cgroups.items():
            try:
                cpu = int((CGROUP_ROOT / "cpuacct" / name / "cpuacct.usage").read_text())
                memory = int((CGROUP_ROOT / "memory" / name / "memory.usage_in_bytes")
                             .read_text())
            except (OSError, ValueError):
                continue
            reading[host] = (cpu, memory)
        return reading

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hostmon", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.readings.append((time.time(), self.read()))
            next_at += self.interval_s
            # Sleep to a fixed grid, so slow reads do not make the interval drift.
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        """Stop sampling, with a last reading so the final bucket has an interval too."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            self.readings.append((time.time(), self.read()))

    def buckets(self, window_start: float, duration_s: float,
                width_s: float = 1.0) -> dict[int, dict[str, float]]:
        """Per bucket of the measured window: `<host>_cpu` (cores used: CPU time over wall
        time, averaged over the sampling intervals whose middle falls in the bucket) and
        `<host>_mem_mb` (the largest reading in the bucket, MiB)."""
        count = max(1, math.ceil(duration_s / width_s - 1e-9))
        cpu: dict[int, dict[str, list[float]]] = {}
        memory: dict[int, dict[str, float]] = {}
        for (t0, r0), (t1, r1) in zip(self.readings, self.readings[1:]):
            index = math.floor(((t0 + t1) / 2 - window_start) / width_s)
            if 0 <= index < count and t1 > t0:
                for host in r0.keys() & r1.keys():
                    cores = (r1[host][0] - r0[host][0]) / 1e9 / (t1 - t0)
                    cpu.setdefault(index, {}).setdefault(host, []).append(cores)
        for t, reading in self.readings:
            index = math.floor((t - window_start) / width_s)
            if 0 <= index < count:
                for host, (_, used) in reading.items():
                    mib = used / 2**20
                    slot = memory.setdefault(index, {})
                    slot[host] = max(slot.get(host, 0.0), mib)
        result: dict[int, dict[str, float]] = {}
        for index in sorted(cpu.keys() | memory.keys()):
            row = result.setdefault(index, {})
            for host, values in cpu.get(index, {}).items():
                row[f"{host}_cpu"] = round(sum(values) / len(values), 3)
            for host, mib in memory.get(index, {}).items():
                row[f"{host}_mem_mb"] = round(mib, 1)
        return result
