"""Measured vs predicted pipeline throughput: runs the embedded backend on several
(model x topology) configurations and prints, for each, measured / predicted (the figure the
cost model is judged by, goal >= 0.90) and measured / pure limit (goal >= 0.95), where the
pure limit is what the plan in force could deliver with no per-frame CPU besides
onnxruntime: ONNX compute at the hosts' effective speed and link times only
(`partitioner.instance.pure_bottleneck_ms`). Needs root (Mininet).

    sudo .venv/bin/python benchmarks/pipeline.py [--duration 20s] [--out results/bench_pipeline]
        [--only resnet18,bert_mini] [--topologies star-5] [--no-standby] [--repeat N]
        [--reanalyse]

Each run's closed loop keeps 2 x (plan latency / plan bottleneck) requests in flight (at least
4): by Little's law latency / bottleneck are needed to keep the bottleneck busy at all, and a
fixed concurrency below that measures the workload, not the pipeline. `overhead ms` is, per
stage, what the cost model's `frame_overhead_ms` would have to be for the stage's measured
host CPU (cgroup, over the measured window, agent and kernel included) at the measured rate:
CPU per frame x effective speed / cores - the stage's profiled compute (the median over the
stages is shown; a plan re-planned during the run is flagged, its figures are the first
plan's). `steady rps` is the rate from the moment the last warm standby was loaded to the end
of the window (standbys load beside the serving stages during the first seconds, at a bounded
share of their hosts: docs/architecture.md "Recovery"), `-` when that left under 5 s;
`--no-standby` runs without them (the cost model's figure for the plan alone).

The table ends with the overhead fit: the fixed + per-MiB-received overhead that best
explains every busy stage's CPU (`fit_overhead`), beside the cost model's constants
(`partitioner.profile.FRAME_OVERHEAD_MS`, `FRAME_OVERHEAD_MS_PER_MIB`); `--reanalyse`
prints the table and the fit again from the runs under `--out` without running anything.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from partitioner.profile import FRAME_OVERHEAD_MS, FRAME_OVERHEAD_MS_PER_MIB  # noqa: E402
from testbed.control import events as ev  # noqa: E402
from testbed.experiment.cost_check import (  # noqa: E402
    BUSY_FOR_CHECK,
    StageCpu,
    dearer,
    host_cpu_series,
    replanned,
    stage_cpu,
)

OUTLIER = 0.2       # a stage this far off the first fit is left out of the second

CONFIGS = [  # (model, topology): every zoo model on two topologies
    ("resnet18", "star-5"),            # the baseline scenario's pair
    ("resnet18", "hetero-6"),
    ("mobilenetv2", "star-5"),
    ("mobilenetv2", "two-tier-20"),    # a two-tier topology
    ("resnet50", "star-10"),
    ("resnet50", "hetero-6"),
    ("bert_mini", "hetero-6"),         # a transformer (two-tensor cuts)
    ("bert_mini", "star-5"),
    ("gpt_exported", "star-5"),        # exporter-shaped: symbolic axes, zoo length 64
    ("gpt_exported", "hetero-6"),
    ("bert_exported", "star-5"),
    ("bert_exported", "hetero-6"),
    # vgg16 is left out: its 550 MB file exceeds every edge host's 256 MiB disk.
]


def concurrency_for(model: str, topology: str) -> int:
    """Requests to keep in flight for the plan the run will make (the driver's planner)."""
    from formats.topology import load_topology
    from partitioner.profile import instance_for_topology, profile_model
    from partitioner.replicate import plan_pipelines

    instance = instance_for_topology(profile_model(model, progress=False),
                                     load_topology(ROOT / "topologies" / f"{topology}.yaml"))
    plan = plan_pipelines(instance, "auto", 2.0, 0, 1)
    return max(4, math.ceil(2 * plan.latency_ms / plan.bottleneck_ms))


def scenario_text(model: str, topology: str, concurrency: int, duration: str,
                  standby: bool = True) -> str:
    return (f"name: bench-{model}-{topology}\n"
            f"topology: {ROOT / 'topologies' / (topology + '.yaml')}\n"
            f"model: {{zoo: {model}}}\n"
            f"workload: {{mode: closed, concurrency: {concurrency}, duration: {duration}, "
            f"warmup: 5s, seed: 1}}\n"
            + ("" if standby else "control: {standby: false}\n")
            + "slo: {lost: 0, mismatched: 0}\n")


def analyse(directory: Path, topology: str) -> dict[str, Any]:
    """Pure limit of the first plan, and each stage's CPU against its model."""
    from formats.topology import load_topology
    from partitioner.instance import load_instance, plan_from_json, pure_bottleneck_ms

    summary = json.loads((directory / "summary.json").read_text())
    instance = load_instance(directory / "instance.json")
    plan = plan_from_json(instance, json.loads((directory / "plan.json").read_text()))
    pure_rps = 1000.0 / pure_bottleneck_ms(instance, plan.stages, plan.chains)
    measured = summary["throughput_rps"]
    cores = {h.name: h.cpu for h in
             load_topology(ROOT / "topologies" / f"{topology}.yaml").edge_hosts()}
    with (directory / "timeseries.csv").open() as handle:
        host_cpu = host_cpu_series(csv.DictReader(handle))
    stages = stage_cpu(instance, plan, cores, host_cpu, measured)
    events = [json.loads(line) for line in (directory / "events.jsonl").open()]
    steady = steady_rps(directory, summary["window"], events)
    return {
        "pure_rps": pure_rps, "pure_ratio": measured / pure_rps, "steady_rps": steady,
        "steady_pure_ratio": None if steady is None else steady / pure_rps,
        "overhead_ms": (statistics.median(s.implied_overhead_ms for s in stages)
                        if stages else None),
        "replanned": replanned(events),
        "frame_overhead_ms": instance.frame_overhead_ms,
        "stage_samples": stages,
    }


def dearest_stage(row: dict[str, Any]) -> str | None:
    """The busy stage dearer than its model by more than cost_check.TOLERANCE, the most (the
    machine slowed it: no overhead term explains that), as a note for the table."""
    over = dearer(row["stage_samples"])
    return f"{over[0].node} CPU {over[0].ratio:.2f}x its model" if over else None


def fit_overhead(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The cost model's overhead term (fixed ms + ms per MiB received, full-core) that best
    explains the measured stages' CPU: least squares of each stage's relative error, its
    CPU per frame against its model (testbed.experiment.cost_check) with that overhead.
    Only judged stages count (their host at least cost_check.BUSY_FOR_CHECK busy); runs
    that re-planned are left out (their figures are the first plan's). Stages more than
    OUTLIER off the first fit are dropped and named: a stage computing slower than its
    profile (the machine busy with something else) is not a frame cost."""
    import numpy as np

    samples = [(row["config"], s) for row in rows
               if "error" not in row and not row["replanned"]
               for s in row["stage_samples"] if s.judged]

    def relative_errors(kept: list[tuple[str, StageCpu]], fixed_ms: float,
                        per_mib_ms: float) -> list[float]:
        return [s.modelled_ms(fixed_ms + per_mib_ms * s.received_mib) / s.cpu_ms - 1.0
                for _, s in kept]

    def fit(kept: list[tuple[str, StageCpu]]) -> tuple[float, float]:
        full_core = np.array([s.compute_ms + s.implied_overhead_ms for _, s in kept])
        design = np.array([[1.0, s.received_mib] for _, s in kept]) / full_core[:, None]
        implied = np.array([s.implied_overhead_ms for _, s in kept]) / full_core
        (fixed, per_mib), *_ = np.linalg.lstsq(design, implied, rcond=None)
        return float(fixed), float(per_mib)

    def rms(errors: list[float]) -> float:
        return math.sqrt(sum(e * e for e in errors) / len(errors))

    def sizes(kept: list[tuple[str, StageCpu]]) -> int:
        return len({round(s.received_mib, 2) for _, s in kept})

    if sizes(samples) < 2:
        return None
    first = fit(samples)
    errors = relative_errors(samples, *first)
    kept = [sample for sample, e in zip(samples, errors) if abs(e) <= OUTLIER]
    dropped = [f"{config}/{s.node} {e:+.0%}" for (config, s), e in zip(samples, errors)
               if abs(e) > OUTLIER]
    fixed, per_mib = fit(kept) if sizes(kept) >= 2 else first
    return {"stages": len(kept), "fixed_ms": fixed, "per_mib_ms": per_mib,
            "rms_error": rms(relative_errors(kept, fixed, per_mib)),
            "model_rms_error": rms(relative_errors(kept, FRAME_OVERHEAD_MS,
                                                   FRAME_OVERHEAD_MS_PER_MIB)),
            "dropped": dropped}


def steady_rps(directory: Path, window: dict[str, float],
               events: list[dict[str, Any]]) -> float | None:
    """Requests answered per second from the last standby's `worker.ready` (epoch 0: a worker
    with no route) to the end of the measured window; None when under 5 s are left."""
    start = window["start_unix"]
    end = start + window["duration_s"]
    loaded = max([e["t"] for e in events if e.get("type") == ev.WORKER_READY
                  and e.get("epoch") == 0] + [start])
    if end - loaded < 5.0:
        return None
    with (directory / "requests.csv").open() as handle:
        done = [float(r["done"]) for r in csv.DictReader(handle) if r["status"] == "completed"]
    return sum(loaded <= t < end for t in done) / (end - loaded)


def run_names(config: str, repeat: int, existing: Path | None = None) -> list[str]:
    """The results directories of a pair's runs: CONFIG, then CONFIG.2, CONFIG.3, ... With
    `existing` (re-analysing), those there are, however many."""
    if existing is None:
        return [config] + [f"{config}.{k}" for k in range(2, repeat + 1)]
    names = []
    while (existing / (name := config if not names else f"{config}.{len(names) + 1}")
           / "summary.json").exists():
        names.append(name)
    return names


def print_repeats(rows: list[dict[str, Any]]) -> None:
    """Per pair run more than once: the median and range of measured / predicted and
    measured / pure limit, and how many runs were within 10% of the prediction."""
    pairs: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if "error" not in row:
            pairs.setdefault(row["pair"], []).append(row)
    repeated = {pair: runs for pair, runs in pairs.items() if len(runs) > 1}
    if not repeated:
        return
    print(f"\n{'pair':26} {'runs':>4} {'/pred median':>12} {'range':>11} {'/pure median':>12} "
          f"{'range':>11} {'within 10%':>10}")
    for pair, runs in repeated.items():
        ratios = sorted(r["ratio"] for r in runs)
        pure = sorted(r["pure_ratio"] for r in runs)
        print(f"{pair:26} {len(runs):>4} {statistics.median(ratios):>12.2f} "
              f"{ratios[0]:>5.2f}-{ratios[-1]:<5.2f} {statistics.median(pure):>12.2f} "
              f"{pure[0]:>5.2f}-{pure[-1]:<5.2f} "
              f"{sum(abs(r - 1.0) <= 0.10 for r in ratios):>6}/{len(runs)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", default="20s", help="measured window per run")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench_pipeline"))
    parser.add_argument("--only", help="comma-separated models to run")
    parser.add_argument("--topologies", help="comma-separated topologies to run")
    parser.add_argument("--no-standby", action="store_true",
                        help="control: {standby: false}: no warm standbys load beside the "
                             "serving stages, so the window measures the plan alone")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each pair this many times (CONFIG, CONFIG.2, ...) and print "
                             "the median and range per pair: one run on a shared machine can "
                             "be 30%% off the next")
    parser.add_argument("--reanalyse", action="store_true",
                        help="run nothing: print the table and the overhead fit again from "
                             "the runs already under --out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model, topology in CONFIGS:
        if args.only and model not in args.only.split(","):
            continue
        if args.topologies and topology not in args.topologies.split(","):
            continue
        config = f"{model}-{topology}"
        scenario = out / f"{config}.yaml"
        if not args.reanalyse:
            concurrency = concurrency_for(model, topology)
            scenario.write_text(scenario_text(model, topology, concurrency, args.duration,
                                              standby=not args.no_standby))
        elif scenario.exists():
            concurrency = yaml.safe_load(scenario.read_text())["workload"]["concurrency"]
        else:
            continue
        for name in run_names(config, args.repeat, out if args.reanalyse else None):
            summary_path = out / name / "summary.json"
            if not args.reanalyse:
                print(f"== {name} (concurrency {concurrency})", file=sys.stderr, flush=True)
                result = subprocess.run([sys.executable, str(ROOT / "run_scenario.py"),
                                         str(scenario), "--out", str(out / name)], check=False)
                if not summary_path.exists():
                    rows.append({"config": name, "error": f"exit {result.returncode}"})
                    continue
            summary = json.loads(summary_path.read_text())
            plan = summary.get("plan", {})
            rows.append({
                "config": name, "pair": config, "stages": len(plan.get("stages", [])),
                "concurrency": concurrency,
                "predicted_rps": summary["predicted_throughput_rps"],
                "measured_rps": summary["throughput_rps"],
                "ratio": summary["throughput_ratio"],
                "p50_ms": summary["latency_ms"]["p50"], "p99_ms": summary["latency_ms"]["p99"],
                "lost": summary["requests"]["lost"],
                "mismatched": summary["requests"]["mismatched"],
                **analyse(out / name, topology),
            })
    print(f"\n{'config':26} {'stages':>6} {'conc':>4} {'pred rps':>8} {'pure rps':>8} "
          f"{'meas rps':>8} {'/pred':>5} {'/pure':>5} {'steady rps':>10} {'/pure':>5} "
          f"{'overhead ms':>11} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'lost':>4} {'mism':>4}")
    for row in rows:
        if "error" in row:
            print(f"{row['config']:26} {row['error']}")
            continue
        overhead = "-" if row["overhead_ms"] is None else f"{row['overhead_ms']:.2f}"
        steady = (f"{'-':>10} {'-':>5}" if row["steady_rps"] is None else
                  f"{row['steady_rps']:>10.2f} {row['steady_pure_ratio']:>5.2f}")
        print(f"{row['config']:26} {row['stages']:>6} {row['concurrency']:>4} "
              f"{row['predicted_rps']:>8.2f} {row['pure_rps']:>8.2f} {row['measured_rps']:>8.2f} "
              f"{row['ratio']:>5.2f} {row['pure_ratio']:>5.2f} {steady} {overhead:>11} "
              f"{row['p50_ms']:>7.0f} {row['p99_ms']:>7.0f} {row['lost']:>4} "
              f"{row['mismatched']:>4}" + (" (re-planned)" if row["replanned"] else "")
              + (f" ({dearest})" if (dearest := dearest_stage(row)) else ""))
    print_repeats(rows)
    fit = fit_overhead(rows)
    if fit is not None:
        print(f"\noverhead fit over {fit['stages']} stages at >= {BUSY_FOR_CHECK:.0%} busy: "
              f"{fit['fixed_ms']:.2f} ms + {fit['per_mib_ms']:.2f} ms per MiB received "
              f"(stage CPU rms error {fit['rms_error']:.1%}); the cost model's "
              f"{FRAME_OVERHEAD_MS} + {FRAME_OVERHEAD_MS_PER_MIB} ms per MiB: "
              f"{fit['model_rms_error']:.1%}")
        if fit["dropped"]:
            print("left out of the fit (stage CPU off by more than "
                  f"{OUTLIER:.0%}): " + ", ".join(fit["dropped"]))
    (out / "pipeline.json").write_text(json.dumps({"runs": rows, "overhead_fit": fit},
                                                  indent=1, default=asdict))
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
