"""Does the cost model hold for this run's stages? Each stage's host CPU per frame (its
cgroup's CPU over the measured window divided by the requests answered) against what the
planner charged it: (profiled compute + the instance's per-frame overhead) x cores /
effective speed (`partitioner.profile.effective_speed`: a host under a CFS quota starts each
period with cold caches).

Division of labour: testbed.emulation.hostmon measures the hosts' CPU, the planner's
instance and plan say what each stage should cost; this module compares them (plain data in,
plain data out) for summary.json, so that a run whose prediction is off names the stage that
ran dearer than its model (another process slowing the machine, a profile that no longer
fits) instead of leaving a ratio that reads as a planner error. benchmarks/pipeline.py fits
the overhead term to the same figures.

Only stages whose host was at least BUSY_FOR_CHECK busy are judged: on a mostly idle host
the agent's heartbeats and the runtime's idle wake-ups, divided by few frames, read as
per-frame cost. A run that re-planned is not checked (its stages are not the first plan's).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from partitioner.instance import MIB, Instance, Plan
from partitioner.profile import effective_speed
from testbed.control import events as ev

BUSY_FOR_CHECK = 0.7
TOLERANCE = 0.2         # a stage dearer than its model by more than this is named


@dataclass(frozen=True)
class StageCpu:
    node: str
    segments: tuple[int, int]
    cores: float
    received_mib: float
    compute_ms: float       # profiled, at a full core
    overhead_ms: float      # what the instance charges it per frame, at a full core
    cpu_ms: float           # measured: the host's CPU per answered request
    busy: float             # share of the host's quota it used

    def modelled_ms(self, overhead_ms: float | None = None) -> float:
        """Its CPU per frame on its host as the cost model has it (with `overhead_ms` in
        place of the instance's, when given)."""
        overhead = self.overhead_ms if overhead_ms is None else overhead_ms
        return (self.compute_ms + overhead) * self.cores / effective_speed(self.cores)

    @property
    def implied_overhead_ms(self) -> float:
        """The per-frame overhead (full core) that would make the model match what it used."""
        return self.cpu_ms * effective_speed(self.cores) / self.cores - self.compute_ms

    @property
    def ratio(self) -> float:
        """Measured over modelled CPU per frame."""
        return self.cpu_ms / self.modelled_ms()

    @property
    def judged(self) -> bool:
        return self.busy >= BUSY_FOR_CHECK


def stage_cpu(instance: Instance, plan: Plan, cores: dict[str, float],
              host_cpu: dict[str, list[float]], rate_rps: float) -> list[StageCpu]:
    """Each stage of `plan` whose host has CPU samples (cores used, one a second over the
    measured window), at `rate_rps` requests answered a second (each of a plan's pipelines
    side by side takes its share of them)."""
    per_pipeline = rate_rps / max(1, len(plan.chains))
    nodes = [stage.node for stage in plan.stages]
    stages = []
    for stage in plan.stages:
        used = host_cpu.get(stage.node)
        if not used or per_pipeline <= 0 or stage.node not in cores or \
                nodes.count(stage.node) > 1:      # a host's CPU cannot be split by stage
            continue
        received = instance.received_bytes(stage.first)
        mean = statistics.mean(used)
        stages.append(StageCpu(
            node=stage.node, segments=(stage.first, stage.end), cores=cores[stage.node],
            received_mib=received / MIB,
            compute_ms=sum(s.compute_ms for s in instance.segments[stage.first:stage.end]),
            overhead_ms=instance.overhead_for(received), cpu_ms=mean / per_pipeline * 1000.0,
            busy=mean / cores[stage.node]))
    return stages


def host_cpu_series(rows: Iterable[dict[str, Any]]) -> dict[str, list[float]]:
    """Each host's CPU samples (cores used) from timeseries rows with `HOST_cpu` columns
    (testbed.emulation.hostmon's buckets, or timeseries.csv read back: empty when missing)."""
    series: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.endswith("_cpu") and value not in (None, ""):
                series.setdefault(key.removesuffix("_cpu"), []).append(float(value))
    return series


def replanned(events: Iterable[dict[str, Any]]) -> bool:
    """Was a plan deployed after the first (a re-plan or a rollout)?"""
    return sum(e.get("type") == ev.PLAN_DEPLOYED for e in events) > 1


def dearer(stages: list[StageCpu]) -> list[StageCpu]:
    """The judged stages dearer than their model by more than TOLERANCE, dearest first."""
    return sorted((s for s in stages if s.judged and s.ratio > 1.0 + TOLERANCE),
                  key=lambda s: -s.ratio)


def describe(stage: StageCpu) -> str:
    return (f"{stage.node} [{stage.segments[0]}, {stage.segments[1]}) used "
            f"{stage.ratio:.2f}x the CPU a frame its model gives ({stage.cpu_ms:.1f} ms "
            f"against {stage.modelled_ms():.1f})")


def summary_section(stages: list[StageCpu], replanned: bool) -> dict[str, Any]:
    """summary.json's `cost_check`."""
    if replanned:
        return {"checked": False, "why": "another plan was deployed during the run"}
    return {"checked": bool(stages), "busy_for_check": BUSY_FOR_CHECK,
            "tolerance": TOLERANCE,
            "stages": [{**{k: round(v, 3) if isinstance(v, float) else v
                           for k, v in asdict(s).items()},
                        "modelled_ms": round(s.modelled_ms(), 3), "ratio": round(s.ratio, 3),
                        "judged": s.judged} for s in stages],
            "dearer": [describe(s) for s in dearer(stages)]}
