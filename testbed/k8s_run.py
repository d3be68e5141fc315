"""The k3s backend as the driver sees it: split the model at the plan's stage ends and write
every manifest (namespace, RBAC, one pinned Deployment + Service per stage, controller) to
OUT/k8s/. Applying them needs a cluster (the lab VM); here the dry run is the boundary."""

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

    plan_json = {**prepared.plan.to_json(), "model": str(prepared.model_path)}
    (out_dir / "plan.json").write_text(json.dumps(plan_json, indent=1))
    stage_dir = out_dir / "stages"
    log(f"splitting into {len(prepared.plan.stages)} stages -> {stage_dir}")
    split_model(prepared.model_path, list(cut_indices(prepared.plan)), stage_dir)
    if backend != "k3s":
        log(f"dry run: plan.json and the stage models are in {out_dir}")
        return 0
    try:
        settings = k8s.settings_for_topology(scenario.topology, epoch=1, model_version=1)
        files = k8s.write_manifests(prepared.plan, k8s.load_stage_models(stage_dir), settings,
                                    out_dir)
    except ValueError as exc:
        raise InputError(str(exc), file=scenario.topology.path) from exc
    for path in files:
        log(f"wrote {path}")
    log(f"dry run: apply with `kubectl apply -f {out_dir / 'k8s'}` on the cluster")
    return 0
