"""Admission of agent incarnations (pure) and the agent's eviction choice."""

from __future__ import annotations

from stage_image.agent import choose_evictions
from stage_image.wire import FrameError, decode_control, encode_control
from testbed.control.admission import NEW, RESTARTED, SAME, STALE, Incarnations, incarnation_of


def test_a_restart_is_admitted_and_old_messages_are_stale() -> None:
    inc = Incarnations()
    assert inc.admit("edge1", "a" * 16) == NEW
    assert inc.admit("edge1", "a" * 16) == SAME
    assert inc.admit("edge2", "a" * 16) == NEW           # per host
    assert inc.admit("edge1", "b" * 16) == RESTARTED
    assert inc.current["edge1"] == "b" * 16
    assert inc.verdict("edge1", "a" * 16) == STALE
    assert inc.admit("edge1", "a" * 16) == STALE         # never undoes the admission
    assert inc.current["edge1"] == "b" * 16
    assert inc.admit("edge1", "c" * 16) == RESTARTED
    assert inc.retired["edge1"] == {"a" * 16, "b" * 16}


def test_same_pid_in_a_new_container_is_still_a_restart() -> None:
    # a container's agent gets the same small pid every start: the id tells them apart
    inc = Incarnations()
    first = {"pid": 7, "incarnation": "0123456789abcdef"}
    again = {"pid": 7, "incarnation": "fedcba9876543210"}
    assert inc.admit("edge1", incarnation_of(first)) == NEW
    assert inc.admit("edge1", incarnation_of(again)) == RESTARTED
    assert incarnation_of({"pid": 7}) == "pid-7"


def test_incarnation_on_the_wire_is_validated() -> None:
    msg = decode_control(encode_control("hello", host="edge1", pid=3,
                                        incarnation="0123456789abcdef"))
    assert msg["incarnation"] == "0123456789abcdef"
    for bad in ("xyz", "0123456789ABCDEF", 5):
        try:
            decode_control(encode_control("heartbeat", host="edge1", seq=1, workers=[],
                                          incarnation=bad))
        except FrameError:
            continue
        raise AssertionError(f"incarnation {bad!r} accepted")


def test_eviction_keeps_held_models_and_stops_when_it_fits() -> None:
    cached = [("old", 40, 1.0), ("held", 50, 0.5), ("newer", 30, 2.0), ("newest", 30, 3.0)]
    assert choose_evictions(cached, {"held"}, free=10, need=60) == ["old", "newer"]
    assert choose_evictions(cached, {"held"}, free=100, need=60) == []
    # not enough even after every unheld one: all unheld go, the held one never
    assert choose_evictions(cached, {"held"}, free=0, need=500) == ["old", "newer", "newest"]
