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
    # a model staged for a fault that may never come goes after every other unheld one
    assert choose_evictions(cached, {"held"}, free=10, need=60,
                            last=frozenset({"old"})) == ["newer", "newest"]
    assert choose_evictions(cached, {"held"}, free=10, need=90,
                            last=frozenset({"old"})) == ["newer", "newest", "old"]


def test_disk_accounting_counts_distinct_held_models() -> None:
    from testbed.control.disk import DISK_RESERVE_BYTES, fits_disk, held_model_bytes

    mib = 1 << 20
    held = [("a", 20 * mib), ("a", 20 * mib), ("b", 19 * mib)]    # two workers share "a"
    assert held_model_bytes(held) == 39 * mib
    assert fits_disk(64 * mib, held, ("c", 20 * mib)) == (59 * mib + DISK_RESERVE_BYTES
                                                          <= 64 * mib)
    assert not fits_disk(64 * mib, held, ("c", 25 * mib))
    assert fits_disk(64 * mib, held, ("b", 19 * mib))       # already there: costs nothing
    assert fits_disk(0, held, ("c", 10 << 30))              # 0: not limited


def test_instance_disk_bytes_is_optional_in_the_json() -> None:
    from partitioner.instance import instance_from_json

    data = {"segments": [{"compute_ms": 1.0, "memory_bytes": 10, "output_bytes": 4}],
            "input_bytes": 4, "source": "src", "bandwidth_mbps": [["src", "e1", 100.0]],
            "nodes": [{"name": "e1", "speed": 1.0, "memory_bytes": 100}]}
    plain = instance_from_json(data)
    assert plain.nodes[0].disk_bytes == 0 and "disk_bytes" not in plain.to_json()["nodes"][0]
    data["nodes"][0]["disk_bytes"] = 64 << 20
    limited = instance_from_json(data)
    assert limited.nodes[0].disk_bytes == 64 << 20
    assert limited.to_json()["nodes"][0]["disk_bytes"] == 64 << 20


def test_planner_keeps_a_stage_off_a_disk_too_small_for_its_model() -> None:
    from partitioner.algorithms import solve
    from partitioner.instance import Instance, Node, Segment, plan_problems

    segments = [Segment(10.0, 10, 100, model_bytes=40), Segment(10.0, 10, 100, model_bytes=40)]
    bandwidth = {("src", "big"): 1000.0, ("src", "small"): 1000.0, ("big", "small"): 1000.0}
    fast_small_disk = Node("small", 4.0, 1000, disk_bytes=50)
    instance = Instance(segments, 100, [fast_small_disk, Node("big", 1.0, 1000)], "src",
                        bandwidth)
    plan = solve(instance, "optimal")
    # the fast node would take both segments (80 bytes of model); its disk holds one
    assert all(s.end - s.first == 1 for s in plan.stages if s.node == "small")
    assert not plan_problems(instance, plan.stages)
    from partitioner.instance import Stage

    assert "disk" in " ".join(plan_problems(instance, [Stage(0, 2, "small")]))
