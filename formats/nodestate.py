"""Node state: what each node action does to a node, as a small state machine, checked when a
scenario is loaded so a timeline that makes no sense is refused before any network exists.

Division of labour: formats.scenario reads and validates single steps; this module walks the
whole timeline in the order the fault timeline fires it (testbed.experiment.faults: by time,
heals before injections at the same instant) and follows each node through its states. The
injection itself is the timeline's business; the meaning of each transition is the one the
timeline implements (docs/architecture.md, "Node states").

States: `up` (powered, linked, its software running), `crashed` (power cut: processes gone,
interface dark, disk kept), `paused` (every process frozen, link up).

| action           | up        | paused    | crashed   |
|------------------|-----------|-----------|-----------|
| node.crash       | crashed   | crashed   | refused   |
| node.pause       | paused    | refused   | refused   |
| node.resume      | refused   | up        | refused   |
| node.restart     | up        | up        | up        |
| io.conn_reset    | up        | paused    | refused   |
| node.cpu, io.*   | unchanged | unchanged | unchanged |

A crash or pause with a `duration` ends in its heal (the node is `up` again) unless a later
step ended it first: `node.restart` ends a crash or pause in force, `node.crash` a pause,
`node.resume` a pause. `node.cpu` and the disk faults act on the machine whatever its state
(a crashed host's limit and disk are there when it returns).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from formats.errors import InputError

UP, PAUSED, CRASHED = "up", "paused", "crashed"

# action -> {state it is found in: state it leaves}; a state missing from the map is refused
TRANSITIONS: dict[str, dict[str, str]] = {
    "node.crash": {UP: CRASHED, PAUSED: CRASHED},
    "node.pause": {UP: PAUSED},
    "node.resume": {PAUSED: UP},
    "node.restart": {UP: UP, PAUSED: UP, CRASHED: UP},
    "io.conn_reset": {UP: UP, PAUSED: PAUSED},
}

# an action in force that a later action on the same node ends (its heal then never fires)
ENDS: dict[str, tuple[str, ...]] = {
    "node.restart": ("node.crash", "node.pause"),
    "node.crash": ("node.pause",),
    "node.resume": ("node.pause",),
}

_WHY = {
    (CRASHED, "node.crash"): "it is already crashed (restart it first)",
    (CRASHED, "node.pause"): "it is crashed: there is nothing running to freeze",
    (CRASHED, "node.resume"): "it is crashed, not paused (node.restart brings it back)",
    (UP, "node.resume"): "it is not paused (no node.pause in force)",
    (PAUSED, "node.pause"): "it is already paused",
    (CRASHED, "io.conn_reset"): "it is crashed: it has no connections to reset",
}


class StepLike(Protocol):
    at_s: float
    action: str
    target: Any
    duration_s: float | None
    line: int


@dataclass(frozen=True)
class Change:
    """One instant of the timeline: a step firing or its heal."""

    at_s: float
    heal: bool
    index: int


def timeline(steps: list[StepLike]) -> list[Change]:
    """Injections and the heals of steps with a duration, in firing order (heals first at the
    same time, then by step position), as testbed.experiment.faults fires them."""
    changes = [Change(s.at_s, False, i) for i, s in enumerate(steps)]
    changes += [Change(s.at_s + s.duration_s, True, i) for i, s in enumerate(steps)
                if s.duration_s is not None and s.action in ("node.crash", "node.pause")]
    return sorted(changes, key=lambda c: (c.at_s, 0 if c.heal else 1, c.index))


def check_node_states(steps: list[StepLike], file: str | Path,
                      nodes: Iterable[str]) -> dict[str, str]:
    """Walk the timeline; refuse (InputError at the step's line) a node action that makes no
    sense in the state it finds. Returns each node's state after the last step."""
    state = dict.fromkeys(nodes, UP)
    in_force: dict[int, str] = {}           # step index -> action, for crash/pause in force
    for change in timeline(steps):
        step = steps[change.index]
        if change.heal:
            if in_force.pop(change.index, None) is not None:
                state[step.target] = UP
            continue
        moves = TRANSITIONS.get(step.action)
        if moves is None:
            continue
        found = state.get(step.target, UP)
        if found not in moves:
            reason = _WHY.get((found, step.action), f"it is {found}")
            raise InputError(f"{step.action} of {step.target} at {step.at_s:g}s makes no "
                             f"sense: {reason}", file=file, line=step.line, field="action")
        for index in [i for i, action in in_force.items()
                      if steps[i].target == step.target
                      and action in ENDS.get(step.action, ())]:
            del in_force[index]
        if step.action in ("node.crash", "node.pause"):
            in_force[change.index] = step.action
        state[step.target] = moves[found]
    return state
