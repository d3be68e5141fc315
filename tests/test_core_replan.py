"""testbed/control/core/replan.py: the pending re-plan, kinds, stale plans, epoch numbers."""

from __future__ import annotations

from partitioner.instance import Instance, Node, Plan, Segment, Stage
from testbed.control.core.replan import (
    Epochs,
    Replans,
    failure_kind,
    lost_while_planning,
    stale_event,
)


def test_a_failure_outranks_a_rejoin_and_the_first_request_stays() -> None:
    replans = Replans()
    assert [e.fields for e in replans.want("rejoin", "e3 stable")] == \
        [{"kind": "rejoin", "reason": "e3 stable"}]
    assert replans.want("rejoin", "e2 stable") == []
    assert replans.want("failure", "e1 lost")[0].kind == "replan.requested"
    assert replans.want("failure", "e2 lost") == [] and replans.want("rejoin", "x") == []
    request = replans.take()
    assert request is not None and (request.kind, request.reason) == ("failure", "e1 lost")
    assert replans.take() is None


def test_kinds() -> None:
    assert failure_kind(True, True, True) == "failure"
    assert failure_kind(False, True, True) == "straggler"
    assert failure_kind(False, False, True) == "rollout"
    assert failure_kind(False, False, False) == "manual"


def test_stale_plans_and_epoch_numbers() -> None:
    inst = Instance([Segment(1.0, 1, 1), Segment(1.0, 1, 1)], 1,
                    [Node("e1", 1.0, 1 << 30), Node("e2", 1.0, 1 << 30)], "d",
                    {("d", "e1"): 1.0, ("d", "e2"): 1.0, ("e1", "e2"): 1.0})
    plan = Plan.of(inst, [Stage(0, 1, "e1"), Stage(1, 2, "e2")], "given", False)
    assert lost_while_planning(plan, {"e1", "e2", "e3"}) == []
    assert lost_while_planning(plan, {"e1"}) == ["e2"]
    assert stale_event(["e2"]).fields == {"reason": "hosts ['e2'] lost while planning"}
    epochs = Epochs(4)
    asked_at = epochs.next
    assert epochs.current(asked_at) and epochs.allocate() == 4 and epochs.next == 5
    assert not epochs.current(asked_at)
