"""testbed/control/core/standby.py: where standbys go, which go away."""

from __future__ import annotations

from collections.abc import Sequence

from testbed.control.core.standby import choose, contingency_avoid, cover
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


def test_avoid() -> None:
    assert contingency_avoid(["e1"], ["e3", "e3"], ["e4"], per_node=2) == {"e1", "e3"}
    assert contingency_avoid([], ["e3"], ["e3"], per_node=2) == {"e3"}


def test_cover_takes_whole_losses_cheapest_first_then_single_standbys() -> None:
    # the hetero-6 case: the first loss's plan needs four new stages (one of 35 MB, slow to
    # load), two later losses each need the same 20 MB stage on "small", which has room for
    # one standby only
    big = Held("mid2", 14, 22, 1)
    first_loss = [Held("mid1", 0, 8, 1), Held("small", 8, 13, 1), Held("slow", 13, 14, 1), big]
    tail = Held("small", 16, 22, 1)
    second_loss, third_loss = [tail], [Held("fast", 0, 13, 1), tail]
    size = {big: 35, tail: 20, Held("small", 8, 13, 1): 5}

    def room(key: Held, chosen: Sequence[Held]) -> bool:
        return key.node != "small" or not any(k.node == "small" for k in chosen)

    chosen = cover([first_loss, second_loss, third_loss], loaded={Held("small", 8, 13, 1)},
                   serving={"mid1", "mid2", "small", "fast"}, per_node=4, fits=room,
                   size=lambda k: size.get(k, 1))
    # the two later losses are covered whole; of the first one, what still has room, the
    # spare node's first (the loaded standby on "small" gives its place to the 20 MB one)
    assert chosen[:3] == [tail, Held("fast", 0, 13, 1), Held("slow", 13, 14, 1)]
    assert set(chosen) == {tail, Held("fast", 0, 13, 1), Held("mid1", 0, 8, 1),
                           Held("slow", 13, 14, 1), big}
    # where there is room for both, the standby already loaded is kept
    assert Held("small", 8, 13, 1) in cover([first_loss, second_loss], {Held("small", 8, 13, 1)},
                                            set(), 4, lambda k, c: True, lambda k: 1)


def test_cover_keeps_the_cap_per_node_and_a_loss_that_does_not_fit_takes_nothing_whole() -> None:
    a, b, c = Held("n", 0, 1, 1), Held("n", 1, 2, 1), Held("m", 2, 3, 1)
    # per_node 1: [a, b] cannot be whole on n; [c] can; then a alone in the room left
    assert cover([[a, b], [c]], set(), set(), 1, lambda k, ch: True,
                 lambda k: 1) == [c, a]
