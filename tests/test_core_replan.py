"""testbed/control/core/replan.py: the pending re-plan, kinds, stale plans, epoch numbers,
and the hold of a sound epoch being deployed."""

from __future__ import annotations

from partitioner.instance import Instance, Node, Plan, Segment, Stage
from testbed.control.core.replan import (
    Epochs,
    Replans,
    Request,
    answered,
    failure_kind,
    hold,
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


def test_only_a_sound_deploying_epoch_untouched_by_the_cause_holds_a_request() -> None:
    assert hold(deploying_sound=True, touches_deploying=False)
    assert not hold(deploying_sound=True, touches_deploying=True)
    assert not hold(deploying_sound=False, touches_deploying=False)
    (event,) = Replans.defer("failure", "e4 lost", 7)
    assert event.kind == "replan.deferred" and event.fields == {
        "kind": "failure", "reason": "e4 lost", "deploying_epoch": 7}


def test_merged_requests_keep_the_newest_generation_the_force_and_every_host() -> None:
    replans = Replans()
    assert replans.want("failure", "e1 lost", generation=3, hosts=frozenset({"e5"}))
    assert replans.want("failure", "by the driver", generation=5, force=True,
                        hosts=frozenset({"e6"})) == []
    assert replans.pending == Request("failure", "e1 lost", 5, True, frozenset({"e5", "e6"}))
    # a rejoin upgraded to a failure keeps the rejoin's hosts to weigh
    replans = Replans()
    replans.want("rejoin", "e3 stable", generation=2, hosts=frozenset({"e3"}))
    replans.want("failure", "e1 lost", generation=2)
    assert replans.pending == Request("failure", "e1 lost", 2, False, frozenset({"e3"}))


def test_a_sound_epoch_made_after_a_request_answers_it_unless_forced() -> None:
    asked = Request("failure", "e2 lost", generation=4)
    assert answered(asked, 4, deploying_sound=True)          # epoch 4: made after the ask
    assert not answered(asked, 3, deploying_sound=True)      # made before: it was not held
    assert not answered(asked, 4, deploying_sound=False)     # broken: a re-plan is needed
    assert not answered(asked, None, deploying_sound=True)
    assert not answered(Request("failure", "driver", 4, force=True), 4, deploying_sound=True)
