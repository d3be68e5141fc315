"""benchmarks/pipeline.py's overhead fit (the fixed and per-MiB overhead recovered from
stages' CPU, a slowed stage left out and named) and testbed.experiment.cost_check, which it
and summary.json share (no root)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from partitioner.instance import MIB, Instance, Node, Plan, Segment, Stage
from partitioner.profile import FRAME_OVERHEAD_MS, FRAME_OVERHEAD_MS_PER_MIB, effective_speed
from testbed.experiment import cost_check
from testbed.experiment.cost_check import StageCpu

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "benchmarks" / "pipeline.py")
assert spec is not None and spec.loader is not None
pipeline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pipeline)


def stage(node: str, cores: float, received_mib: float, compute_ms: float, fixed_ms: float,
          per_mib_ms: float, busy: float = 0.9, slowdown: float = 1.0) -> StageCpu:
    """A stage whose host CPU per frame follows the overhead model (`slowdown` x compute),
    priced by the cost model's constants."""
    full_core = compute_ms * slowdown + fixed_ms + per_mib_ms * received_mib
    return StageCpu(node=node, segments=(0, 1), cores=cores, received_mib=received_mib,
                    compute_ms=compute_ms,
                    overhead_ms=FRAME_OVERHEAD_MS + FRAME_OVERHEAD_MS_PER_MIB * received_mib,
                    cpu_ms=full_core * cores / effective_speed(cores), busy=busy)


def run(config: str, *stages: StageCpu, replanned: bool = False) -> dict[str, Any]:
    return {"config": config, "replanned": replanned, "stage_samples": list(stages)}


def test_the_fit_recovers_the_overhead_the_stages_spent() -> None:
    rows = [run("a", stage("e1", 0.3, 0.57, 12.0, 0.4, 0.8), stage("e2", 0.1, 1.5, 9.0, 0.4, 0.8)),
            run("b", stage("e1", 0.2, 0.06, 1.2, 0.4, 0.8), stage("e2", 0.5, 0.0, 3.0, 0.4, 0.8))]
    fit = pipeline.fit_overhead(rows)
    assert fit is not None and fit["stages"] == 4 and fit["dropped"] == []
    assert fit["fixed_ms"] == pytest.approx(0.4, abs=1e-6)
    assert fit["per_mib_ms"] == pytest.approx(0.8, abs=1e-6)
    assert fit["rms_error"] == pytest.approx(0.0, abs=1e-9)


def test_idle_hosts_replanned_runs_and_slowed_stages_stay_out_of_the_fit() -> None:
    rows = [run("a", stage("e1", 0.3, 0.57, 12.0, 0.3, 0.6), stage("e2", 0.1, 1.5, 9.0, 0.3, 0.6),
                stage("e3", 0.2, 0.1, 2.0, 5.0, 0.0, busy=0.2)),
            run("b", stage("e1", 0.2, 0.06, 1.2, 0.3, 0.6), stage("e2", 0.5, 0.0, 3.0, 0.3, 0.6),
                stage("e3", 0.2, 0.3, 8.0, 0.3, 0.6, slowdown=1.6)),
            run("c", stage("e1", 0.2, 0.5, 1.0, 9.0, 9.0), replanned=True)]
    fit = pipeline.fit_overhead(rows)
    assert fit is not None and fit["stages"] == 4
    assert len(fit["dropped"]) == 1 and fit["dropped"][0].startswith("b/e3 ")
    assert fit["fixed_ms"] == pytest.approx(0.3, abs=1e-6)
    assert fit["per_mib_ms"] == pytest.approx(0.6, abs=1e-6)


def test_no_fit_from_one_frame_size() -> None:
    rows = [run("a", stage("e1", 0.3, 0.57, 12.0, 0.4, 0.8), stage("e2", 0.2, 0.57, 4.0, 0.4, 0.8))]
    assert pipeline.fit_overhead(rows) is None


def test_a_run_whose_stage_computed_slower_than_its_model_is_flagged() -> None:
    fixed, per_mib = FRAME_OVERHEAD_MS, FRAME_OVERHEAD_MS_PER_MIB
    on_time = run("a", stage("e1", 0.3, 0.57, 12.0, fixed, per_mib),
                  stage("e2", 0.2, 0.1, 5.0, fixed, per_mib, busy=0.3, slowdown=2.0))
    slowed = run("b", stage("e1", 0.3, 0.57, 12.0, fixed, per_mib),
                 stage("e2", 0.2, 0.1, 5.0, fixed, per_mib, slowdown=1.5))
    assert pipeline.dearest_stage(on_time) is None      # the slow one is idle: no evidence
    assert pipeline.dearest_stage(slowed) == "e2 CPU 1.44x its model"


