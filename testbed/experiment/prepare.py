"""What every backend's run shares before and around the network: the first plan (computed
before anything is built, so a failure leaves nothing behind), the ports, progress lines and
the interruption signal."""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CONTROL_PORT = 18000
SINK_PORT = 19000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Interrupted(Exception):
    """SIGINT/SIGTERM: stop the run, tear down, exit 1."""


def on_signal(signum: int, _frame: Any) -> None:
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
                          scenario.pipelines, scenario.spare)
    shape = f" in {len(plan.chains)} pipelines" if plan.chains else ""
    log(f"plan: {len(plan.stages)} stages{shape}, bottleneck {plan.bottleneck_ms:.1f} ms, "
        f"predicted {plan.predicted_throughput_rps:.2f} rps "
        f"({'optimal' if plan.optimal else 'heuristic'})")
    return Prepared(model_path, instance_path, plan, plan.predicted_throughput_rps,
                    profile.activation_reserve_bytes)
