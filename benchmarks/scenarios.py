"""The scenario library end to end: every `scenarios/*.yaml` through run_scenario.py, one after
the other, then a table of what each run showed (issue 5's target: every scenario passes its
SLOs with lost 0 and mismatched 0). Needs root (Mininet); docker_node_failure also needs the
stage image, built first if missing or stale (as `make image`), reported skipped if that fails.

    sudo .venv/bin/python benchmarks/scenarios.py [--only node_failure,io_faults]
        [--duration 40s] [--out results/scenarios]

Columns: exit (0 pass, 1 SLO breach), ratio (measured / predicted throughput over the whole
window, faults included), lost / dup / mism (requests), faults (how many steps injected),
detect and recover (the slowest fault's seconds from injection, from summary.json; '-' where
a step has nothing to detect or recover, e.g. a heal), breaches (the SLOs that failed).
JSON: OUT/scenarios.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NEEDS_IMAGE = {"docker_node_failure"}


def image_ready() -> bool:
    """Build the stage image if it is missing or stale (the project's builder, offline)."""
    build = subprocess.run([sys.executable, "-m", "testbed.emulation.images", "--quiet"],
                           cwd=ROOT, check=False)
    return build.returncode == 0


def slowest(faults: list[dict[str, Any]], key: str) -> float | None:
    spans = [f[key] - f["at_s"] for f in faults if f.get(key) is not None]
    return round(max(spans), 2) if spans else None


def run(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    print(f"== {name}", file=sys.stderr, flush=True)
    command = [sys.executable, str(ROOT / "run_scenario.py"),
               str(ROOT / "scenarios" / f"{name}.yaml"), "--out", str(out / name)]
    if args.duration:
        command += ["--duration", args.duration]
    result = subprocess.run(command, check=False)
    path = out / name / "summary.json"
    if not path.exists():
        return {"scenario": name, "exit": result.returncode, "error": "no summary.json"}
    summary = json.loads(path.read_text())
    requests = summary["requests"]
    faults = summary.get("faults", [])
    return {"scenario": name, "exit": result.returncode,
            "ratio": summary.get("throughput_ratio"),
            "lost": requests["lost"], "duplicates": requests["duplicates"],
            "mismatched": requests["mismatched"], "faults": len(faults),
            "detect_s": slowest(faults, "detected_s"),
            "recover_s": slowest(faults, "recovered_s"),
            "invalid": summary.get("invalid", []),
            "breaches": summary.get("slo", {}).get("violations", [])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated scenario names (default: all)")
    parser.add_argument("--duration", help="shorten every run (run_scenario.py --duration)")
    parser.add_argument("--out", default=str(ROOT / "results" / "scenarios"))
    args = parser.parse_args()
    names = sorted(p.stem for p in (ROOT / "scenarios").glob("*.yaml"))
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            print(f"error: --only: no scenario {', '.join(unknown)} in scenarios/",
                  file=sys.stderr)
            return 2
        names = [n for n in names if n in wanted]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"scenario": n, "skipped": "the stage image did not build (make image)"}
            if n in NEEDS_IMAGE and not image_ready() else run(n, args, out) for n in names]

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    print(f"\n{'scenario':<22} {'exit':>4} {'ratio':>6} {'lost':>5} {'dup':>4} {'mism':>5} "
          f"{'faults':>6} {'detect':>7} {'recover':>8}  breaches")
    for row in rows:
        if "skipped" in row or "error" in row:
            print(f"{row['scenario']:<22} {row.get('skipped') or row['error']}")
            continue
        print(f"{row['scenario']:<22} {row['exit']:>4} {cell(row['ratio']):>6} "
              f"{row['lost']:>5} {row['duplicates']:>4} {row['mismatched']:>5} "
              f"{row['faults']:>6} {cell(row['detect_s']):>7} {cell(row['recover_s']):>8}  "
              f"{', '.join(row['breaches'] + row['invalid']) or '-'}")
    (out / "scenarios.json").write_text(json.dumps({"duration": args.duration, "rows": rows},
                                                   indent=1))
    print(f"results in {out}", file=sys.stderr)
    ran = [row for row in rows if "skipped" not in row]
    return 0 if ran and all(row.get("exit") == 0 for row in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
