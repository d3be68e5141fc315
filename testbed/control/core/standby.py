"""Warm standbys: where the stages that contingency plans would newly need are loaded ahead
of a failure, and which standbys no plan needs any more.

The rules: a standby goes on a spare node first and then on a serving one (a model load
there takes CPU from the stage it serves, once, for a few seconds; without it a plan that
uses every host reloads models on every loss), at most `per_node` per node, only where it
fits in memory and disk (the backend's `fits`), and not twice for the same stage; a standby
that no contingency plan uses is released. Contingency plans themselves should put new
stages where a standby can wait for them (`contingency_avoid`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from testbed.control.policy import Held


def contingency_avoid(serving: Iterable[str], standbys: Iterable[str],
                      promised: Iterable[str], per_node: int) -> frozenset[str]:
    """Nodes a contingency plan should not put new stages on: those that serve, and those
    whose standby places are used up by standbys (one entry per standby) and the new stages
    of earlier contingency plans (one entry per stage)."""
    wanted = Counter(standbys) + Counter(promised)
    return frozenset(serving) | {h for h, n in wanted.items() if n >= per_node}


def unneeded(standbys: Iterable[Held], kept: set[Held]) -> list[Held]:
    """Standbys no contingency plan uses."""
    return [h for h in standbys if h not in kept]


def choose(needed: Iterable[Held], held: set[Held], serving: set[str],
           standbys_per_node: dict[str, int], per_node: int,
           fits: Callable[[Held], bool]) -> list[Held]:
    """The new standbys to load: on spare nodes, then on serving ones, each in the order
    given (module docstring)."""
    count = dict(standbys_per_node)
    out = []
    for key in sorted(needed, key=lambda k: k.node in serving):    # stable: order kept
        if key in held or count.get(key.node, 0) >= per_node or not fits(key):
            continue
        count[key.node] = count.get(key.node, 0) + 1
        out.append(key)
    return out
