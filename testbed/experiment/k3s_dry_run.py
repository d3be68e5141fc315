"""The k3s backend as the driver sees it, up to the cluster: split the model at the plan's
stage ends, make the deployment's keys, and describe every object (namespace, RBAC, one
pinned Deployment + Service per stage, the controller, its Secret and its inputs, the
workload among them). `dry_run` writes them to OUT/k8s/ (and the controller's inputs to
OUT/controller/, to run the loop outside the cluster); testbed.experiment.k3s_live applies them to a
cluster and runs the scenario there."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from formats.errors import InputError
from formats.scenario import Scenario
from stage_image.security import KeyPair, generate_deployment_keys, save_keypair
from testbed.k8s import manifests as k8s


@dataclass(frozen=True)
class Bundle:
    """One deployment's description. `settings.curve_keys` holds the epoch-1 keys, the
    controller's among them; `driver_keys` is the only client the command port admits."""

    plan_json: dict[str, Any]
    stages: list[k8s.StageModel]
    settings: k8s.K8sSettings
    inputs: k8s.ControllerInputs
    driver_keys: KeyPair | None

    @property
    def controller_public(self) -> str | None:
        keys = self.settings.curve_keys
        return keys["controller"].public.decode() if keys else None

    def manifests(self, plan: Any) -> list[k8s.Manifest]:
        return k8s.manifests(plan, self.stages, self.settings, self.inputs)


def write_plan_and_stages(prepared: Any, out_dir: Path) -> tuple[dict[str, Any], Path]:
    """OUT/plan.json and the model split at the plan's stage ends into OUT/stages/."""
    from partitioner.split import split_model
    from testbed.control.controller import cut_indices
    from testbed.experiment.prepare import log

    plan_json = {**prepared.plan.to_json(), "model": str(prepared.model_path)}
    (out_dir / "plan.json").write_text(json.dumps(plan_json, indent=1))
    stage_dir = out_dir / "stages"
    log(f"splitting into {len(prepared.plan.stages)} stages -> {stage_dir}")
    split_model(prepared.model_path, list(cut_indices(prepared.plan)), stage_dir)
    return plan_json, stage_dir


def make_bundle(scenario: Scenario, prepared: Any, out_dir: Path,
                **overrides: Any) -> Bundle:
    """plan.json and the split stages in OUT, the settings (`overrides` on top), keys and
    controller inputs."""
    from testbed.control.planning import sha256_file
    from testbed.experiment.run import workload_json

    plan_json, stage_dir = write_plan_and_stages(prepared, out_dir)
    try:
        settings = k8s.settings_for_topology(scenario.topology, epoch=1, model_version=1,
                                             **{"heartbeat_ms": scenario.control.heartbeat_ms,
                                                **overrides})
        driver = None
        if settings.curve:
            settings = replace(settings, curve_keys=generate_deployment_keys(
                k8s.endpoint_names(len(prepared.plan.stages))))
            driver = KeyPair.generate()
        inputs = k8s.ControllerInputs(
            instance=json.loads(prepared.instance_path.read_text()),
            model_sha256=sha256_file(prepared.model_path), plan=prepared.plan.to_json(),
            algorithm=scenario.algorithm, time_limit_s=scenario.time_limit_s,
            workload=workload_json(scenario),
            driver_public=driver.public.decode() if driver else None,
            control=scenario.control.to_json())
        bundle = Bundle(plan_json, k8s.load_stage_models(stage_dir), settings, inputs, driver)
        bundle.manifests(prepared.plan)           # refuses what does not fit, here
    except ValueError as exc:
        raise InputError(str(exc), file=scenario.topology.path) from exc
    return bundle


def dry_run(scenario: Scenario, prepared: Any, out_dir: Path, backend: str) -> int:
    from testbed.experiment.prepare import log

    if backend != "k3s":
        write_plan_and_stages(prepared, out_dir)
        log(f"dry run: plan.json and the stage models are in {out_dir}")
        return 0
    bundle = make_bundle(scenario, prepared, out_dir)
    files = k8s.write_manifests(prepared.plan, bundle.stages, bundle.settings, out_dir,
                                bundle.inputs)
    controller_dir = out_dir / "controller"
    controller_dir.mkdir(exist_ok=True)
    for name, text in bundle.inputs.files(bundle.settings).items():
        (controller_dir / name).write_text(text)
    if bundle.driver_keys is not None:
        # the command port's only client: whoever runs the workload by hand needs it
        save_keypair(out_dir / "driver.key", bundle.driver_keys)
    for path in files:
        log(f"wrote {path}")
    log(f"the controller's inputs are in {controller_dir}; it waits for the model "
        f"{prepared.model_path} (sha256 {bundle.inputs.model_sha256[:12]}...) in its volume "
        f"(docs/lab.md)")
    log(f"dry run: apply with `kubectl apply -f {out_dir / 'k8s'}` on the cluster, or run "
        f"`run_scenario.py SCENARIO --backend k3s --kubeconfig PATH`")
    return 0
