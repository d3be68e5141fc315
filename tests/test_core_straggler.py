"""testbed/control/core/straggler.py: too slow for too long, on a fake clock."""

from __future__ import annotations

from testbed.control.core.straggler import StragglerWatch


def test_a_straggler_after_the_time() -> None:
    watch = StragglerWatch(factor=2.0, after_s=2.0)
    assert watch.observe("w", 0.0, 10, 25.0, 10.0, 10.0) is None      # slow from 0.0
    assert watch.observe("w", 1.9, 10, 25.0, 10.0, 10.0) is None
    found = watch.observe("w", 2.0, 10, 25.0, 10.0, 10.0)
    assert found is not None and found.factor == 2.5
    assert watch.observe("w", 2.5, 10, 25.0, 10.0, 10.0) is None      # the clock starts over


def test_recovering_or_keeping_pace_resets() -> None:
    watch = StragglerWatch(factor=2.0, after_s=2.0)
    watch.observe("w", 0.0, 10, 25.0, 10.0, 10.0)
    assert watch.observe("w", 1.0, 10, 15.0, 10.0, 10.0) is None      # back under 2x
    assert watch.observe("w", 2.5, 10, 25.0, 10.0, 10.0) is None      # a new clock
    # slower than 2x planned, but the pipeline's pace is slower still: no straggler
    for t in (0.0, 5.0, 10.0):
        assert watch.observe("v", t, 10, 25.0, 10.0, 40.0) is None


def test_no_frames_no_evidence_and_off() -> None:
    watch = StragglerWatch(factor=2.0, after_s=1.0)
    watch.observe("w", 0.0, 10, 25.0, 10.0, 10.0)
    assert watch.observe("w", 1.5, 0, 0.0, 10.0, 10.0) is None        # keeps its clock
    assert watch.observe("w", 1.6, 10, 25.0, 10.0, 10.0) is not None
    off = StragglerWatch(factor=0, after_s=0)
    assert not off.enabled and off.observe("w", 9.0, 10, 1e6, 1.0, 1.0) is None


def test_a_loaded_machine_slows_every_stage_and_flags_none() -> None:
    watch = StragglerWatch(factor=2.0, after_s=1.0)
    peers = {"a": ["b", "c"], "b": ["a", "c"], "c": ["a", "b"]}
    # every stage at 2.5x its plan (the emulating machine is loaded): no straggler
    for t in (0.0, 1.0, 2.0, 3.0):
        for key, others in peers.items():
            assert watch.observe(key, t, 10, 25.0, 10.0, 10.0, others) is None
    assert watch.slowdown(["a", "b"]) == 2.5
    # one stage at 6x while the others stay at 2.5x: 2.4x slower than its peers
    watch.observe("c", 4.0, 10, 60.0, 10.0, 10.0, peers["c"])
    found = watch.observe("c", 5.0, 10, 60.0, 10.0, 10.0, peers["c"])
    assert found is not None and found.factor == 6.0
