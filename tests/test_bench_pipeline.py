"""benchmarks/pipeline.py's overhead fit: the fixed and per-MiB overhead recovered from
stages' CPU, a slowed stage left out and named (no root)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from partitioner.profile import effective_speed

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "benchmarks" / "pipeline.py")
assert spec is not None and spec.loader is not None
pipeline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pipeline)


def stage(node: str, cores: float, received_mib: float, compute_ms: float, fixed_ms: float,
          per_mib_ms: float, busy: float = 0.9, slowdown: float = 1.0) -> dict[str, Any]:
    """What analyse() records for a stage whose CPU per frame follows the overhead model."""
    full_core = compute_ms * slowdown + fixed_ms + per_mib_ms * received_mib
    return {"node": node, "cores": cores, "received_mib": received_mib,
            "cpu_ms": full_core * cores / effective_speed(cores), "compute_ms": compute_ms,
            "busy": busy}


def run(config: str, *stages: dict[str, Any], replanned: bool = False) -> dict[str, Any]:
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
    fixed, per_mib = pipeline.FRAME_OVERHEAD_MS, pipeline.FRAME_OVERHEAD_MS_PER_MIB
    on_time = run("a", stage("e1", 0.3, 0.57, 12.0, fixed, per_mib),
                  stage("e2", 0.2, 0.1, 5.0, fixed, per_mib, busy=0.3, slowdown=2.0))
    slowed = run("b", stage("e1", 0.3, 0.57, 12.0, fixed, per_mib),
                 stage("e2", 0.2, 0.1, 5.0, fixed, per_mib, slowdown=1.5))
    assert pipeline.slowed_stage(on_time) is None       # the slow one is idle: no evidence
    assert pipeline.slowed_stage(slowed) == "e2 CPU 1.47x its model"
