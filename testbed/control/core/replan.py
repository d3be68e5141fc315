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
- A sound epoch being deployed is let finish: a fault that does not touch its hosts does
  not replace it (`hold`). Under overlapping faults each deploy loads models for seconds
  while faults come every few seconds; when each fault's re-plan replaced the epoch still
  deploying, nothing ever became active. Such a request is dropped, not queued
  (`replan.deferred`): once that epoch is active, the fault did not touch the epoch in
  force; if it fails instead, its own failure asks for a re-plan from the hosts usable then,
  which answers both. A fault that touches the deploying epoch breaks it, and is not held;
  nor is the driver's request (`force`). A host that became available is not forgotten
  with its request: the caller weighs it by the rejoin rule once the epoch serves
  (`Request.hosts`).
- The same holds for a request that was pending when the epoch was made (a plan job ran
  meanwhile): a sound epoch made after the request was asked answers it (`answered`),
  since a plan is checked against the hosts lost while it was computed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from partitioner.instance import Plan
from testbed.control import events as ev
from testbed.control.core.actions import Event

REJOIN = "rejoin"


@dataclass(frozen=True)
class Request:
    kind: str
    reason: str
    generation: int = 0         # `Epochs.next` when asked (merged: the newest)
    force: bool = False         # the driver's: never held
    hosts: frozenset[str] = frozenset()     # became available: weigh them if it is dropped


def hold(deploying_sound: bool, touches_deploying: bool) -> bool:
    """Is a re-plan asked for now held until the epoch being deployed is settled?"""
    return deploying_sound and not touches_deploying


def answered(request: Request, deploying: int | None, deploying_sound: bool) -> bool:
    """Does the sound epoch `deploying` (its number), made after `request` was asked,
    answer it? Then the request is dropped when it is taken, as `hold` would have."""
    return deploying is not None and deploying_sound and not request.force and \
        deploying >= request.generation


class Replans:
    """The pending re-plan request (module docstring)."""

    def __init__(self) -> None:
        self.pending: Request | None = None

    @staticmethod
    def defer(kind: str, reason: str, epoch: int) -> list[Event]:
        """A request not made while `epoch` (deploying, sound) finishes (`hold`)."""
        return [Event(ev.REPLAN_DEFERRED, {"kind": kind, "reason": reason,
                                           "deploying_epoch": epoch})]

    def want(self, kind: str, reason: str, generation: int = 0, force: bool = False,
             hosts: frozenset[str] = frozenset()) -> list[Event]:
        pending = self.pending
        if pending is not None and (pending.kind != REJOIN or kind == REJOIN):
            # one request answers both: the newest generation (an epoch made between the
            # two answers the first only), the driver's force and every available host
            self.pending = replace(pending, generation=max(pending.generation, generation),
                                   force=pending.force or force, hosts=pending.hosts | hosts)
            return []
        if pending is not None:     # a rejoin upgraded: its hosts are still to weigh
            hosts |= pending.hosts
        self.pending = Request(kind, reason, generation, force, hosts)
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
