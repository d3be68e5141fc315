"""Regression gates: a run's summary.json against a stored earlier one of the same scenario.

Division of labour: this module finds the baseline summary (`--baseline DIR`) and compares;
testbed.experiment.batch decides what a failed comparison does to the exit code, and
junit.py / markdown.py show the comparisons. Pure functions on summaries.

Checks: throughput may not drop, latency p99 and each fault's recovery time may not grow, by
more than the tolerance (a fraction: 0.1 = 10%). Recovery times are read at the resolution of
the 1 s throughput buckets (`recovered_s` is the end of the first bucket back at 90%), so a
recovery may also be one bucket later than the baseline's before it counts as a regression.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from formats.errors import InputError
from testbed.experiment.results import fault_label

DEFAULT_TOLERANCE = 0.10
RECOVERY_RESOLUTION_S = 1.0


@dataclass(frozen=True)
class Comparison:
    """One metric of a run against its baseline. `limit` is the value the run had to stay
    above (throughput) or below (latency, recovery); None where the baseline gives no bound
    (it never recovered, or measured nothing)."""

    name: str                   # throughput, latency p99, recovery node.crash edge2 at 10s
    unit: str                   # rps, ms, s
    baseline: float | None
    current: float | None
    limit: float | None
    passed: bool

    @property
    def change(self) -> float | None:
        """Relative change from the baseline (+0.05 = 5% more), None when not comparable."""
        if self.baseline in (None, 0) or self.current is None:
            return None
        return (self.current - self.baseline) / self.baseline

    @property
    def message(self) -> str:
        def value(v: float | None) -> str:
            return "never" if v is None else f"{v:.2f} {self.unit}"
        if self.limit is None:
            return f"{self.name}: {value(self.current)} (baseline {value(self.baseline)}: " \
                   "no bound)"
        relation = ">=" if self.name == "throughput" else "<="
        verdict = "ok" if self.passed else "REGRESSION"
        return (f"{self.name}: {value(self.current)}, baseline {value(self.baseline)}, "
                f"must be {relation} {self.limit:.2f} {self.unit}: {verdict}")


def find_baseline(directory: Path, scenario: str) -> dict[str, Any] | None:
    """The stored summary of `scenario` in a baseline directory: DIR/<scenario>/summary.json
    (a multi-scenario --out) or DIR/summary.json when it is that scenario's (a one-scenario
    --out); None when DIR has none. A summary that cannot be read is bad input."""
    if not directory.is_dir():
        raise InputError("no such directory", field="--baseline", file=directory)
    for path in (directory / scenario / "summary.json", directory / "summary.json"):
        if not path.is_file():
            continue
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read a baseline summary: {exc}", file=path,
                             field="--baseline") from exc
        if not isinstance(summary, dict) or "throughput_rps" not in summary:
            raise InputError("not a summary.json (no throughput_rps)", file=path,
                             field="--baseline")
        if summary.get("scenario") == scenario:
            return summary
        if path.parent.name == scenario:
            raise InputError(f"this baseline is of scenario {summary.get('scenario')!r}, "
                             f"not {scenario!r}", file=path, field="--baseline")
    return None


def _recovery(fault: dict[str, Any]) -> float | None:
    if fault.get("recovered_s") is None:
        return None
    return float(fault["recovered_s"]) - float(fault["at_s"])


def _keyed_faults(summary: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Faults by (action, target, n-th of that kind): the same step in both runs, whatever
    the small differences of their injection times."""
    keyed: dict[tuple[str, str, int], dict[str, Any]] = {}
    for fault in summary.get("faults", []):
        kind = (fault["action"], json.dumps(fault.get("target")))
        index = sum(1 for key in keyed if key[:2] == kind)
        keyed[(*kind, index)] = fault
    return keyed


def compare(current: dict[str, Any], baseline: dict[str, Any],
            tolerance: float = DEFAULT_TOLERANCE) -> list[Comparison]:
    """Throughput, p99 and every fault's recovery of `current` against `baseline`."""
    comparisons = []
    base_rps, rps = float(baseline["throughput_rps"]), float(current["throughput_rps"])
    floor = base_rps * (1 - tolerance) if base_rps > 0 else None
    comparisons.append(Comparison("throughput", "rps", base_rps, rps, floor,
                                  floor is None or rps >= floor))
    base_p99 = float(baseline["latency_ms"]["p99"])
    p99 = float(current["latency_ms"]["p99"])
    ceiling = base_p99 * (1 + tolerance) if base_p99 > 0 else None
    comparisons.append(Comparison("latency p99", "ms", base_p99, p99, ceiling,
                                  ceiling is None or p99 <= ceiling))
    base_faults = _keyed_faults(baseline)
    for key, fault in _keyed_faults(current).items():
        if key not in base_faults:
            continue            # a step the baseline did not have: nothing to compare with
        before, now = _recovery(base_faults[key]), _recovery(fault)
        limit = None if before is None else max(before * (1 + tolerance),
                                                before + RECOVERY_RESOLUTION_S)
        passed = limit is None or (now is not None and now <= limit)
        comparisons.append(Comparison(f"recovery {fault_label(fault)}", "s", before, now,
                                      limit, passed))
    return comparisons
