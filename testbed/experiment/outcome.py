"""What a call of run_scenario.py over one or more scenarios produced, as plain records: per
scenario its exit code, summary, SLO checks and baseline comparisons. testbed.experiment.batch
fills them in; junit.py and markdown.py render them (pure functions, testable without root).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.experiment.regression import Comparison
from testbed.experiment.results import SloCheck


@dataclass
class Outcome:
    """One scenario of the call. `exit_code` None: it has not run (yet: the reports are
    rewritten after each scenario), or will not (`skipped` says why)."""

    name: str
    scenario_file: Path
    out_dir: Path
    exit_code: int | None = None
    wall_s: float = 0.0
    summary: dict[str, Any] | None = None
    checks: list[SloCheck] = field(default_factory=list)
    comparisons: list[Comparison] | None = None     # None: no baseline given or found
    error: str = ""             # why a run that broke wrote no summary
    log_tail: str = ""          # the end of its console output (multi-scenario calls)
    skipped: str = ""

    @property
    def regressed(self) -> bool:
        return any(not c.passed for c in self.comparisons or [])

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and not self.regressed

    @property
    def verdict(self) -> str:
        if self.exit_code is None:
            return "skipped" if self.skipped else "pending"
        if self.summary is None:
            return "passed" if self.exit_code == 0 else "error"
        if not self.summary["slo"]["passed"]:
            return "failed"
        return "regressed" if self.regressed else "passed"


@dataclass
class BatchResult:
    """The whole call: its outcomes in run order and what applied to all of them."""

    outcomes: list[Outcome]
    started_unix: float
    wall_s: float = 0.0
    duration: str | None = None         # --duration, if given
    baseline: Path | None = None
    tolerance: float = 0.10

    def count(self, verdict: str) -> int:
        return sum(1 for o in self.outcomes if o.verdict == verdict)
