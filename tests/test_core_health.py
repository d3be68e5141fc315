"""testbed/control/core/health.py: suspicion, return, hold, back-off; a fake clock, rule by
rule."""

from __future__ import annotations

from formats.control import ControlSettings
from testbed.control.core.health import Health, stall_s

SETTINGS = ControlSettings(heartbeat_ms=100, suspect_after_missed=3, rejoin_hold_s=5.0,
                           unhealthy_hold_s=10.0)


def kinds(events: list) -> list[str]:
    return [e.kind for e in events]


def test_suspected_after_the_missed_heartbeats() -> None:
    health = Health(SETTINGS)
    health.hello("e1", 7, 0.0, returned=False)
    assert health.check(0.3) == []                  # exactly 3 intervals: not yet
    events = health.check(0.31)
    assert kinds(events) == ["node.suspected"] and events[0].fields["missed"] == 3
    assert health.check(0.5) == []                  # once
    assert not health.usable("e1", 0.5, hold_applies=False)


def test_return_hold_then_stable() -> None:
    health = Health(SETTINGS)
    health.hello("e1", 7, 0.0, returned=False)
    health.check(1.0)
    returned = health.beat("e1", 2.0)
    assert kinds(returned) == ["node.returned"] and returned[0].fields["hold_s"] == 5.0
    assert not health.usable("e1", 2.0, hold_applies=True)
    assert health.usable("e1", 2.0, hold_applies=False)       # nothing runs: no hold
    for t in (2.05, 3.0, 4.0, 5.0, 6.0, 6.9):
        health.beat("e1", t)
        assert health.check(t) == []
    health.beat("e1", 7.0)
    stable = health.check(7.0)
    assert kinds(stable) == ["node.stable"] and health.usable("e1", 7.0, hold_applies=True)


def test_the_hold_doubles_for_a_node_that_failed_while_serving() -> None:
    health = Health(SETTINGS)
    health.hello("e1", 7, 0.0, returned=False)
    health.check(1.0, serving=frozenset({"e1"}))
    assert health.beat("e1", 1.5)[0].fields["hold_s"] == 5.0      # first failure
    health.check(3.0, serving=frozenset({"e1"}))                    # silent again
    assert health.beat("e1", 3.5)[0].fields["hold_s"] == 10.0


def test_unhealthy_back_off() -> None:
    health = Health(SETTINGS)
    health.hello("e1", 7, 0.0, returned=False)
    first = health.fail("e1", 0.0, "straggler")
    assert first[0].fields == {"host": "e1", "reason": "straggler", "hold_s": 10.0,
                               "failures": 1}
    health.beat("e1", 9.9)
    assert not health.usable("e1", 9.9, hold_applies=True) and health.check(9.9) == []
    health.beat("e1", 10.0)
    assert kinds(health.check(10.0)) == ["node.healthy"]
    assert health.usable("e1", 10.0, hold_applies=True)
    assert health.fail("e1", 10.0, "again")[0].fields["hold_s"] == 20.0


def test_a_restarted_agent_keeps_its_history_and_is_held() -> None:
    health = Health(SETTINGS)
    health.hello("e1", 7, 0.0, returned=False)
    health.fail("e1", 0.0, "worker failed")
    record = health.hello("e1", 8, 1.0, returned=True)
    assert record.failures == 1 and record.unhealthy_until == 10.0
    assert not health.usable("e1", 11.0, hold_applies=True)     # rejoin hold 5 s from 1.0...
    health.beat("e1", 11.0)
    assert "node.stable" in kinds(health.check(11.0))           # ...long over at 11.0


def test_our_own_stall_is_not_their_silence() -> None:
    assert stall_s(None, 5.0, 0.1) is None and stall_s(1.0, 1.2, 0.1) is None
    assert stall_s(1.0, 3.0, 0.1) == 2.0
    health = Health(SETTINGS)
    health.hello("e1", 7, 0.0, returned=False)
    health.stalled(2.0)
    assert health.check(2.2) == []
