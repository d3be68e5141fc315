"""Measured vs predicted pipeline throughput: runs the embedded backend on several
(model x topology) configurations and prints measured / predicted for each, the figure the
cost model is judged by (goal: >= 0.90). Needs root (Mininet).

    sudo .venv/bin/python benchmarks/pipeline.py [--duration 20s] [--out results/bench_pipeline]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [  # (model, topology, closed-loop concurrency)
    ("resnet18", "star-5", 6),
    ("mobilenetv2", "star-5", 6),
    ("resnet50", "star-10", 8),
    ("bert_mini", "hetero-6", 6),
]


def scenario_text(model: str, topology: str, concurrency: int, duration: str) -> str:
    return (f"name: bench-{model}-{topology}\n"
            f"topology: {ROOT / 'topologies' / (topology + '.yaml')}\n"
            f"model: {{zoo: {model}}}\n"
            f"workload: {{mode: closed, concurrency: {concurrency}, duration: {duration}, "
            f"warmup: 5s, seed: 1}}\n"
            f"slo: {{lost: 0, mismatched: 0}}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", default="20s", help="measured window per run")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench_pipeline"))
    parser.add_argument("--only", help="comma-separated models to run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model, topology, concurrency in CONFIGS:
        if args.only and model not in args.only.split(","):
            continue
        name = f"{model}-{topology}"
        scenario = out / f"{name}.yaml"
        scenario.write_text(scenario_text(model, topology, concurrency, args.duration))
        print(f"== {name}", file=sys.stderr, flush=True)
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
            "predicted_rps": summary["predicted_throughput_rps"],
            "measured_rps": summary["throughput_rps"],
            "ratio": summary["throughput_ratio"],
            "p50_ms": summary["latency_ms"]["p50"], "p99_ms": summary["latency_ms"]["p99"],
            "lost": summary["requests"]["lost"],
            "mismatched": summary["requests"]["mismatched"],
        })
    print(f"\n{'config':24} {'stages':>6} {'pred rps':>9} {'meas rps':>9} {'ratio':>6} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'lost':>5} {'mism':>5}")
    for row in rows:
        if "error" in row:
            print(f"{row['config']:24} {row['error']}")
            continue
        print(f"{row['config']:24} {row['stages']:>6} {row['predicted_rps']:>9.2f} "
              f"{row['measured_rps']:>9.2f} {row['ratio']:>6.2f} {row['p50_ms']:>8.0f} "
              f"{row['p99_ms']:>8.0f} {row['lost']:>5} {row['mismatched']:>5}")
    (out / "pipeline.json").write_text(json.dumps(rows, indent=1))
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
