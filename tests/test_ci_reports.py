"""CI reports without root: JUnit XML (valid for the Jenkins/Surefire schema in
tests/junit.xsd), the Markdown summary and the baseline comparisons, as pure functions of
summaries that testbed.experiment.results computes from request records; and a call of
run_scenario.py over many files refusing every bad one before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from lxml import etree

from formats.errors import InputError
from formats.scenario import Scenario, load_scenario, with_duration
from testbed.experiment.junit import render_junit
from testbed.experiment.markdown import render_markdown
from testbed.experiment.outcome import BatchResult, Outcome
from testbed.experiment.regression import compare, find_baseline
from testbed.experiment.results import RequestRecord, slo_checks, summarise

ROOT = Path(__file__).resolve().parent.parent
XSD = Path(__file__).resolve().parent / "junit.xsd"
T0 = 1_000_000.0


def assert_valid_junit(text: str) -> None:
    schema = etree.XMLSchema(etree.parse(str(XSD)))
    document = etree.fromstring(text.encode())
    assert schema.validate(document), schema.error_log


def run_summary(scenario: Scenario, rate: int, latency_s: float = 0.1,
                outage: tuple[float, float] | None = None, lost: int = 0) -> dict:
    """summary.json of a run serving `rate` requests a second, none during `outage` (from
    the scenario's first step), with `lost` requests never answered."""
    duration = int(scenario.workload.duration_s)
    records, events = [], []
    for i in range(rate * duration):
        done = T0 + (i + 0.5) / rate
        if outage and outage[0] <= done - T0 < outage[1]:
            continue
        records.append(RequestRecord(i, done - latency_s, done, "completed", False, 1, 1, 1))
    for i in range(lost):
        records.append(RequestRecord(10**6 + i, T0 + 1, None, "lost", False, 1, 1, 1))
    for step in scenario.steps:
        events.append({"t": T0 + step.at_s, "type": "fault.injected", "action": step.action,
                       "target": step.target, "late_ms": 3.0})
        if isinstance(step.target, str):
            events.append({"t": T0 + step.at_s + 0.6, "type": "node.suspected",
                           "host": step.target})
    return summarise(scenario, "embedded", records, events, T0, float(rate), 0)


def outcome(scenario: Scenario, summary: dict | None, exit_code: int | None,
            baseline: dict | None = None, **extra: object) -> Outcome:
    result = Outcome(scenario.name, scenario.path, Path("/r") / scenario.name,
                     exit_code=exit_code, wall_s=42.0, summary=summary, **extra)
    if summary is not None:
        result.checks = slo_checks(scenario.slo, summary)
        if baseline is not None:
            result.comparisons = compare(summary, baseline)
    return result


@pytest.fixture(scope="module")
def node_failure() -> Scenario:
    return with_duration(load_scenario(ROOT / "scenarios" / "node_failure.yaml"), "30s")


def test_junit_has_a_case_per_scenario_and_check_and_is_schema_valid(
        node_failure: Scenario) -> None:
    quick = run_summary(node_failure, 10, outage=(10, 12))          # back at 13 s: passes
    slow = run_summary(node_failure, 10, outage=(10, 25), lost=2)   # lost 2, back at 26 s
    baseline = run_summary(node_failure, 10, outage=(10, 12))
    outcomes = [
        outcome(node_failure, quick, 0, baseline),
        outcome(node_failure, slow, 1, baseline),
        outcome(node_failure, None, 1, error="[10:00:00] run failed: deployment failed",
                log_tail="a\x1b[0m line\nrun failed: deployment failed"),
        outcome(node_failure, None, None, skipped="the call was interrupted (SIGINT)"),
    ]
    for index, item in enumerate(outcomes):     # four distinct scenarios of one call
        item.name = f"{item.name}-{index}"
    result = BatchResult(outcomes, T0, wall_s=170.0, duration="30s", baseline=Path("/b"))
    text = render_junit(result, "ci-host")
    assert_valid_junit(text)
    suite = ET.fromstring(text).find("testsuite")
    cases = {(c.get("classname"), c.get("name")): c for c in suite.iter("testcase")}
    assert int(suite.get("tests")) == len(cases)
    assert int(suite.get("failures")) == sum(c.find("failure") is not None
                                             for c in cases.values())
    assert suite.get("errors") == "1" and suite.get("skipped") == "1"

    passed = "node-failure-0"
    assert all(c.find("failure") is None for (name, _), c in cases.items() if name == passed)
    assert {n for (s, n) in cases if s == passed} >= {
        "run", "slo lost", "slo mismatched", "slo recover_within node.crash edge2 at 10s",
        "regression throughput", "regression latency p99",
        "regression recovery node.crash edge2 at 10s"}
    failed = "node-failure-1"
    lost = cases[(failed, "slo lost")].find("failure").get("message")
    assert "lost 2 > 0" in lost and "bound <= 0" in lost
    recovery = slow["faults"][0]["recovered_s"] - slow["faults"][0]["at_s"]
    message = cases[(failed, "slo recover_within node.crash edge2 at 10s")] \
        .find("failure").get("message")
    assert f"{recovery:.2f}s" in message and "<= 10s" in message
    regression = cases[(failed, "regression recovery node.crash edge2 at 10s")]
    assert "REGRESSION" in regression.find("failure").get("message")
    assert cases[(failed, "run")].find("failure").get("type") == "slo"
    error = cases[("node-failure-2", "run")].find("error")
    assert "deployment failed" in error.get("message") and "\x1b" not in error.text
    assert cases[("node-failure-3", "run")].find("skipped") is not None


def test_baseline_gates_throughput_p99_and_recovery(node_failure: Scenario) -> None:
    baseline = run_summary(node_failure, 10, latency_s=0.2, outage=(10, 12))
    by_name = {c.name: c for c in compare(baseline, baseline)}
    assert all(c.passed for c in by_name.values()) and len(by_name) == 3
    recovery = "recovery node.crash edge2 at 10s"
    slower = run_summary(node_failure, 8, latency_s=0.25, outage=(10, 16))
    worse = {c.name: c for c in compare(slower, baseline)}
    assert not worse["throughput"].passed                 # 6.4 rps < 9.33 x 0.9
    assert not worse["latency p99"].passed                # 250 > 200 x 1.1
    assert not worse[recovery].passed                     # 7 s > 3 s + one bucket
    assert worse["throughput"].change == pytest.approx(
        slower["throughput_rps"] / baseline["throughput_rps"] - 1)
    near = {c.name: c for c in compare(run_summary(node_failure, 10, latency_s=0.21,
                                                   outage=(10, 13)), baseline)}
    assert near["latency p99"].passed and near[recovery].passed    # +5%, one bucket later
    never = compare(run_summary(node_failure, 10, outage=(10, 30)), baseline)
    assert "never" in next(c for c in never if c.name == recovery).message
    assert compare(baseline, baseline, tolerance=0.0)[0].passed


def test_baseline_directories(tmp_path: Path, node_failure: Scenario) -> None:
    summary = run_summary(node_failure, 10)
    (tmp_path / "node-failure").mkdir()
    (tmp_path / "node-failure" / "summary.json").write_text(json.dumps(summary))
    assert find_baseline(tmp_path, "node-failure")["throughput_rps"] == 10.0
    assert find_baseline(tmp_path, "baseline") is None
    single = tmp_path / "single"
    single.mkdir()
    (single / "summary.json").write_text(json.dumps(summary))     # a one-scenario --out
    assert find_baseline(single, "node-failure") is not None
    (tmp_path / "baseline").mkdir()
    (tmp_path / "baseline" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(InputError, match="of scenario 'node-failure', not 'baseline'"):
        find_baseline(tmp_path, "baseline")
    (tmp_path / "baseline" / "summary.json").write_text("{not json")
    with pytest.raises(InputError, match="--baseline"):
        find_baseline(tmp_path, "baseline")
    with pytest.raises(InputError, match="no such directory"):
        find_baseline(tmp_path / "missing", "baseline")


def test_markdown_tables_and_links(node_failure: Scenario) -> None:
    partition = load_scenario(ROOT / "scenarios" / "network_partition.yaml")
    ok = run_summary(node_failure, 10, outage=(10, 12))
    split = run_summary(partition, 10, outage=(10, 60))        # never back
    result = BatchResult([outcome(node_failure, ok, 0, ok), outcome(partition, split, 1)],
                         T0, wall_s=125.0, baseline=Path("base"))
    text = render_markdown(result, Path("/r/reports"))
    assert "## edgepipe: 2 scenarios: 1 passed, 1 failed (wall 2m05s" in text
    assert f"| node-failure | ✅ passed | {ok['throughput_rps']:.2f} / 10.00 |" in text
    assert "[index.html](../node-failure/index.html)" in text
    assert "### network-partition: ❌ failed" in text
    # a partition's label holds '|': escaped, so the table keeps its columns
    row = next(line for line in text.splitlines()
               if line.startswith("| link.partition"))
    assert "edge1,edge2\\|dispatcher" in row and "| never | never | never |" in row
    # fault, detected, recovered (to the plan, to the rate before), SLO: 5 cells
    assert row.count(" | ") == 4
    ok_row = next(line for line in text.splitlines() if line.startswith("| node.crash"))
    assert ok_row.count(" | ") == 5 and "never" not in ok_row     # and the baseline's
    assert "- link.partition at 10.0s never recovered" in text


def _scenario_file(directory: Path, stem: str, replace: tuple[str, str] = ("", "")) -> Path:
    text = (ROOT / "scenarios" / "node_failure.yaml").read_text()
    text = text.replace("../topologies/", f"{ROOT}/topologies/").replace(*replace)
    path = directory / f"{stem}.yaml"
    path.write_text(text)
    return path


def _call(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "run_scenario.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_bad_files_anywhere_refuse_the_whole_call(tmp_path: Path) -> None:
    scenarios = tmp_path / "scenarios"
    scenarios.mkdir()
    _scenario_file(scenarios, "a_good")
    _scenario_file(scenarios, "b_bad_action", ("action: node.crash", "action: node.explode"))
    _scenario_file(scenarios, "c_same_name")
    out = tmp_path / "out"
    result = _call(scenarios, "--out", out, "--dry-run", "--junit", tmp_path / "j.xml")
    assert result.returncode == 2
    assert f"{scenarios / 'b_bad_action.yaml'}:13: steps[0].action: unknown action " \
           "'node.explode'" in result.stderr
    assert f"{scenarios / 'c_same_name.yaml'}:6: name: scenario name 'node-failure'" \
        in result.stderr
    assert "2 of 3 scenario files refused; nothing ran" in result.stderr
    assert not out.exists() and not (tmp_path / "j.xml").exists()
    short = _call(scenarios / "a_good.yaml", ROOT / "scenarios" / "model_update.yaml",
                  "--duration", "15s", "--check")
    assert short.returncode == 2 and "model_update.yaml:12: at: step model.update at 20s " \
        "does not fit in --duration 15s" in short.stderr
    assert "node_failure" not in short.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _call(empty, "--check").returncode == 2
    assert _call(scenarios / "a_good.yaml", "--check", "--baseline",
                 tmp_path / "nowhere").returncode == 2
    assert _call(scenarios / "a_good.yaml", "--check", "--tolerance", "ten").returncode == 2


def test_one_file_keeps_out_as_its_results_directory(tmp_path: Path) -> None:
    """One scenario file: --out is the results directory itself, as before this change;
    in a GitHub Actions job the Markdown summary is appended to the step's summary."""
    scenario = _scenario_file(tmp_path, "nf")
    out = tmp_path / "out"
    step_summary = tmp_path / "step.md"
    step_summary.write_text("earlier step\n")
    result = _call(scenario, "--out", out, "--dry-run", "--junit", tmp_path / "j.xml",
                   env={"GITHUB_STEP_SUMMARY": str(step_summary)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "plan.json").is_file() and not (out / "node-failure").exists()
    assert "scenario files" not in result.stdout + result.stderr   # no batch table
    text = (tmp_path / "j.xml").read_text()
    assert_valid_junit(text)
    (case,) = ET.fromstring(text).iter("testcase")          # no summary: only the run
    assert case.get("classname") == "node-failure" and len(case.findall("failure")) == 0
    assert step_summary.read_text().startswith("earlier step\n## edgepipe: 1 scenario: "
                                               "1 passed")
