"""testbed/control/core/rejoin.py: the hold clock and the margin rule, on a fake clock."""

from __future__ import annotations

from partitioner.instance import Instance, Node, Plan, Segment, Stage
from testbed.control.core.rejoin import SAME_PLACEMENT, RejoinHold, judge

MiB = 1024 * 1024


def instance(speed3: float) -> Instance:
    nodes = [Node("e1", 1.0, 256 * MiB), Node("e2", 1.0, 256 * MiB), Node("e3", speed3, 256 * MiB)]
    bandwidth = {(a, b): 1000.0 for a in ("d", "e1", "e2", "e3") for b in ("e1", "e2", "e3")
                 if a < b}
    return Instance([Segment(10.0, MiB, 1000), Segment(1.0, MiB, 100)], 1000, nodes, "d",
                    bandwidth)


def plan(inst: Instance, first: str, second: str) -> Plan:
    return Plan.of(inst, [Stage(0, 1, first), Stage(1, 2, second)], "given", False)


def test_hold_is_due_once_after_its_time() -> None:
    hold = RejoinHold()
    hold.start("e1", 10.0)
    assert hold.waiting("e1") and not hold.due("e1", 14.9, 5.0)
    assert hold.due("e1", 15.0, 5.0)
    assert not hold.waiting("e1") and not hold.due("e1", 30.0, 5.0)


def test_a_new_failure_restarts_the_hold() -> None:
    hold = RejoinHold()
    hold.start("e1", 0.0)
    hold.cancel("e1")
    assert not hold.due("e1", 100.0, 5.0)
    hold.start("e1", 100.0)
    assert not hold.due("e1", 104.0, 5.0) and hold.due("e1", 105.0, 5.0)


def test_margin_rule() -> None:
    inst = instance(speed3=2.0)                 # e3 twice as fast
    current, faster = plan(inst, "e1", "e2"), plan(inst, "e3", "e2")
    verdict = judge(faster, current, 0.10, "e3 stable again")
    assert verdict.accepted and verdict.event().kind == "rejoin.accepted"
    assert verdict.event().fields["reason"] == "e3 stable again"
    # a 50 % better plan does not clear a 60 % margin
    assert not judge(faster, current, 0.6, "x").accepted
    slightly = instance(speed3=1.05)
    assert not judge(plan(slightly, "e3", "e2"), plan(slightly, "e1", "e2"), 0.10,
                     "x").accepted


def test_the_same_placement_is_never_a_move() -> None:
    inst = instance(1.0)
    verdict = judge(plan(inst, "e1", "e2"), plan(inst, "e1", "e2"), 0.0, "x")
    assert verdict.same and not verdict.accepted and verdict.reason == SAME_PLACEMENT
    assert verdict.event().kind == "rejoin.declined"
