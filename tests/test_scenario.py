"""Scenario validation: every refusal names the file, the line and the field, and the CLI
exits 2 before any network exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from formats.errors import InputError
from formats.scenario import load_scenario, with_duration

ROOT = Path(__file__).resolve().parent.parent
STAR5 = ROOT / "topologies" / "star-5.yaml"

GOOD = f"""\
name: t
topology: {STAR5}
model: {{zoo: resnet18}}
workload: {{mode: closed, concurrency: 2, duration: 20s, warmup: 2s}}
steps:
  - {{at: 5s, action: node.crash, target: edge2}}
  - {{at: 8s, action: link.bandwidth, target: [edge1, s1], params: {{bandwidth: 10Mbit}},
     duration: 3s}}
slo: {{lost: 0, mismatched: 0, recover_within: 5s}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    return path


def test_good_scenario_loads(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, GOOD))
    assert scenario.workload.duration_s == 20 and scenario.workload.warmup_s == 2
    assert [s.action for s in scenario.steps] == ["node.crash", "link.bandwidth"]
    assert scenario.steps[1].params == {"bandwidth": 10.0}
    assert scenario.steps[1].duration_s == 3
    assert scenario.slo.recover_within_s == 5 and scenario.slo.recover_to == "plan"
    relative = load_scenario(write(tmp_path, GOOD.replace(
        "recover_within: 5s", "recover_within: 5s, recover_to: rate_before")))
    assert relative.slo.recover_to == "rate_before"
    assert scenario.algorithm == "auto" and scenario.backend == "embedded"


@pytest.mark.parametrize("old,new,line,field", [
    ("action: node.crash", "action: node.explode", 6, "steps[0].action"),
    ("target: edge2", "target: edge9", 6, "steps[0].target"),
    ("bandwidth: 10Mbit", "bandwidth: 10furlongs", 7, "steps[1].params.bandwidth"),
    ("at: 5s", "at: 25s", 6, "steps[0].at"),
    ("concurrency: 2", "concurrency: 2, speed: 3", 4, "workload.speed"),
    ("{zoo: resnet18}", "{zoo: resnet19}", 3, "model.zoo"),
    ("recover_within: 5s", "recover_within: soon", 9, "slo.recover_within"),
    ("recover_within: 5s", "recover_within: 5s, recover_to: fast", 9, "slo.recover_to"),
    ("target: [edge1, s1]", "target: [edge1, edge2]", 7, "steps[1].target"),
])
def test_bad_field_names_file_line_field(tmp_path: Path, old: str, new: str, line: int,
                                         field: str) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(InputError) as caught:
        load_scenario(path)
    assert caught.value.file == str(path)
    assert caught.value.line == line
    assert caught.value.field == field


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "colour: blue\n")
    with pytest.raises(InputError) as caught:
        load_scenario(path)
    assert caught.value.field == "colour" and caught.value.line == 10


def test_control_fields(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, GOOD + "control: {straggler_factor: 3, "
                                   "straggler_after: 1500ms, rejoin_hold: 2s}\n"))
    assert scenario.control.given() == {"straggler_factor": 3.0, "straggler_after_s": 1.5,
                                        "rejoin_hold_s": 2.0}
    assert scenario.control.rejoin_margin == 0.10          # the rest are the defaults
    for bad, field in (("straggler_factor: 1", "control.straggler_factor"),
                       ("straggler_after: soon", "control.straggler_after"),
                       ("straggle: 2", "control.straggle")):
        with pytest.raises(InputError) as caught:
            load_scenario(write(tmp_path, GOOD + f"control: {{{bad}}}\n"))
        assert caught.value.field == field and caught.value.line == 10


def test_shorter_duration_refuses_steps_that_no_longer_fit(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, GOOD))
    assert with_duration(scenario, "10s").workload.duration_s == 10
    with pytest.raises(InputError):
        with_duration(scenario, "6s")


def test_cli_exits_2_on_bad_input_before_building_anything(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("target: edge2", "target: nowhere"))
    result = subprocess.run([sys.executable, str(ROOT / "run_scenario.py"), str(path),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"{path}:6: steps[0].target" in result.stderr


def test_shipped_scenarios_load() -> None:
    scenarios = sorted((ROOT / "scenarios").glob("*.yaml"))
    assert scenarios, "no scenarios shipped"
    for path in scenarios:
        load_scenario(path)
