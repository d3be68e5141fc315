"""A CI fault-injection job on real Mininet hosts (root): two short scenarios in one call of
run_scenario.py, with --junit, --summary-md and --baseline. One scenario has an SLO no
pipeline can meet (p99 under 1 ms), the other a baseline no run can match (10,000 rps): the
call must exit 1, and the reports must say which checks failed, with the measured values."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from testbed.emulation.records import list_records
from tests.test_ci_reports import assert_valid_junit

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.root, pytest.mark.slow]

TOPOLOGY = """name: ci-small
defaults:
  host: {cpu: 0.3, memory: 512MiB, disk: 256MiB}
  link: {bandwidth: 100Mbit}
hosts:
  dispatcher: {role: dispatcher, cpu: 0.4, memory: 2GiB}
  edge1: {}
  edge2: {}
  edge3: {}
switches: [s1]
links:
  - {endpoints: [dispatcher, s1], bandwidth: 1Gbit}
  - {endpoints: [edge1, s1]}
  - {endpoints: [edge2, s1]}
  - {endpoints: [edge3, s1]}
"""


def _scenario(directory: Path, name: str, extra: str) -> None:
    (directory / f"{name}.yaml").write_text(
        f"name: {name}\ntopology: ../ci-small.yaml\nmodel: {{zoo: resnet18}}\n"
        "workload: {mode: closed, concurrency: 4, duration: 60s, warmup: 2s}\n" + extra)


def test_two_scenarios_in_one_call_with_reports(tmp_path: Path, state_dir: Path) -> None:
    """`state_dir`: this test's own run records (the call inherits it), so the check that
    nothing is left behind sees no other run of the machine."""
    (tmp_path / "ci-small.yaml").write_text(TOPOLOGY)
    scenarios = tmp_path / "scenarios"
    scenarios.mkdir()
    _scenario(scenarios, "quiet", "slo: {lost: 0, mismatched: 0}\n")
    _scenario(scenarios, "narrowed",
              "steps:\n  - {at: 2s, action: link.bandwidth, target: [edge2, s1],\n"
              "     params: {bandwidth: 20Mbit}, duration: 2s}\n"
              "slo: {lost: 0, mismatched: 0, recover_within: 10s, p99: 1ms}\n")
    baseline = tmp_path / "baseline" / "quiet"
    baseline.mkdir(parents=True)
    baseline.joinpath("summary.json").write_text(json.dumps(
        {"scenario": "quiet", "throughput_rps": 10000.0, "latency_ms": {"p99": 1.0},
         "faults": []}))
    out, junit, markdown = tmp_path / "out", tmp_path / "junit.xml", tmp_path / "summary.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_scenario.py"), str(scenarios), "--duration", "5s",
         "--out", str(out), "--junit", str(junit), "--summary-md", str(markdown),
         "--baseline", str(tmp_path / "baseline")],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 1, result.stdout + result.stderr[-4000:]
    for name in ("quiet", "narrowed"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["scenario"] == name and summary["requests"]["completed"] > 0
        assert summary["window"]["duration_s"] == 5.0          # --duration applied to all
        assert "network" in (out / name / "driver.log").read_text()

    assert_valid_junit(junit.read_text())
    cases = {(c.get("classname"), c.get("name")): c
             for c in ET.parse(junit).getroot().iter("testcase")}
    p99 = json.loads((out / "narrowed" / "summary.json").read_text())["latency_ms"]["p99"]
    failure = cases[("narrowed", "slo latency p99")].find("failure")
    assert failure is not None and f"{p99:.1f} ms" in failure.get("message")
    assert "1.0 ms" in failure.get("message")
    assert cases[("narrowed", "run")].find("failure") is not None
    assert any(name.startswith("slo recover_within link.bandwidth edge2-s1 at 2")
               for (scenario, name) in cases if scenario == "narrowed")
    assert cases[("narrowed", "regression")].find("skipped") is not None   # no baseline
    regression = cases[("quiet", "regression throughput")].find("failure")
    assert regression is not None and "10000.00 rps" in regression.get("message")

    text = markdown.read_text()
    assert "### quiet" in text and "### narrowed" in text
    for name in ("quiet", "narrowed"):
        link = f"(out/{name}/index.html)"
        assert link in text and (out / name / "index.html").is_file()
    assert list_records() == [], "a run left its record (and so its resources) behind"
