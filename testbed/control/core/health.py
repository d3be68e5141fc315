"""Node health from heartbeats: suspicion after `suspect_after_missed` silent intervals, the
return of a suspected node and its rejoin hold, the unhealthy back-off after a failure, and
whether a plan may use a node now.

Division of labour: this module keeps one `NodeRecord` per node and turns what happened
(a hello, a heartbeat, a failure, the passing of time) into events; the backend decides
what a suspicion or a usable node means for its pipeline (the embedded controller forgets
the node's workers and re-plans). The k3s loop judges nodes by the API and the stages'
heartbeats instead (testbed.k8s.loop.Decider) and shares `stall_s`, core.rejoin and
core.backoff with this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from formats.control import ControlSettings
from testbed.control import events as ev
from testbed.control.core.actions import Event
from testbed.control.core.backoff import backoff_s
from testbed.control.core.rejoin import RejoinHold


def stall_s(last_tick: float | None, now: float, heartbeat_s: float) -> float | None:
    """How long the loop itself did not run, when that is over two heartbeat intervals
    (None otherwise): silence during our own stall proves nothing about the nodes."""
    if last_tick is None or now - last_tick <= 2 * heartbeat_s:
        return None
    return now - last_tick


@dataclass
class NodeRecord:
    host: str
    pid: int
    last_seen: float
    suspected: bool = False
    failures: int = 0                 # failures while serving (core.backoff)
    unhealthy_until: float = 0.0      # kept out until then (0: not unhealthy)


class Health:
    """Heartbeat health of every node that said hello (module docstring)."""

    def __init__(self, settings: ControlSettings) -> None:
        self.settings = settings
        self.nodes: dict[str, NodeRecord] = {}
        self.hold = RejoinHold()

    def hello(self, host: str, pid: int, now: float, returned: bool) -> NodeRecord:
        """A (new or restarted) agent: a fresh record that keeps the failure history;
        `returned`: it is back from a failure, so the rejoin hold applies."""
        old = self.nodes.get(host)
        record = NodeRecord(host, pid, now)
        if old is not None:
            record.failures, record.unhealthy_until = old.failures, old.unhealthy_until
        self.nodes[host] = record
        if returned:
            self.hold.start(host, now)
        return record

    def hold_s(self, host: str) -> float:
        record = self.nodes.get(host)
        return backoff_s(self.settings.rejoin_hold_s, record.failures if record else 0)

    def beat(self, host: str, now: float) -> list[Event]:
        """A heartbeat; a suspected node is back (node.returned, its hold starts)."""
        record = self.nodes[host]
        out = []
        if record.suspected:
            record.suspected = False
            self.hold.start(host, now)
            out.append(Event(ev.NODE_RETURNED, {
                "host": host, "silent_ms": round(1000 * (now - record.last_seen)),
                "hold_s": self.hold_s(host)}))
        record.last_seen = now
        return out

    def stalled(self, stall: float) -> None:
        for record in self.nodes.values():
            record.last_seen += stall

    def check(self, now: float, serving: frozenset[str] = frozenset()) -> list[Event]:
        """node.suspected (silent too long; a failure when it served), node.stable (its
        hold is over), node.healthy (its back-off is over)."""
        out = []
        for record in self.nodes.values():
            host = record.host
            silent = now - record.last_seen
            if not record.suspected and silent > self.settings.silence_s:
                record.suspected = True
                self.hold.cancel(host)
                if host in serving:
                    record.failures += 1
                out.append(Event(ev.NODE_SUSPECTED, {
                    "host": host, "silent_ms": round(1000 * silent),
                    "missed": int(silent / self.settings.heartbeat_s)}))
            if record.suspected:
                continue
            held = self.hold_s(host)
            if self.hold.due(host, now, held):
                out.append(Event(ev.NODE_STABLE, {"host": host, "held_s": held}))
            if record.unhealthy_until and now >= record.unhealthy_until:
                record.unhealthy_until = 0.0
                out.append(Event(ev.NODE_HEALTHY, {"host": host,
                                                   "failures": record.failures}))
        return out

    def fail(self, host: str, now: float, reason: str) -> list[Event]:
        """A failure while reachable (a worker failed, a straggler, a timeout): kept out
        for the back-off of unhealthy_hold_s."""
        record = self.nodes.get(host)
        if record is None:
            return []
        record.failures += 1
        hold = backoff_s(self.settings.unhealthy_hold_s, record.failures)
        record.unhealthy_until = now + hold
        self.hold.cancel(host)
        return [Event(ev.NODE_UNHEALTHY, {"host": host, "reason": reason,
                                          "hold_s": round(hold, 3),
                                          "failures": record.failures})]

    def usable(self, host: str, now: float, hold_applies: bool) -> bool:
        """May plans use `host` now? Heard from, not suspected, not in its back-off, and
        not in its rejoin hold (when `hold_applies`: something runs that could flap)."""
        record = self.nodes.get(host)
        if record is None or record.suspected or now < record.unhealthy_until:
            return False
        return not (hold_applies and self.hold.waiting(host))
