"""Warm standbys: where the stages that contingency plans would newly need are loaded ahead
of a failure, and which standbys no plan needs any more.

The rules: a standby goes on a spare node first and then on a serving one (a model load
there takes CPU from the stage it serves, once, for a few seconds; without it a plan that
uses every host reloads models on every loss), at most `per_node` per node, only where it
fits in memory and disk (the backend's `fits`), and not twice for the same stage; a standby
that no contingency plan uses is released. Contingency plans themselves should put new
stages where a standby can wait for them (`contingency_avoid`).

Each plan's standbys start loading as soon as that plan is known (`choose`), so the first
plans take the room. Once every plan is known the standbys are decided again, all together
(`cover`): whole losses first, the cheapest to arm first, since a loss whose new stages are
all loaded is a switch of routes and one missing a stage still loads a model (hetero-6: the
first plan's standby took the one place on a 256 MiB host that two later losses needed).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from testbed.control.policy import Held


def contingency_avoid(serving: Iterable[str], standbys: Iterable[str],
                      promised: Iterable[str], per_node: int) -> frozenset[str]:
    """Nodes a contingency plan should not put new stages on: those that serve, and those
    whose standby places are used up by standbys (one entry per standby) and the new stages
    of earlier contingency plans (one entry per stage)."""
    wanted = Counter(standbys) + Counter(promised)
    return frozenset(serving) | {h for h, n in wanted.items() if n >= per_node}


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


def cover(plans: Sequence[Sequence[Held]], loaded: set[Held], serving: set[str],
          per_node: int, fits: Callable[[Held, Sequence[Held]], bool],
          size: Callable[[Held], int]) -> list[Held]:
    """Every standby to hold, decided together once every contingency plan is known: each
    plan's standbys (`plans`: the keys of its stages no serving worker holds) taken whole
    when all of them find room, the plans with the fewest bytes still to load first
    (`size`: 0 for a standby loaded already); then, in the room left, single standbys: the
    `loaded` ones (standbys already there, ready or loading) first, then spare nodes' before
    serving ones'. `fits(key, chosen)`: room for `key` on its node beside the serving
    workers and the standbys `chosen` so far."""
    chosen: list[Held] = []

    def admit(keys: Sequence[Held]) -> bool:
        trial = list(chosen)
        for key in keys:
            if key in trial:
                continue
            if sum(k.node == key.node for k in trial) >= per_node or not fits(key, trial):
                return False
            trial.append(key)
        chosen[:] = trial
        return True

    def to_load(keys: Sequence[Held]) -> int:
        return sum(size(k) for k in set(keys))

    for keys in sorted(plans, key=to_load):                 # stable: plan order on ties
        admit(keys)
    every = list(dict.fromkeys(k for keys in plans for k in keys))
    for key in sorted(every, key=lambda k: (k not in loaded, k.node in serving)):
        admit([key])
    return chosen
