"""Taking a node back: the hold (it must be stable for a while after it returned) and the
margin rule (a plan that uses it must beat the plan in force by `rejoin_margin`).

The hold clock restarts when the node fails again before it ends; how long it is comes from
core.backoff (it doubles with the node's failures). While no plan fits at all the hold does
not apply: nothing runs that could flap (the backends pass `hold_s` 0 then).
"""

from __future__ import annotations

from dataclasses import dataclass

from partitioner.instance import Plan
from testbed.control import events as ev
from testbed.control import policy
from testbed.control.core.actions import Event


class RejoinHold:
    """Nodes back from a failure, each with the time it came back."""

    def __init__(self) -> None:
        self.since: dict[str, float] = {}

    def start(self, host: str, now: float) -> None:
        self.since[host] = now

    def cancel(self, host: str) -> None:
        """It failed again (or is gone): a later return starts a new hold."""
        self.since.pop(host, None)

    def waiting(self, host: str) -> bool:
        return host in self.since

    def due(self, host: str, now: float, hold_s: float) -> bool:
        """True once (the hold is then over and forgotten) when `host` has been back for
        `hold_s`."""
        since = self.since.get(host)
        if since is None or now - since < hold_s:
            return False
        del self.since[host]
        return True


SAME_PLACEMENT = "the same placement as the epoch in force"


@dataclass(frozen=True)
class Verdict:
    """The margin rule's answer for a candidate plan against the plan in force."""

    accepted: bool
    same: bool                  # the candidate is the plan in force
    reason: str
    current_bottleneck_ms: float
    candidate_bottleneck_ms: float
    margin: float

    def event(self) -> Event:
        return Event(ev.REJOIN_ACCEPTED if self.accepted else ev.REJOIN_DECLINED, {
            "reason": self.reason,
            "current_bottleneck_ms": round(self.current_bottleneck_ms, 3),
            "candidate_bottleneck_ms": round(self.candidate_bottleneck_ms, 3),
            "margin": self.margin})


def judge(candidate: Plan, current: Plan, margin: float, reason: str) -> Verdict:
    """Take the candidate only if it moves something and its bottleneck is at least
    `margin` below the current one (policy.better_by_margin)."""
    same = policy.same_placement(candidate, current)
    accepted = not same and policy.better_by_margin(candidate, current, margin)
    return Verdict(accepted, same, SAME_PLACEMENT if same else reason,
                   current.bottleneck_ms, candidate.bottleneck_ms, margin)
