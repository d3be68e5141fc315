"""The k3s backend as the driver sees it: split the model at the plan's stage ends and write
every manifest (namespace, RBAC, one pinned Deployment + Service per stage, the controller and
its inputs) to OUT/k8s/, and the controller's inputs also to OUT/controller/ (to run the loop
outside the cluster). Applying them needs a cluster (the lab VM); here the dry run is the
boundary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from testbed.errors import InputError
from testbed.scenario import Scenario


def dry_run(scenario: Scenario, prepared: Any, out_dir: Path, backend: str) -> int:
    from partitioner.split import split_model
    from testbed import k8s
    from testbed.controller import cut_indices
    from testbed.driver import log
    from testbed.planning import sha256_file

    plan_json = {**prepared.plan.to_json(), "model": str(prepared.model_path)}
    (out_dir / "plan.json").write_text(json.dumps(plan_json, indent=1))
    stage_dir = out_dir / "stages"
    log(f"splitting into {len(prepared.plan.stages)} stages -> {stage_dir}")
    split_model(prepared.model_path, list(cut_indices(prepared.plan)), stage_dir)
    if backend != "k3s":
        log(f"dry run: plan.json and the stage models are in {out_dir}")
        return 0
    inputs = k8s.ControllerInputs(
        instance=json.loads(prepared.instance_path.read_text()),
        model_sha256=sha256_file(prepared.model_path), plan=prepared.plan.to_json(),
        algorithm=scenario.algorithm, time_limit_s=scenario.time_limit_s)
    try:
        settings = k8s.settings_for_topology(scenario.topology, epoch=1, model_version=1)
        files = k8s.write_manifests(prepared.plan, k8s.load_stage_models(stage_dir), settings,
                                    out_dir, inputs)
        controller_dir = out_dir / "controller"
        controller_dir.mkdir(exist_ok=True)
        for name, text in inputs.files(settings).items():
            (controller_dir / name).write_text(text)
    except ValueError as exc:
        raise InputError(str(exc), file=scenario.topology.path) from exc
    for path in files:
        log(f"wrote {path}")
    log(f"the controller's inputs are in {controller_dir}; it waits for the model "
        f"{prepared.model_path} (sha256 {inputs.model_sha256[:12]}...) in its volume "
        f"(docs/lab.md)")
    log(f"dry run: apply with `kubectl apply -f {out_dir / 'k8s'}` on the cluster")
    return 0
