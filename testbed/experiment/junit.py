"""JUnit XML of a call of run_scenario.py (`--junit FILE`), in the common Jenkins/Surefire
format that CI systems read (GitLab's `reports: junit`, Jenkins, the GitHub report actions).

Division of labour: a pure function of the call's outcomes (testbed.experiment.outcome);
batch.py writes the file. Layout: one <testsuite> for the call; per scenario (classname = its
name) a test case `run` (the scenario's verdict; an <error> when it broke without results, a
<skipped> when it did not run), one `slo NAME` per SLO check (lost, mismatched, completed,
throughput, latency p99, recover_within per fault, valid run) and, with --baseline, one
`regression NAME` per comparison. A failure's message has the measured value and the bound.
"""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET

from testbed.experiment.outcome import BatchResult, Outcome

# XML 1.0 refuses these even escaped; console output may hold them (terminal colours).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _text(value: str) -> str:
    return _NOT_XML.sub("", value)


def _case(suite: ET.Element, outcome: Outcome, name: str, seconds: float = 0.0) -> ET.Element:
    return ET.SubElement(suite, "testcase", name=name, classname=outcome.name,
                         time=f"{seconds:.3f}")


def _mark(case: ET.Element, kind: str, message: str, kind_type: str = "",
          detail: str = "") -> None:
    element = ET.SubElement(case, kind, message=_text(message))
    if kind_type:
        element.set("type", kind_type)
    if detail:
        element.text = _text(detail)


def _out(case: ET.Element, text: str) -> None:
    ET.SubElement(case, "system-out").text = _text(text)


def _run_case(suite: ET.Element, outcome: Outcome) -> None:
    case = _case(suite, outcome, "run", outcome.wall_s)
    if outcome.exit_code is None:
        _mark(case, "skipped", outcome.skipped or "not run yet")
        return
    if outcome.summary is None:
        if outcome.exit_code != 0:
            _mark(case, "error", outcome.error or f"exit code {outcome.exit_code}", "run",
                  outcome.log_tail)
        _out(case, f"{outcome.scenario_file}: exit code {outcome.exit_code}, "
                   f"no summary.json in {outcome.out_dir}")
        return
    violations = outcome.summary["slo"]["violations"]
    if violations:
        _mark(case, "failure", "SLO failed: " + "; ".join(violations), "slo",
              "\n".join(violations))
    elif outcome.regressed:
        failed = [c.message for c in outcome.comparisons or [] if not c.passed]
        _mark(case, "failure", "regression: " + "; ".join(failed), "regression",
              "\n".join(failed))
    summary = outcome.summary
    _out(case, f"{outcome.scenario_file}: {summary['throughput_rps']:.2f} rps "
               f"(predicted {summary['predicted_throughput_rps']:.2f}), p99 "
               f"{summary['latency_ms']['p99']:.0f} ms; report "
               f"{outcome.out_dir / 'index.html'}")


def _check_cases(suite: ET.Element, outcome: Outcome) -> None:
    for check in outcome.checks:
        case = _case(suite, outcome, f"slo {check.name}")
        if check.passed:
            _out(case, f"measured {check.measured}, bound {check.bound}")
        else:
            _mark(case, "failure", f"{check.message} (measured {check.measured}, "
                                   f"bound {check.bound})", "slo")


def _regression_cases(suite: ET.Element, outcome: Outcome, result: BatchResult) -> None:
    if result.baseline is None or outcome.summary is None:
        return
    if outcome.comparisons is None:
        case = _case(suite, outcome, "regression")
        _mark(case, "skipped", f"no baseline summary of {outcome.name} in {result.baseline}")
        return
    for comparison in outcome.comparisons:
        case = _case(suite, outcome, f"regression {comparison.name}")
        if comparison.passed:
            _out(case, comparison.message)
        else:
            _mark(case, "failure", comparison.message, "regression")


def render_junit(result: BatchResult, hostname: str = "localhost") -> str:
    """The JUnit XML document of a call (a <testsuites> holding one <testsuite>)."""
    suite = ET.Element("testsuite", name="edgepipe")
    properties = ET.SubElement(suite, "properties")
    for name, value in (("duration", result.duration),
                        ("baseline", str(result.baseline) if result.baseline else None),
                        ("tolerance", f"{result.tolerance:.0%}" if result.baseline else None)):
        if value is not None:
            ET.SubElement(properties, "property", name=name, value=value)
    for outcome in result.outcomes:
        _run_case(suite, outcome)
        _check_cases(suite, outcome)
        _regression_cases(suite, outcome, result)
    cases = suite.findall("testcase")
    counts = {kind: sum(1 for c in cases if c.find(kind) is not None)
              for kind in ("failure", "error", "skipped")}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(result.started_unix))
    attributes = {"tests": str(len(cases)), "failures": str(counts["failure"]),
                  "errors": str(counts["error"]), "skipped": str(counts["skipped"]),
                  "time": f"{result.wall_s:.3f}"}
    suite.attrib.update({**attributes, "timestamp": stamp, "hostname": hostname})
    if not len(properties):
        suite.remove(properties)
    root = ET.Element("testsuites", name="edgepipe", **attributes)
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"
