"""The `edgepipe` console command (`pip install .`): one verb per job.

    edgepipe run SCENARIO... [--out DIR] [--junit FILE] ...   (= run_scenario.py; results in
                                                              ./results/ by default)
    edgepipe plan|split|cuts|profile|solve|zoo ...            (= python -m partitioner VERB)
    edgepipe cleanup [--list] [--json]                        a dead run's leftovers

Division of labour: this module only routes a verb to the command line that owns it
(testbed.experiment.driver, partitioner.__main__); `cleanup` is its own: it lists the run
records of testbed.emulation.records and clears those whose driver is dead, with the same
code a new run uses (never by process name, never `mn -c`). run_scenario.py and
`python -m partitioner` stay as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from formats.errors import EXIT_BAD_INPUT

PARTITIONER_VERBS = {
    "plan": "profile + plan a model on a topology (plan.json)",
    "split": "cut a model into stage_NN.onnx + stages.json",
    "cuts": "list the valid cut points of a model",
    "profile": "per-segment compute, memory and bytes (a planner instance)",
    "solve": "solve a planner instance",
    "zoo": "build or list the seeded model zoo",
}


def _run(argv: list[str]) -> int:
    from testbed.experiment.driver import main

    return main(argv, prog="edgepipe run", results_root=Path.cwd() / "results")


def _partitioner(verb: str) -> Callable[[list[str]], int]:
    def call(argv: list[str]) -> int:
        from partitioner.__main__ import main

        return main([verb, *argv], prog="edgepipe")
    return call


def cleanup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgepipe cleanup", description=(
        "Remove what runs whose driver died (kill -9, a cancelled CI job) left behind: "
        "processes, interfaces, bridges, cgroups, mounts, containers, by their run records "
        "in /run/edgepipe/runs/. Runs whose driver lives are never touched."))
    parser.add_argument("--list", action="store_true",
                        help="only list the run records, change nothing")
    parser.add_argument("--json", action="store_true", help="JSON instead of a table")
    return parser


def _cleanup(argv: list[str]) -> int:
    args = cleanup_parser().parse_args(argv)
    from testbed.emulation import records

    found = records.list_records()
    rows = [{"run_id": r.run_id, "topology": Path(r.topology).stem, "status": r.status,
             "driver_pid": r.driver_pid, "driver_alive": r.driver_alive(),
             "age_s": round(time.time() - r.created), "run_dir": r.run_dir} for r in found]
    if not args.list:
        dead = [row for row in rows if not row["driver_alive"]]
        if dead and os.geteuid() != 0:
            print("error: clearing a run needs root (sudo)", file=sys.stderr)
            return EXIT_BAD_INPUT
        from testbed.emulation.network import clear_stale_runs

        cleared = set(clear_stale_runs()) if dead else set()
        for row in rows:
            row["action"] = ("kept: its driver runs" if row["driver_alive"] else
                             "cleared" if row["run_id"] in cleared else
                             "NOT cleared completely: see the warnings, try again")
    if args.json:
        print(json.dumps({"state_dir": str(records.state_dir()), "runs": rows}, indent=1))
    elif not rows:
        print(f"no run records in {records.state_dir()}")
    else:
        print(f"{'run':<7} {'topology':<14} {'status':<9} {'driver':>8} {'alive':<6} "
              f"{'age s':>6}  {'action' if not args.list else 'results'}")
        for row in rows:
            print(f"{row['run_id']:<7} {row['topology']:<14} {row['status']:<9} "
                  f"{row['driver_pid']:>8} {'yes' if row['driver_alive'] else 'no':<6} "
                  f"{row['age_s']:>6}  {row['run_dir'] if args.list else row['action']}")
    failed = [row for row in rows if row.get("action", "").startswith("NOT")]
    return 1 if failed else 0


VERBS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "run": ("run scenarios (files or directories) on the emulated cluster; "
            "= run_scenario.py", _run),
    **{verb: (text, _partitioner(verb)) for verb, text in PARTITIONER_VERBS.items()},
    "cleanup": ("clear what dead runs left behind (by their run records)", _cleanup),
}


def build_parser() -> argparse.ArgumentParser:
    """The top level, for usage and --help; each verb parses its own arguments."""
    parser = argparse.ArgumentParser(prog="edgepipe", description=(
        "Partitioned DNN inference on an emulated edge cluster. `edgepipe VERB --help` "
        "for a verb's arguments."))
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (text, _) in VERBS.items():
        verbs.add_parser(verb, help=text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in VERBS:
        build_parser().parse_args(argv)     # prints usage or help and exits (2 on errors)
        return EXIT_BAD_INPUT
    return VERBS[argv[0]][1](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
