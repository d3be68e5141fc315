"""The driver is the experimenter, not part of the system: it checks the input, prepares the
model and the first plan, builds the emulated network, starts agents and the controller in
their hosts, fires the scenario's steps on time, polls progress, collects the records, writes
the results directory and always tears down what it built."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from formats.errors import EXIT_BAD_INPUT, InputError
from partitioner.instance import InfeasibleError
from testbed.experiment.prepare import ROOT, Interrupted, log, on_signal, prepare


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run_scenario.py", description=(
        "Run a scenario on the emulated edge cluster and write a results directory."))
    parser.add_argument("scenario", help="scenario YAML (see scenarios/)")
    parser.add_argument("--out", help="results directory (default results/<scenario name>)")
    parser.add_argument("--backend", choices=("embedded", "k3s"),
                        help="override the scenario's backend")
    parser.add_argument("--dry-run", action="store_true",
                        help="plan and write the deployment (k3s: manifests) without running")
    parser.add_argument("--duration", help="override the workload duration, e.g. 10s")
    parser.add_argument("--kubeconfig", help="k3s: the cluster's kubeconfig (default "
                        "$KUBECONFIG)")
    parser.add_argument("--keep", action="store_true",
                        help="k3s: leave the namespace on the cluster after the run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from formats.scenario import load_scenario, with_duration

    try:
        scenario = load_scenario(args.scenario)
        if args.duration:
            scenario = with_duration(scenario, args.duration)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    backend = args.backend or scenario.backend
    # Absolute: processes in hosts and containers do not share the driver's working directory.
    out_dir = Path(args.out or ROOT / "results" / scenario.name).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    from testbed.experiment.run import run_embedded

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        from testbed.experiment.faults import check_supported

        check_supported(scenario)
        if backend == "k3s" and scenario.pipelines != 1:
            raise InputError("the k3s backend deploys one pipeline; pipelines side by side "
                             "run on the embedded backend", file=scenario.path,
                             field="planner.pipelines")
        if backend == "k3s" and not args.dry_run:
            from testbed.experiment.k3s_live import run_k3s

            # no root needed: everything happens through the cluster's API
            return run_k3s(scenario, out_dir, args.kubeconfig, keep=args.keep)
        if backend == "embedded" and not args.dry_run and os.geteuid() != 0:
            print("error: the embedded backend builds a Mininet network and needs root "
                  "(sudo)", file=sys.stderr)
            return EXIT_BAD_INPUT
        prepared = prepare(scenario, out_dir)
        if args.dry_run:
            from testbed.experiment.k3s_dry_run import dry_run

            return dry_run(scenario, prepared, out_dir, backend)
        return run_embedded(scenario, prepared, out_dir)
    except (InputError, InfeasibleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as exc:
        log(f"interrupted ({exc}); everything was torn down")
        return 1
    except RuntimeError as exc:
        log(f"run failed: {exc}")
        return 1