def priced() -> tuple[Instance, Plan]:
    segments = [Segment(4.0, 0, MIB // 2), Segment(6.0, 0, MIB // 4), Segment(2.0, 0, 16)]
    nodes = [Node("a", 0.5, 1 << 30), Node("b", 0.2, 1 << 30), Node("c", 0.2, 1 << 30)]
    instance = Instance(segments, MIB, nodes, "src", frame_overhead_ms=0.5,
                        frame_overhead_ms_per_mib=1.5)
    return instance, Plan("auto", [Stage(0, 1, "a"), Stage(1, 3, "b")], 40.0, 100.0, True)


def test_each_stage_is_measured_against_what_the_planner_charged_it() -> None:
    instance, plan = priced()
    cores = {"a": 0.5, "b": 0.2, "c": 0.2}
    # b: 8 ms compute + 0.5 + 1.5 x 0.5 MiB = 9.25 ms at a full core, 0.2 cores = 0.18
    # effective; at 10 rps that is 0.1028 cores of CPU used; twice that means 2x its model
    b_cores = 9.25 * 0.2 / effective_speed(0.2) * 10 / 1000
    stages = cost_check.stage_cpu(instance, plan, cores,
                                  {"a": [0.05, 0.05], "b": [2 * b_cores] * 3, "c": [0.1]}, 10.0)
    assert [s.node for s in stages] == ["a", "b"]        # c serves nothing
    a, b = stages
    assert a.received_mib == 1.0 and a.overhead_ms == pytest.approx(2.0)
    assert b.received_mib == 0.5 and b.compute_ms == pytest.approx(8.0)
    assert b.ratio == pytest.approx(2.0) and b.busy == pytest.approx(2 * b_cores / 0.2)
    assert a.cpu_ms == pytest.approx(5.0) and not a.judged        # 10% of its quota
    section = cost_check.summary_section(stages, replanned=False)
    assert section["checked"] and len(section["dearer"]) == 1
    assert section["dearer"][0].startswith("b [1, 3) used 2.00x the CPU")
    assert cost_check.summary_section(stages, replanned=True)["checked"] is False


def test_pipelines_side_by_side_share_the_requests_and_a_shared_host_is_not_split() -> None:
    instance, _ = priced()
    two = Plan("auto", [Stage(0, 3, "a"), Stage(0, 3, "b")], 40.0, 100.0, True, chains=[1, 1])
    stages = cost_check.stage_cpu(instance, two, {"a": 0.5, "b": 0.2},
                                  {"a": [0.1], "b": [0.1]}, 10.0)
    assert [s.cpu_ms for s in stages] == [pytest.approx(20.0), pytest.approx(20.0)]
    both_on_a = Plan("auto", [Stage(0, 3, "a"), Stage(0, 3, "a")], 40.0, 100.0, True,
                     chains=[1, 1])
    assert cost_check.stage_cpu(instance, both_on_a, {"a": 0.5}, {"a": [0.2]}, 10.0) == []


def test_repeated_runs_are_named_in_turn_and_found_again(tmp_path: Path) -> None:
    assert pipeline.run_names("m-t", 3) == ["m-t", "m-t.2", "m-t.3"]
    assert pipeline.run_names("m-t", 1) == ["m-t"]
    for name in ("m-t", "m-t.2", "m-t.4"):         # .3 missing: .4 is not reached
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text("{}")
    assert pipeline.run_names("m-t", 1, tmp_path) == ["m-t", "m-t.2"]
    assert pipeline.run_names("other", 1, tmp_path) == []


def test_repeats_print_their_median_range_and_count_within_ten_percent(
        capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"pair": "m-t", "config": c, "ratio": r, "pure_ratio": p}
            for c, r, p in (("m-t", 0.95, 0.9), ("m-t.2", 1.3, 1.0), ("m-t.3", 1.05, 0.8))]
    rows.append({"pair": "once", "config": "once", "ratio": 1.0, "pure_ratio": 1.0})
    pipeline.print_repeats(rows)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].split() == ["m-t", "3", "1.05", "0.95-1.30", "0.90",
                                                    "0.80-1.00", "2/3"]
