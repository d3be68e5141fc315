"""The one back-off rule of both backends.

A node's failure count rises each time it fails while it serves (found silent or dead, a
worker failing, a straggler, a deploy that does not come up). After its n-th failure
(n >= 1) every wait it is subject to doubles: `base x 2^(n-1)`, at most `UNHEALTHY_CAP_S`
(two minutes, so a node that failed often still gets a chance that often). The bases:
`rejoin_hold_s` for the time a node back from a silence must stay stable, `unhealthy_hold_s`
for the time a node that failed while reachable (a worker failure, a straggler) is kept out.
With no failure yet (a node silent while it served nothing) the wait is the base.

Before this rule the embedded controller doubled only `unhealthy_hold_s` and kept
`rejoin_hold_s` fixed, while the k3s loop doubled `rejoin_hold_s`: a flapping node was taken
back every 5 s by one and ever more slowly by the other. Doubling both is what keeps a node
that keeps failing from moving the pipeline back and forth.
"""

from __future__ import annotations

from formats.control import UNHEALTHY_CAP_S


def backoff_s(base_s: float, failures: int, cap_s: float = UNHEALTHY_CAP_S) -> float:
    """The wait after `failures` failures (module docstring)."""
    return min(cap_s, base_s * 2 ** max(0, failures - 1))
