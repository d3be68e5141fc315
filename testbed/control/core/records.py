"""The embedded control plane's records, as plain data: the workers it wants (`Slot`: a stage
model of one version on a host's data port, serving some epochs or standing by) and its
epochs (`Epoch`: a plan whose stages are workers, with its life cycle). Node health records
are core.health's (`NodeRecord`).

Division of labour: testbed.control.plane changes these records as it decides; this module
only says what they hold, so tests and simulations can build and read them without a plane.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from partitioner.instance import Plan
from stage_image.security import KeyPair
from testbed.control.planning import StageFile
from testbed.control.policy import Held


@dataclass
class Slot:
    """One worker we want on a host: a stage model of one version on a data port, serving
    the epochs in `routes` (epoch -> stage index), or standing by when it has none."""

    host: str
    port: int
    version: int
    first: int
    end: int
    stage: StageFile
    standby: bool = False
    routes: dict[int, int] = field(default_factory=dict)
    confirmed: set[int] = field(default_factory=set)     # routes the agent says are in force
    state: str = "new"          # as reported: fetching | starting | ready (| new: not yet)
    sent: dict[int, float] = field(default_factory=dict)  # epoch (0: prepare) -> when asked
    keys: KeyPair | None = None     # CurveZMQ: the worker's own keypair

    @property
    def held(self) -> Held:
        return Held(self.host, self.first, self.end, self.version)


@dataclass
class Epoch:
    number: int
    version: int
    plan: Plan
    slots: list[Slot]
    kind: str
    state: str = "waiting"     # waiting | deploying | active | draining | retired | abandoned
    broken: bool = False       # lost a worker: it can never serve again
    created: float = 0.0
    deployed: float = 0.0
    drain_until: float = 0.0
    activated: float = 0.0
    reused: int = 0            # stages served by workers that were loaded before
    bridge: bool = False       # serves first, before a better plan slower to deploy
    expected_ready: float = 0.0    # when its plan's deploy estimate says it serves
    compute_ms: list[float] = field(default_factory=list)   # planned, per stage

    @property
    def hosts(self) -> list[str]:
        return [s.host for s in self.slots]

    def ready(self) -> bool:
        return all(self.number in s.confirmed for s in self.slots)
