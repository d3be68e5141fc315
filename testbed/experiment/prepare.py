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


class Interrupted(BaseException):
    """SIGINT/SIGTERM: stop the run, tear down, exit 128 + the signal's number (130 / 143,
    what shells expect of a program a signal ended). A BaseException, as KeyboardInterrupt
    is: the `except Exception` around library calls (onnx, onnxruntime) must not swallow
    it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(signal.Signals(signum).name)


def on_signal(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


@dataclass
class Prepared:
    """Everything computed before any network exists (a failure here leaves nothing behind)."""

    model_path: Path
    instance_path: Path
    plan: Any
    predicted_rps: float
    activation_reserve_bytes: int


# CPU that CurveZMQ adds per MB a stage receives or sends (decrypting and encrypting), over
# plaintext ZeroMQ: benchmarks/curve_cost.py measured 0.4-1.2 ms per MB and side on the
# 2-core machine (run to run, under load); benchmarks/frame_overhead.py --auth curve vs
# plain, quiet machine: +0.67 ms a frame for a stage receiving and sending 600 KB (1.1 ms per
# MB), +0.35 for one receiving 600 KB. Only where data hops are encrypted: the k3s backend's
# pods. The embedded backend authenticates its hops by token and sends frames in the clear
# (stage_image.security), which costs what plaintext does (frame_overhead.py --auth token).
CURVE_MS_PER_MB = 1.0


def with_curve_cost(instance: Any) -> Any:
    """`instance` with each stage's per-frame overhead raised by what encrypting its traffic
    costs: a stage decrypts what crosses the cut before it and encrypts what crosses the one
    after it, taken at the mean size of a cut (the overhead is one figure per stage)."""
    from dataclasses import replace

    cuts = [instance.input_bytes, *(s.output_bytes for s in instance.segments)]
    stage_mb = 2 * sum(cuts) / len(cuts) / 2**20
    return replace(instance,
                   frame_overhead_ms=instance.frame_overhead_ms + CURVE_MS_PER_MB * stage_mb)


def prepare(scenario: Any, out_dir: Path, encrypted_hops: bool = True) -> Prepared:
    """The model, its profile, the planner instance (with CurveZMQ's cost when the data hops
    are encrypted) and the first plan."""
    from partitioner.profile import instance_for_topology, profile_model
    from partitioner.replicate import plan_pipelines
    from partitioner.zoo import resolve_model

    log(f"model {scenario.model}: building / loading")
    model_path = resolve_model(scenario.model)
    log("profiling (cached by model SHA-256)")
    profile = profile_model(model_path, input_shapes=scenario.input_shapes or None)
    instance = instance_for_topology(profile, scenario.topology)
    if encrypted_hops:
        instance = with_curve_cost(instance)
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
