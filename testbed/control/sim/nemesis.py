"""Seeded random fault schedules (Jepsen's nemesis): crash and restart, pause and resume,
partition and heal, a slow node, a full disk, a model update and a rollback, on random hosts
at random times, in any order and overlapping (two faults may hit the same host at once).
Every fault that has an end ends within the schedule's span, so the cluster is whole again
after `Schedule.healed_at`.

Division of labour: this module only draws schedules (plain data, a function of the seed and
the host names); testbed.control.sim.world carries a fault out (`World.fault`), and
testbed.control.sim.run applies a schedule to a world.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

# a fault kind -> its start action and its end action (None: a single step)
KINDS: dict[str, tuple[str, str | None]] = {
    "crash": ("crash", "restart"),
    "restart": ("restart", None),           # a process restart of a running node
    "pause": ("pause", "resume"),
    "partition": ("partition", "heal"),
    "slow": ("slow", "fast"),
    "disk_full": ("disk_full", "disk_free"),
    "update": ("publish", None),
    "rollback": ("rollback", None),
}
CLUSTER_WIDE = {"publish", "rollback"}
SLOW_FACTORS = (1.5, 3.0, 6.0)


@dataclass(frozen=True)
class Step:
    at: float                   # seconds after the workload started
    action: str
    target: str                 # a host, or "cluster"
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.params.items())
        return f"{self.at:.2f}s {self.action} {self.target}{extra}"


@dataclass(frozen=True)
class Schedule:
    seed: int
    steps: list[Step]           # in time order

    @property
    def healed_at(self) -> float:
        return max((s.at for s in self.steps), default=0.0)

    def kinds(self) -> list[str]:
        return sorted({s.action for s in self.steps})


def draw(seed: int, hosts: list[str], span_s: float = 20.0, most: int = 6) -> Schedule:
    """A schedule of 1 to `most` faults starting within `span_s`, each lasting 0.3-10 s."""
    rng = random.Random(seed)
    steps: list[Step] = []
    for _ in range(rng.randint(1, most)):
        kind = rng.choice(sorted(KINDS))
        begin, end = KINDS[kind]
        start = round(rng.uniform(0.0, span_s), 3)
        target = "cluster" if begin in CLUSTER_WIDE else rng.choice(hosts)
        params = {"factor": rng.choice(SLOW_FACTORS)} if kind == "slow" else {}
        steps.append(Step(start, begin, target, params))
        if end is not None:
            steps.append(Step(round(start + rng.uniform(0.3, 10.0), 3), end, target))
    order = sorted(range(len(steps)), key=lambda i: (steps[i].at, i))
    return Schedule(seed, [steps[i] for i in order])


def churn(seed: int, hosts: list[str], pairs: int = 6) -> Schedule:
    """`pairs` overlapping crash/restart pairs (issue 11's restart churn, closer together):
    every 2-4 s a host that is up crashes, and it is back 3-5 s later, so each crash lands
    while the epoch answering the previous one still loads its models. A host still down is
    not picked: its restart would end the later crash early (at most three are down at once,
    so four hosts suffice)."""
    rng = random.Random(seed)
    steps: list[Step] = []
    back: dict[str, float] = {}         # host -> when its restart is due
    at = 0.0
    for _ in range(pairs):
        up = [h for h in hosts if back.get(h, -1.0) < at]
        target = rng.choice(up)
        back[target] = round(at + rng.uniform(3.0, 5.0), 3)
        steps.append(Step(round(at, 3), "crash", target))
        steps.append(Step(back[target], "restart", target))
        at += rng.uniform(2.0, 4.0)
    order = sorted(range(len(steps)), key=lambda i: (steps[i].at, i))
    return Schedule(seed, [steps[i] for i in order])
