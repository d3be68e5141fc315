"""The embedded ControlPlane's boundary with its shell: the actions it returns (`Send`,
`StartJob`, and the core's `Event`), which the ZeroMQ shell (testbed.control.controller) and
the simulation (testbed.control.sim.world) carry out, and what it asks of the dispatcher
(`DispatcherPort`). Plain data and a Protocol; nothing here decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from stage_image.security import KeyPair
from testbed.control.core.actions import Event
from testbed.control.dispatcher import Route, Workload
from testbed.control.planning import PlanRequest


@dataclass(frozen=True)
class Send:
    """A control message to a host's agent (stage_image.wire schema)."""

    host: str
    kind: str
    fields: dict[str, Any] = field(default_factory=dict)
    blob: bytes | None = None


@dataclass(frozen=True)
class StartJob:
    """Slow work for the job thread; its outcome comes back through `ControlPlane.job_done`.
    kind: bootstrap | initial | version (`manifest`) | plan | rejoin | contingency
    (`request`)."""

    kind: str
    request: PlanRequest | None = None
    manifest: Any = None


Action = Send | Event | StartJob


class DispatcherPort(Protocol):
    """What the plane asks of the dispatcher (testbed.control.dispatcher.Dispatcher)."""

    pool: list[Any]
    state: str
    sink_address: str
    keys: KeyPair | None

    def set_pool(self, pool: list[Any]) -> None: ...
    def add_version(self, version: int, references: list[Any]) -> None: ...
    def switch(self, route: Route, replay: bool = True) -> int: ...
    def replay_epochs(self, epochs: set[int] | None, reason: str) -> int: ...
    def retire(self, epoch: int) -> None: ...
    def in_flight_on(self, epoch: int) -> int: ...
    def start(self, workload: Workload) -> None: ...
    def status(self) -> dict[str, Any]: ...
