"""The driver is the experimenter, not part of the system: it checks the input, prepares the
model and the first plan, builds the emulated network, starts agents and the controller in
their hosts, fires the scenario's steps on time, polls progress, collects the records, writes
the results directory and always tears down what it built."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from partitioner.instance import InfeasibleError
from testbed.errors import EXIT_BAD_INPUT, InputError

ROOT = Path(__file__).resolve().parent.parent
CONTROL_PORT = 18000
SINK_PORT = 19000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Interrupted(Exception):
    """SIGINT/SIGTERM: stop the run, tear down, exit 1."""


def _on_signal(signum: int, _frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


@dataclass
class Prepared:
    """Everything computed before any network exists (a failure here leaves nothing behind)."""

    model_path: Path
    instance_path: Path
    plan: Any
    predicted_rps: float
    activation_reserve_bytes: int


def prepare(scenario: Any, out_dir: Path) -> Prepared:
    from partitioner.profile import instance_for_topology, profile_model
    from partitioner.replicate import plan_pipelines
    from partitioner.zoo import resolve_model

    log(f"model {scenario.model}: building / loading")
    model_path = resolve_model(scenario.model)
    log("profiling (cached by model SHA-256)")
    profile = profile_model(model_path)
    instance = instance_for_topology(profile, scenario.topology)
    instance_path = out_dir / "instance.json"
    instance_path.write_text(json.dumps(instance.to_json(), indent=1))
    log(f"planning with '{scenario.algorithm}' over {len(instance.nodes)} hosts, "
        f"{len(instance.segments)} segments")
    plan = plan_pipelines(instance, scenario.algorithm, scenario.time_limit_s, 0,
                          scenario.pipelines)
    shape = f" in {len(plan.chains)} pipelines" if plan.chains else ""
    log(f"plan: {len(plan.stages)} stages{shape}, bottleneck {plan.bottleneck_ms:.1f} ms, "
        f"predicted {plan.predicted_throughput_rps:.2f} rps "
        f"({'optimal' if plan.optimal else 'heuristic'})")
    return Prepared(model_path, instance_path, plan, plan.predicted_throughput_rps,
                    profile.activation_reserve_bytes)


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
    from testbed.scenario import load_scenario, with_duration

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
    from testbed.run import run_embedded

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        from testbed.faults import check_supported

        check_supported(scenario)
        if backend == "k3s" and scenario.pipelines != 1:
            raise InputError("the k3s backend deploys one pipeline; pipelines side by side "
                             "run on the embedded backend", file=scenario.path,
                             field="planner.pipelines")
        if backend == "k3s" and not args.dry_run:
            from testbed.k8s_live import run_k3s

            # no root needed: everything happens through the cluster's API
            return run_k3s(scenario, out_dir, args.kubeconfig, keep=args.keep)
        if backend == "embedded" and not args.dry_run and os.geteuid() != 0:
            print("error: the embedded backend builds a Mininet network and needs root "
                  "(sudo)", file=sys.stderr)
            return EXIT_BAD_INPUT
        prepared = prepare(scenario, out_dir)
        if args.dry_run:
            from testbed.k8s_run import dry_run

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
