"""Seeded fault schedules on the real emulator (issue 11, item 6): each schedule is written as
a valid scenario file, run through run_scenario.py, and the runs are tabulated per fault kind.

    sudo .venv/bin/python benchmarks/chaos.py --seed 1 --schedules 20 \
        [--topology topologies/star-6.yaml --topology topologies/two-switch-6.yaml ...] \
        [--duration short|NNs] [--model resnet18] [--out results/chaos] [--write-only]

Schedule i of seed N draws from random.Random(N * 100003 + i) (the same files every time): a
topology (round-robin over --topology), then faults one after another, 1.5-5 s apart, so they
overlap: crash (most followed by a restart 3-6 s later), restart of a running node, pause
(healed by its duration or by a node.resume), a partition of one node from the rest, a slow
node (node.cpu at a quarter of its share), a full disk, and once per schedule a model update
rolled back a few seconds later. A node already in a fault is not picked again until that
fault ends. Every drawn step is checked against the node state machine
(formats.nodestate), and each file is loaded by formats.scenario before it runs, so every
schedule is a scenario a user could have written. `--duration short` is 30 s measured (faults
from 4 s to 22 s); the default is 45 s.

Output: OUT/schedule-NN.yaml (the scenarios), OUT/schedule-NN/ (results), OUT/chaos.json and
two tables on stdout. Per fault kind: how many were injected, how many were detected (a
detection event about the target, results.DETECTION_EVENTS), the median and worst seconds
from injection to detection and to recovery (throughput back to 90% of the plan in force;
`rel`: back to 90% of the rate before the fault, scaled by the plans' predictions, which a
busy machine that delivers under the predictions can still reach), and for restarts the
seconds to re-admission. Per schedule: exit code, lost, duplicates,
mismatched, measured/predicted throughput. Lost/duplicate/mismatched are per run (a request
cannot be pinned on one of several overlapping faults); the per-kind table sums them over the
runs that contain that kind. The machine is shared: note its load with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from formats.errors import InputError  # noqa: E402
from formats.nodestate import check_node_states  # noqa: E402
from formats.scenario import Step, load_scenario  # noqa: E402
from formats.topology import MIN_CPU, Topology, load_topology  # noqa: E402

TOPOLOGIES = ("topologies/star-6.yaml", "topologies/two-switch-6.yaml",
              "topologies/hetero-6.yaml")
DURATIONS = {"short": 30.0, "long": 45.0}
KINDS = ("crash", "restart", "pause", "partition", "slow", "disk_full", "model")
WEIGHTS = (4, 2, 2, 2, 2, 1, 1)


@dataclass
class Drawn:
    at: float
    action: str
    target: Any = None
    params: dict[str, Any] | None = None
    duration: float | None = None

    def yaml(self) -> str:
        parts = [f"at: {self.at:g}s", f"action: {self.action}"]
        if self.target is not None:
            parts.append(f"target: {json.dumps(self.target)}")
        if self.params:
            parts.append("params: {" + ", ".join(f"{k}: {v}" for k, v in self.params.items())
                         + "}")
        if self.duration is not None:
            parts.append(f"duration: {self.duration:g}s")
        return "  - {" + ", ".join(parts) + "}"


def _valid(steps: list[Drawn], topology: Topology) -> bool:
    as_steps = [Step(s.at, s.action, s.target, s.params or {}, s.duration, i + 1)
                for i, s in enumerate(steps)]
    try:
        check_node_states(sorted(as_steps, key=lambda s: s.at_s), "<drawn>", topology.hosts)
    except InputError:
        return False
    return True


def draw_schedule(rng: random.Random, topology: Topology, duration_s: float) -> list[Drawn]:
    """Faults from 4 s to duration - 8 s (recovery stays visible), each on a node not
    already in a fault, every prefix valid under the node state machine."""
    dispatcher = topology.dispatcher().name
    edges = sorted(h for h in topology.hosts if h != dispatcher)
    busy: dict[str, float] = {}                 # node -> until when it is in a fault
    steps: list[Drawn] = []
    t, last = 4.0, duration_s - 8.0
    model_done = False
    while t <= last:
        kind = rng.choices(KINDS, WEIGHTS)[0]
        free = [n for n in edges if busy.get(n, 0.0) <= t]
        if kind == "model":
            if model_done:
                continue
            model_done = True
            back = round(t + rng.uniform(5, 8), 1)
            steps.append(Drawn(t, "model.update", params={"version": 2}))
            if back < duration_s - 1:
                steps.append(Drawn(back, "model.rollback"))
        elif free:
            node = rng.choice(free)
            new = _node_fault(rng, kind, node, t, topology, dispatcher, edges)
            if _valid(steps + new, topology):
                steps += new
                busy[node] = max(s.at + (s.duration or 0.0) for s in new) + 1.0
        t = round(t + rng.uniform(1.5, 5.0), 1)
    return sorted(steps, key=lambda s: s.at)


def _node_fault(rng: random.Random, kind: str, node: str, t: float, topology: Topology,
                dispatcher: str, edges: list[str]) -> list[Drawn]:
    if kind == "crash":
        steps = [Drawn(t, "node.crash", node)]
        if rng.random() < 0.75:
            steps.append(Drawn(round(t + rng.uniform(3, 6), 1), "node.restart", node))
        return steps
    if kind == "restart":
        return [Drawn(t, "node.restart", node)]
    if kind == "pause":
        hold = round(rng.uniform(2, 4), 1)
        if rng.random() < 0.5:
            return [Drawn(t, "node.pause", node, duration=hold)]
        return [Drawn(t, "node.pause", node), Drawn(round(t + hold, 1), "node.resume", node)]
    if kind == "partition":
        others = [dispatcher] + [e for e in edges if e != node]
        return [Drawn(t, "link.partition", [[node], others],
                      duration=round(rng.uniform(2, 4), 1))]
    if kind == "slow":
        cores = max(MIN_CPU, round(topology.hosts[node].cpu / 4, 3))
        return [Drawn(t, "node.cpu", node, {"cpu": cores}, round(rng.uniform(4, 8), 1))]
    return [Drawn(t, "io.disk_full", node, duration=round(rng.uniform(3, 6), 1))]


def write_schedule(path: Path, name: str, topology_path: Path, model: str, duration_s: float,
                   steps: list[Drawn]) -> None:
    lines = [f"# drawn by benchmarks/chaos.py ({name})", f"name: {name}",
             f"topology: {topology_path}",
             f"model: {{zoo: {model}}}", "planner: {algorithm: auto}", "backend: embedded",
             f"workload: {{mode: closed, concurrency: 6, duration: {duration_s:g}s, "
             "warmup: 4s, seed: 1}", "steps:"]
    lines += [s.yaml() for s in steps]
    lines.append("slo: {lost: 0, mismatched: 0}")
    path.write_text("\n".join(lines) + "\n")
    load_scenario(path)          # a drawn schedule is a valid scenario, or this raises


def kind_of(action: str) -> str:
    return {"node.crash": "crash", "node.restart": "restart", "node.pause": "pause",
            "node.resume": "resume", "link.partition": "partition", "node.cpu": "slow",
            "io.disk_full": "disk_full", "model.update": "model.update",
            "model.rollback": "model.rollback"}.get(action, action)


def run_schedule(path: Path, out: Path, topology: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, str(ROOT / "run_scenario.py"), str(path),
                             "--out", str(out)], capture_output=True, text=True, check=False)
    summary_path = out / "summary.json"
    if not summary_path.exists():
        return {"schedule": path.stem, "exit": result.returncode, "topology": topology,
                "error": (result.stderr or result.stdout)[-600:]}
    summary = json.loads(summary_path.read_text())
    requests = summary["requests"]
    return {"schedule": path.stem, "exit": result.returncode,
            "topology": topology,
            "lost": requests["lost"], "duplicates": requests["duplicates"],
            "mismatched": requests["mismatched"],
            "ratio": summary.get("throughput_ratio"), "faults": summary.get("faults", [])}


def _spans(faults: list[dict[str, Any]], key: str) -> list[float]:
    return [f[key] - f["at_s"] for f in faults if f.get(key) is not None]


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f}/{max(values):.2f}"


def per_kind(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for run in runs:
        kinds_here = set()
        for fault in run.get("faults", []):
            kind = kind_of(fault["action"])
            kinds_here.add(kind)
            row = table.setdefault(kind, {"n": 0, "detected": 0, "detect": [], "recover": [],
                                          "unrecovered": 0, "recover_rel": [],
                                          "unrecovered_rel": 0, "readmit": [], "lost": 0,
                                          "duplicates": 0, "mismatched": 0})
            row["n"] += 1
            row["detected"] += fault.get("detected_s") is not None
            row["detect"] += _spans([fault], "detected_s")
            row["recover"] += _spans([fault], "recovered_s")
            row["unrecovered"] += fault.get("recovered_s") is None
            row["recover_rel"] += _spans([fault], "recovered_rel_s")
            row["unrecovered_rel"] += fault.get("recovered_rel_s") is None
            row["readmit"] += _spans([fault], "readmitted_s")
        for kind in kinds_here:
            for key in ("lost", "duplicates", "mismatched"):
                table[kind][key] += run.get(key) or 0
    return table


def print_tables(runs: list[dict[str, Any]]) -> None:
    print(f"{'kind':<15}{'n':>4}{'detected':>9}  {'detect s med/max':>17}  "
          f"{'recover s med/max':>18}{'unrec':>6}  {'rel s med/max':>14}{'unrec':>6}  "
          f"{'readmit s':>10}{'lost':>5}{'dup':>5}{'mism':>5}")
    for kind, row in sorted(per_kind(runs).items()):
        print(f"{kind:<15}{row['n']:>4}{row['detected']:>9}  {_fmt(row['detect']):>17}  "
              f"{_fmt(row['recover']):>18}{row['unrecovered']:>6}  "
              f"{_fmt(row['recover_rel']):>14}{row['unrecovered_rel']:>6}  "
              f"{_fmt(row['readmit']):>10}"
              f"{row['lost']:>5}{row['duplicates']:>5}{row['mismatched']:>5}")
    print()
    print(f"{'schedule':<14}{'topology':<14}{'exit':>5}{'faults':>7}{'lost':>6}{'dup':>5}"
          f"{'mism':>5}{'ratio':>7}")
    for run in runs:
        ratio = run.get("ratio")
        cells = [str(run.get(k, "-")) for k in ("lost", "duplicates", "mismatched")]
        print(f"{run['schedule']:<14}{str(run.get('topology', '-')):<14}{run['exit']:>5}"
              f"{len(run.get('faults', [])):>7}{cells[0]:>6}{cells[1]:>5}{cells[2]:>5}"
              f"{'-' if ratio is None else f'{ratio:.2f}':>7}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--schedules", type=int, default=3)
    parser.add_argument("--topology", action="append", default=None,
                        help="repeatable; schedules take them in turn (default: star-6, "
                             "two-switch-6, hetero-6)")
    parser.add_argument("--duration", default="long",
                        help="short (30 s), long (45 s) or a number of seconds")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "chaos")
    parser.add_argument("--write-only", action="store_true",
                        help="write the scenario files and stop (no root needed)")
    args = parser.parse_args(argv)
    duration = DURATIONS.get(args.duration) or float(args.duration.rstrip("s"))
    topologies = [Path(t).resolve() for t in (args.topology or
                                               [str(ROOT / t) for t in TOPOLOGIES])]
    args.out.mkdir(parents=True, exist_ok=True)
    paths: list[tuple[Path, str]] = []
    for i in range(args.schedules):
        rng = random.Random(args.seed * 100003 + i)
        topology_path = topologies[i % len(topologies)]
        topology = load_topology(topology_path)
        name = f"chaos-s{args.seed}-{i:02d}"
        path = args.out / f"{name}.yaml"
        write_schedule(path, name, topology_path, args.model, duration,
                       draw_schedule(rng, topology, duration))
        paths.append((path, topology.name))
        print(f"wrote {path}", file=sys.stderr)
    if args.write_only:
        return 0
    runs = []
    for path, topology_name in paths:
        print(f"== {path.stem}", file=sys.stderr, flush=True)
        runs.append(run_schedule(path, args.out / path.stem, topology_name))
        (args.out / "chaos.json").write_text(json.dumps(
            {"seed": args.seed, "duration_s": duration, "runs": runs,
             "per_kind": per_kind(runs), "load": os.getloadavg()}, indent=1, default=str))
    print(f"seed {args.seed}, {len(runs)} schedules of {duration:g} s, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print_tables(runs)
    return 0 if all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
