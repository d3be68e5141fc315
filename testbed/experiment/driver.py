"""The driver is the experimenter, not part of the system: it checks the input, prepares the
model and the first plan, builds the emulated network, starts agents and the controller in
their hosts, fires the scenario's steps on time, polls progress, collects the records, writes
the results directory and always tears down what it built. Several scenarios in one call
(and the JUnit / Markdown reports and baseline gates of CI jobs) are
testbed.experiment.batch's: it calls `problem` for every scenario first, then `run_one`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from formats.control import K3S_UNSUPPORTED
from formats.errors import EXIT_BAD_INPUT, InputError
from formats.scenario import Scenario
from formats.units import parse_percent
from partitioner.instance import InfeasibleError
from testbed.experiment.prepare import ROOT, Interrupted, log, prepare


def _tolerance(text: str) -> float:
    # '%' required: a bare 0.1 could mean 10% or 0.1%
    if not text.strip().endswith("%"):
        raise argparse.ArgumentTypeError(f"expected a percentage such as 10%, got {text!r}")
    try:
        return parse_percent(text) / 100
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_args(argv: list[str] | None, prog: str = "run_scenario.py") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=(
        "Run scenarios on the emulated edge cluster and write their results directories. "
        "Several scenarios (files or directories of *.yaml) run one after the other, each "
        "with its own network; every file is checked before anything runs. Exit code: 0 "
        "all passed, 1 an SLO (or a baseline comparison) failed or a run broke, 2 bad "
        "input."))
    parser.add_argument("scenario", nargs="+",
                        help="scenario YAML file(s) or directories of them (see scenarios/)")
    parser.add_argument("--out", help=(
        "one scenario file: its results directory (default results/<scenario name>); "
        "several, or a directory: each scenario's results go to OUT/<scenario name>/ "
        "(default results/<scenario name>/)"))
    parser.add_argument("--backend", choices=("embedded", "k3s"),
                        help="override the scenario's backend")
    parser.add_argument("--dry-run", action="store_true",
                        help="plan and write the deployment (k3s: manifests) without running")
    parser.add_argument("--duration", help="override every scenario's workload duration, "
                        "e.g. 45s")
    parser.add_argument("--kubeconfig", help="k3s: the cluster's kubeconfig (default "
                        "$KUBECONFIG)")
    parser.add_argument("--cluster", choices=("emulated",), help=(
        "k3s: build a Kubernetes cluster from the scenario's topology (every host a node "
        "container on the emulated links; root; `make kube-image` first) and run on it"))
    parser.add_argument("--keep", action="store_true",
                        help="k3s: leave the namespace on the cluster after the run")
    parser.add_argument("--plaintext", action="store_true",
                        help="embedded: no CurveZMQ on the control and data planes (for "
                        "experiments, e.g. to measure what encryption costs); by default "
                        "every peer is authenticated by a per-run key")
    parser.add_argument("--check", action="store_true",
                        help="only check every file (and the baseline) and exit: 0 all good, "
                        "2 bad input; builds nothing, needs no root")
    parser.add_argument("--junit", metavar="FILE", help="write a JUnit XML report: a test "
                        "case per scenario, per SLO check and per baseline comparison")
    parser.add_argument("--summary-md", metavar="FILE", help="write a Markdown summary "
                        "(also appended to $GITHUB_STEP_SUMMARY when that is set)")
    parser.add_argument("--baseline", metavar="DIR", help="compare with an earlier call's "
                        "results (DIR/<scenario name>/summary.json, or DIR/summary.json): "
                        "fail when throughput drops, or latency p99 or a fault's recovery "
                        "grows, by more than --tolerance")
    parser.add_argument("--tolerance", type=_tolerance, default=0.10, metavar="PCT",
                        help="what --baseline allows, e.g. 10%% (default 10%%; recovery "
                        "also one 1 s bucket)")
    return parser.parse_args(argv)


def problem(scenario: Scenario, args: argparse.Namespace) -> str | None:
    """Why this scenario cannot run as asked (bad input: exit 2), found before anything is
    built; None when it can."""
    from testbed.experiment.faults import check_supported

    backend = args.backend or scenario.backend
    try:
        check_supported(scenario)
        if backend == "k3s" and scenario.pipelines != 1:
            raise InputError("the k3s backend deploys one pipeline; pipelines side by side "
                             "run on the embedded backend", file=scenario.path,
                             field="planner.pipelines")
        if backend == "k3s":
            # the loop applies the scenario's control settings; those it cannot are refused
            scenario.control.refuse_unsupported("k3s", K3S_UNSUPPORTED)
    except InputError as exc:
        return str(exc)
    if args.cluster and (backend != "k3s" or args.kubeconfig or args.dry_run):
        return "--cluster emulated goes with --backend k3s, without --kubeconfig or --dry-run"
    if args.cluster and not args.check and os.geteuid() != 0:
        return "--cluster emulated builds a Mininet network and node containers: needs root"
    if backend == "embedded" and not (args.dry_run or args.check) and os.geteuid() != 0:
        return "the embedded backend builds a Mininet network and needs root (sudo)"
    return None


def run_one(scenario: Scenario, out_dir: Path, args: argparse.Namespace) -> int:
    """One scenario that `problem` passed, into `out_dir` (absolute): its exit code."""
    backend = args.backend or scenario.backend
    out_dir.mkdir(parents=True, exist_ok=True)
    from testbed.experiment.run import run_embedded

    try:
        if args.cluster == "emulated":
            from testbed.experiment.k8s_cluster import run_emulated

            return run_emulated(scenario, out_dir, keep=args.keep)
        if backend == "k3s" and not args.dry_run:
            from testbed.experiment.k3s_live import run_k3s

            # no root needed: everything happens through the cluster's API
            return run_k3s(scenario, out_dir, args.kubeconfig, keep=args.keep)
        # only the k3s backend's pods encrypt data hops (the embedded one authenticates them)
        prepared = prepare(scenario, out_dir,
                           encrypted_hops=backend == "k3s" and not args.plaintext)
        if args.dry_run:
            from testbed.experiment.k3s_dry_run import dry_run

            return dry_run(scenario, prepared, out_dir, backend)
        return run_embedded(scenario, prepared, out_dir, plaintext=args.plaintext)
    except (InputError, InfeasibleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as exc:
        log(f"interrupted ({exc}); everything was torn down")
        return exc.exit_code
    except RuntimeError as exc:
        log(f"run failed: {exc}")
        return 1


def main(argv: list[str] | None = None, prog: str = "run_scenario.py",
         results_root: Path = ROOT / "results") -> int:
    """run_scenario.py (and `edgepipe run`, whose default results root is ./results)."""
    args = parse_args(argv, prog)
    from testbed.experiment.batch import run_batch

    return run_batch(args, results_root, lambda s: problem(s, args),
                     lambda s, out_dir: run_one(s, out_dir, args))
