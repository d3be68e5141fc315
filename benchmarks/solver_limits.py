"""Does `python -m partitioner solve --time-limit T` hold T on big instances? For each size
(segments x nodes) and limit, the command line's wall time (process start to exit, imports and
instance loading included), the solve time the plan reports, and what came back: the exit
code, whether the plan is proven optimal, its bottleneck and its gap to the lower bound (or the
first line of the error, e.g. an instance refused as too big for the machine).

    .venv/bin/python benchmarks/solver_limits.py [--repo /path/to/other/checkout]
        [--sizes 100x50,300x200,1000x200] [--limits 2,10]

Instances are trust_probes.instance (issue 15's probe 5): compute 1-20 ms a segment, outputs of
1-400 kB, identical nodes with room for everything, 100 Mbit/s between every pair. `--repo`
runs another checkout's command line on the same files (the before/after figures).
Timing targets live here, not in tests: the machine's load moves them (printed with each run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))   # run as a script from anywhere

from benchmarks.trust_probes import instance  # noqa: E402


def run(repo: Path, path: Path, limit: float) -> str:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "partitioner", "solve", str(path),
                           "--time-limit", str(limit)], cwd=repo, capture_output=True,
                          text=True, timeout=max(120.0, 20 * limit))
    wall = time.monotonic() - started
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no message)"]
        return f"{wall:6.2f} s  exit {proc.returncode}: {lines[-1][:110]}"
    plan = json.loads(proc.stdout)
    gap = plan.get("gap")
    return (f"{wall:6.2f} s  solve {plan['solve_s']:6.2f} s  exit 0  optimal "
            f"{str(plan['optimal']).lower():<5}  bottleneck {plan['bottleneck_ms']:9.2f} ms  "
            f"gap {'-' if gap is None else f'{gap:.2f}'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(HERE), help="the checkout whose solve to run")
    # 900x60: about the largest the planner's 1 GiB table cap admits; 20x1000: nodes-heavy
    parser.add_argument("--sizes", default="100x50,300x200,1000x200,900x60,20x1000",
                        help="segments x nodes, comma-separated")
    parser.add_argument("--limits", default="2,10", help="--time-limit values, seconds")
    args = parser.parse_args()
    repo = Path(args.repo).resolve()
    work = Path(tempfile.mkdtemp(prefix="solver-limits-"))
    print(f"# solve wall time vs --time-limit, {repo} ({time.strftime('%Y-%m-%d %H:%M')})")
    # What the command costs besides solving: start-up, imports, reading the instance.
    path = work / "tiny.json"
    path.write_text(json.dumps(instance(2, 2)))
    print(f"{'2x2':>9} limit    2 s (load {os.getloadavg()[0]:.1f}) | {run(repo, path, 2.0)}")
    for size in args.sizes.split(","):
        segments, nodes = (int(x) for x in size.split("x"))
        path = work / f"{size}.json"
        path.write_text(json.dumps(instance(segments, nodes)))
        for limit in (float(x) for x in args.limits.split(",")):
            load = os.getloadavg()[0]
            print(f"{size:>9} limit {limit:4g} s (load {load:.1f}) | {run(repo, path, limit)}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
