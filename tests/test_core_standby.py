"""testbed/control/core/standby.py: where standbys go, which go away."""

from __future__ import annotations

from testbed.control.core.standby import choose, contingency_avoid, unneeded
from testbed.control.policy import Held


def test_standbys_spare_nodes_first_within_the_cap_and_where_they_fit() -> None:
    needed = [Held("e1", 0, 1, 1), Held("e3", 0, 1, 1), Held("e3", 1, 2, 1),
              Held("e4", 0, 1, 1), Held("e5", 0, 1, 1), Held("e3", 0, 1, 1),
              Held("e2", 1, 2, 1)]
    chosen = choose(needed, held={Held("e5", 0, 1, 1)}, serving={"e1", "e2"},
                    standbys_per_node={"e3": 0}, per_node=1,
                    fits=lambda key: key.node not in ("e4", "e2"))
    # the 2nd e3 is over the cap, e4 and e2 have no room, e5's is loaded already; e1 serves
    # and has room: its standby comes after the spare nodes'
    assert chosen == [Held("e3", 0, 1, 1), Held("e1", 0, 1, 1)]


def test_unneeded_and_avoid() -> None:
    kept = {Held("e3", 0, 1, 1)}
    assert unneeded([Held("e3", 0, 1, 1), Held("e4", 1, 2, 1)], kept) == [Held("e4", 1, 2, 1)]
    assert contingency_avoid(["e1"], ["e3", "e3"], ["e4"], per_node=2) == {"e1", "e3"}
    assert contingency_avoid([], ["e3"], ["e3"], per_node=2) == {"e3"}
