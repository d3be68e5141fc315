"""Measured vs predicted pipeline throughput: runs the embedded backend on several
(model x topology) configurations and prints, for each, measured / predicted (the figure the
cost model is judged by, goal >= 0.90) and measured / pure limit (goal >= 0.95), where the
pure limit is what the plan in force could deliver with no per-frame CPU besides
onnxruntime: ONNX compute at the hosts' effective speed and link times only
(`partitioner.instance.pure_bottleneck_ms`). Needs root (Mininet).

    sudo .venv/bin/python benchmarks/pipeline.py [--duration 20s] [--out results/bench_pipeline]
        [--only resnet18,bert_mini] [--topologies star-5] [--no-standby]

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
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testbed.control import events as ev  # noqa: E402

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
    """Pure limit of the first plan, and each stage's overhead implied by its host's CPU."""
    from formats.topology import load_topology
    from partitioner.instance import load_instance, plan_from_json, pure_bottleneck_ms
    from partitioner.profile import effective_speed

    summary = json.loads((directory / "summary.json").read_text())
    instance = load_instance(directory / "instance.json")
    plan = plan_from_json(instance, json.loads((directory / "plan.json").read_text()))
    pure_rps = 1000.0 / pure_bottleneck_ms(instance, plan.stages, plan.chains)
    measured = summary["throughput_rps"]
    cores = {h.name: h.cpu for h in
             load_topology(ROOT / "topologies" / f"{topology}.yaml").edge_hosts()}
    with (directory / "timeseries.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    overheads = []
    for stage in plan.stages:
        used = [float(r[f"{stage.node}_cpu"]) for r in rows if r.get(f"{stage.node}_cpu")]
        if not used or measured <= 0:
            continue
        cpu_ms = statistics.mean(used) / measured * 1000.0
        compute = sum(s.compute_ms for s in instance.segments[stage.first:stage.end])
        c = cores[stage.node]
        overheads.append(cpu_ms * effective_speed(c) / c - compute)
    events = [json.loads(line) for line in (directory / "events.jsonl").open()]
    steady = steady_rps(directory, summary["window"], events)
    return {
        "pure_rps": pure_rps, "pure_ratio": measured / pure_rps, "steady_rps": steady,
        "steady_pure_ratio": None if steady is None else steady / pure_rps,
        "overhead_ms": statistics.median(overheads) if overheads else None,
        "replanned": sum(e.get("type") == "plan.deployed" for e in events) > 1,
        "frame_overhead_ms": instance.frame_overhead_ms,
    }


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", default="20s", help="measured window per run")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench_pipeline"))
    parser.add_argument("--only", help="comma-separated models to run")
    parser.add_argument("--topologies", help="comma-separated topologies to run")
    parser.add_argument("--no-standby", action="store_true",
                        help="control: {standby: false}: no warm standbys load beside the "
                             "serving stages, so the window measures the plan alone")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model, topology in CONFIGS:
        if args.only and model not in args.only.split(","):
            continue
        if args.topologies and topology not in args.topologies.split(","):
            continue
        name = f"{model}-{topology}"
        concurrency = concurrency_for(model, topology)
        scenario = out / f"{name}.yaml"
        scenario.write_text(scenario_text(model, topology, concurrency, args.duration,
                                          standby=not args.no_standby))
        print(f"== {name} (concurrency {concurrency})", file=sys.stderr, flush=True)
        result = subprocess.run([sys.executable, str(ROOT / "run_scenario.py"), str(scenario),
                                 "--out", str(out / name)], check=False)
        summary_path = out / name / "summary.json"
        if not summary_path.exists():
            rows.append({"config": name, "error": f"exit {result.returncode}"})
            continue
        summary = json.loads(summary_path.read_text())
        plan = summary.get("plan", {})
        rows.append({
            "config": name, "stages": len(plan.get("stages", [])),
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
              f"{row['mismatched']:>4}" + (" (re-planned)" if row["replanned"] else ""))
    (out / "pipeline.json").write_text(json.dumps(rows, indent=1))
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
