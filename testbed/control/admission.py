"""Admission of agents: which incarnation of a host's agent the controller listens to.

Division of labour: pure decisions here (no clock, no sockets); the controller feeds it each
`hello` and heartbeat and carries out the verdict (forget the host's workers, hold it under
the rejoin rule, drop a stale message).

Every agent start draws a random incarnation id and sends it in `hello` and every heartbeat.
An id never seen for the host is a new start: the first one is admitted (`NEW`), a later one
replaces the one before (`RESTARTED`: its workers died with it, its partial files are deleted
by the agent, the controller forgets its slots and holds the host like any returning node).
The id in force is `SAME`. An id the host had before is `STALE`: a message that was queued
before the restart (a partitioned link flushing), never a reason to undo the admission.
Agents without the field (older images) are identified by pid, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NEW, SAME, RESTARTED, STALE = "new", "same", "restarted", "stale"


@dataclass
class Incarnations:
    """Per host: the admitted incarnation and the ones it replaced."""

    current: dict[str, str] = field(default_factory=dict)
    retired: dict[str, set[str]] = field(default_factory=dict)

    def verdict(self, host: str, incarnation: str) -> str:
        current = self.current.get(host)
        if current is None:
            return NEW
        if incarnation == current:
            return SAME
        if incarnation in self.retired.get(host, set()):
            return STALE
        return RESTARTED

    def admit(self, host: str, incarnation: str) -> str:
        """The verdict, and the admission it implies (NEW and RESTARTED become current)."""
        verdict = self.verdict(host, incarnation)
        if verdict in (NEW, RESTARTED):
            previous = self.current.get(host)
            if previous is not None:
                self.retired.setdefault(host, set()).add(previous)
            self.current[host] = incarnation
        return verdict


def incarnation_of(fields: dict[str, object]) -> str:
    """The message's incarnation; an agent without one is known by its pid."""
    value = fields.get("incarnation")
    return value if isinstance(value, str) else f"pid-{fields.get('pid', 0)}"
