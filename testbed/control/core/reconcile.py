"""Level-triggered reconciliation of one host: its agent's heartbeat lists every worker it
runs (port, model hash, state, confirmed routes, load); this module compares that with the
workers the plane wants there (`Slot` records) and says what to do, nothing more:

- a wanted worker reported failed or exited: `Failed` (the plane handles it like the agent's
  own report);
- a wanted worker reported alive: `Observed` (its state, the routes it confirms among those
  we want, its load for the straggler rule);
- a route we want that is not confirmed `resend_s` after it was last asked for, in an epoch
  that is deploying, active or draining: `Resend`; a standby the agent does not report:
  `Reprepare`;
- a worker we do not want (unknown port, or another model on a wanted port): `Unwanted`
  (release it); a route of an epoch no longer live: `Withdraw` (stop it). The plane
  rate-limits these asks.

Whatever was lost (a message, an agent restart, a node cut off and back) is repaired by the
next heartbeat, and a node back from a partition never serves a retired epoch's route.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from testbed.control.core.records import Slot

LIVE_STATES = ("deploying", "active", "draining")   # epochs whose routes are wanted
GONE = ("failed", "exited")


@dataclass(frozen=True)
class Failed:
    slot: Slot
    state: str


@dataclass(frozen=True)
class Observed:
    slot: Slot
    state: str
    confirmed: frozenset[int]
    load: Any


@dataclass(frozen=True)
class Resend:
    slot: Slot
    epoch: int


@dataclass(frozen=True)
class Reprepare:
    slot: Slot


@dataclass(frozen=True)
class Unwanted:
    port: int


@dataclass(frozen=True)
class Withdraw:
    port: int
    epoch: int


def compare(wanted: Iterable[Slot], reported: dict[int, dict[str, Any]],
            epoch_states: dict[int, str], now: float,
            resend_s: float) -> list[Failed | Observed | Resend | Reprepare]:
    """What to do about the workers we want on a host, given its heartbeat (by port)."""
    out: list[Failed | Observed | Resend | Reprepare] = []
    for slot in wanted:
        entry = reported.get(slot.port)
        if entry is not None and entry["sha256"] != slot.stage.sha256:
            continue                    # an old worker still on that port: `unwanted`
        if entry is not None and entry["state"] in GONE:
            out.append(Failed(slot, entry["state"]))
            continue
        confirmed = {e for e, _ in entry["routes"]} if entry is not None else set()
        if entry is not None:
            out.append(Observed(slot, entry["state"], frozenset(confirmed & set(slot.routes)),
                                entry["load"]))
        for number in slot.routes:
            if epoch_states.get(number) in LIVE_STATES and number not in confirmed and \
                    now - slot.sent.get(number, 0.0) > resend_s:
                out.append(Resend(slot, number))
        if not slot.routes and slot.standby and entry is None and \
                now - slot.sent.get(0, 0.0) > resend_s:
            out.append(Reprepare(slot))
    return out


def unwanted(wanted: dict[int, Slot], workers: Iterable[dict[str, Any]],
             live_epochs: set[int]) -> list[Unwanted | Withdraw]:
    """What the host runs that we do not want (`wanted`: our slots there by port)."""
    out: list[Unwanted | Withdraw] = []
    for entry in workers:
        slot = wanted.get(entry["port"])
        if slot is None or entry["sha256"] != slot.stage.sha256:
            if entry["state"] not in GONE:
                out.append(Unwanted(entry["port"]))
            continue
        out += [Withdraw(entry["port"], number) for number, _stage in entry["routes"]
                if number not in live_epochs]
    return out
