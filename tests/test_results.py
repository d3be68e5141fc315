"""The results contract: summary numbers, 1 s buckets, fault detection and recovery times and
SLO verdicts computed from raw records."""

from __future__ import annotations

from pathlib import Path

from formats.scenario import load_scenario
from testbed.experiment.results import RequestRecord, buckets, fault_timings, percentile, summarise

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_000_000.0


def steady(rate: int, seconds: int, start: float = T0, latency: float = 0.1,
           gap: tuple[float, float] | None = None) -> list[RequestRecord]:
    """`rate` completions per second for `seconds`, none inside `gap` (a fault)."""
    records = []
    for i in range(rate * seconds):
        done = start + (i + 0.5) / rate
        if gap and gap[0] <= done - start < gap[1]:
            continue
        records.append(RequestRecord(i, done - latency, done, "completed", False, 1, 1, 1))
    return records


def test_percentile_nearest_rank() -> None:
    assert percentile([], 99) == 0.0
    assert percentile([3, 1, 2], 50) == 2
    assert percentile(list(range(1, 101)), 99) == 99


def test_buckets_count_completions_per_second() -> None:
    series = buckets(steady(10, 5), T0, T0 + 5)
    assert [b.completed for b in series] == [10] * 5


def test_fault_detection_and_recovery_times() -> None:
    records = steady(10, 10, gap=(3.0, 5.0))
    events = [{"t": T0 + 3.0, "type": "fault.injected", "action": "node.crash",
               "target": "edge1"},
              {"t": T0 + 3.4, "type": "node.suspected", "host": "edge1"},
              {"t": T0 + 3.1, "type": "node.suspected", "host": "edge2"},
              {"t": T0 + 4.5, "type": "plan.deployed", "predicted_throughput_rps": 10.0}]
    (fault,) = fault_timings(events, buckets(records, T0, T0 + 10), T0, 10.0)
    assert fault["at_s"] == 3.0
    assert fault["detected_s"] == 3.4           # edge2's suspicion is not about this fault
    assert fault["recovered_s"] == 6.0          # the first full bucket after the gap ends at 6


def test_summary_and_slo_verdict() -> None:
    scenario = load_scenario(ROOT / "scenarios" / "baseline.yaml")
    duration = int(scenario.workload.duration_s)
    records = steady(10, duration)
    summary = summarise(scenario, "embedded", records, [], T0, 10.0, 0)
    assert summary["throughput_rps"] == 10.0
    assert summary["requests"]["lost"] == 0 and summary["slo"]["passed"]
    assert summary["latency_ms"]["p50"] == 100.0
    records[5].status, records[5].done = "lost", None
    records[6].mismatched = True
    failed = summarise(scenario, "embedded", records, [], T0, 20.0, 0)
    assert not failed["slo"]["passed"]
    violations = " ".join(failed["slo"]["violations"])
    assert "lost 1" in violations and "mismatched 1" in violations
    assert "of predicted" in violations          # 10 rps measured vs 20 predicted


def test_model_update_is_detected_by_its_version_and_recovers_after_the_switch() -> None:
    records = steady(10, 10, gap=(3.0, 4.0))
    events = [{"t": T0 + 2.0, "type": "fault.injected", "action": "model.update",
               "target": None},
              {"t": T0 + 2.1, "type": "node.suspected", "host": "edge2"},
              {"t": T0 + 2.4, "type": "version.found", "version": 2},
              {"t": T0 + 3.5, "type": "version.switched", "version": 2}]
    (fault,) = fault_timings(events, buckets(records, T0, T0 + 10), T0, 10.0)
    assert fault["detected_s"] == 2.4           # the version, not an unrelated suspicion
    assert fault["recovered_s"] == 5.0          # measured from the switch at 3.5 s


def test_restarted_node_reports_when_it_was_readmitted() -> None:
    records = steady(10, 10)
    events = [{"t": T0 + 1.0, "type": "fault.injected", "action": "node.crash",
               "target": "edge2", "step": 0},
              {"t": T0 + 1.5, "type": "agent.restarted", "host": "edge2"},   # not after boot
              {"t": T0 + 4.0, "type": "fault.healed", "action": "node.crash", "step": 0,
               "target": "edge2", "detail": {"restarted": True}},
              {"t": T0 + 4.2, "type": "agent.restarted", "host": "edge3"},
              {"t": T0 + 5.3, "type": "agent.restarted", "host": "edge2"},
              {"t": T0 + 6.0, "type": "fault.injected", "action": "node.restart",
               "target": "edge3", "step": 1},
              {"t": T0 + 6.9, "type": "agent.restarted", "host": "edge3"},
              {"t": T0 + 7.0, "type": "fault.injected", "action": "node.crash",
               "target": "edge1", "step": 2}]
    crash, restart, final = fault_timings(events, buckets(records, T0, T0 + 10), T0, 10.0)
    assert crash["readmitted_s"] == 5.3 and restart["readmitted_s"] == 6.9
    assert "readmitted_s" not in final          # a crash that never came back


def test_partition_detection_is_about_the_far_side() -> None:
    records = steady(10, 10)
    events = [{"t": T0 + 2.0, "type": "fault.injected", "action": "link.partition",
               "target": [["edge5"], ["dispatcher", "edge1", "edge2"]]},
              {"t": T0 + 2.2, "type": "node.suspected", "host": "edge1"},   # another fault's
              {"t": T0 + 2.6, "type": "node.suspected", "host": "edge5"}]
    series = buckets(records, T0, T0 + 10)
    (fault,) = fault_timings(events, series, T0, 10.0, "dispatcher")
    assert fault["detected_s"] == 2.6
