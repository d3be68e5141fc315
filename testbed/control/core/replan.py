"""Re-planning and epochs, the same for both backends: which pending re-plan request wins,
what kind of plan to ask for, when a finished plan is stale, and epoch numbers.

- One request is pending at a time. A request that answers a failure (`failure`,
  `straggler`, `rollout`, `manual`, `initial`) outranks a `rejoin` (a look for a better
  plan): a pending rejoin is upgraded, anything else is kept as it was asked first, and
  only the first request writes `replan.requested`.
- Epochs are numbered once, in order, never reused: a plan deployed as an epoch takes the
  next number (`Epochs.allocate`), and a plan made for an older number is stale
  (`Epochs.current`): an epoch was made meanwhile.
- A plan that uses a node lost while it was computed is stale (`lost_while_planning`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from partitioner.instance import Plan
from testbed.control import events as ev
from testbed.control.core.actions import Event

REJOIN = "rejoin"


@dataclass(frozen=True)
class Request:
    kind: str
    reason: str


class Replans:
    """The pending re-plan request (module docstring)."""

    def __init__(self) -> None:
        self.pending: Request | None = None

    def want(self, kind: str, reason: str) -> list[Event]:
        pending = self.pending
        if pending is not None and (pending.kind != REJOIN or kind == REJOIN):
            return []
        self.pending = Request(kind, reason)
        return [Event(ev.REPLAN_REQUESTED, {"kind": kind, "reason": reason})]

    def take(self) -> Request | None:
        """The request to start now (it is no longer pending)."""
        pending, self.pending = self.pending, None
        return pending


def failure_kind(broken: bool, straggling: bool, rollout: bool) -> str:
    """What a re-plan answers, for plan.computed and the epoch: a broken pipeline, a
    straggler left behind, a new target version, or the driver's request."""
    if broken:
        return "failure"
    if straggling:
        return "straggler"
    if rollout:
        return "rollout"
    return "manual"


def lost_while_planning(plan: Plan, usable: Iterable[str]) -> list[str]:
    """The plan's nodes that are not usable now (sorted; empty: the plan still stands)."""
    live = set(usable)
    return sorted({s.node for s in plan.stages if s.node not in live})


def stale_event(lost: list[str]) -> Event:
    return Event(ev.PLAN_STALE, {"reason": f"hosts {lost} lost while planning"})


class Epochs:
    """Epoch numbers: `next` is the number the next epoch gets."""

    def __init__(self, next_epoch: int = 1) -> None:
        self.next = next_epoch

    def allocate(self) -> int:
        number, self.next = self.next, self.next + 1
        return number

    def current(self, generation: int) -> bool:
        """A plan asked for when `next` was `generation` still answers today's question."""
        return generation == self.next
