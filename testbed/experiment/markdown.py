"""The Markdown summary of a call of run_scenario.py (`--summary-md FILE`, and appended to
$GITHUB_STEP_SUMMARY when set): an overview table of every scenario, then per scenario a
table of its figures (throughput measured / predicted, latency p50 / p99, requests lost /
duplicated / mismatched, against the baseline with --baseline), one of its faults (detection
and recovery, seconds after injection) and what failed, with a link to its index.html.

Division of labour: a pure function of the call's outcomes (testbed.experiment.outcome);
batch.py writes the file. Links are relative to `link_base` (the Markdown file's directory)
when given, so the file works beside an uploaded results directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from testbed.experiment.outcome import BatchResult, Outcome
from testbed.experiment.regression import Comparison
from testbed.experiment.results import fault_label

VERDICTS = {"passed": "✅ passed", "failed": "❌ failed", "regressed": "❌ regressed",
            "error": "💥 error", "skipped": "⏭ skipped", "pending": "⏳ pending"}


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _row(*cells: object) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _table(header: tuple[str, ...], rows: list[tuple[object, ...]]) -> list[str]:
    return [_row(*header), "|" + "---|" * len(header), *(_row(*r) for r in rows)]


def _link(outcome: Outcome, link_base: Path | None) -> str:
    target = outcome.out_dir / "index.html"
    if link_base is not None:
        target = Path(os.path.relpath(target, link_base))
    return f"[index.html]({target.as_posix()})"


def _seconds(total: float) -> str:
    minutes, seconds = divmod(round(total), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _delta(comparison: Comparison | None) -> str:
    if comparison is None or comparison.baseline is None:
        return ""
    change = comparison.change
    text = f"{comparison.baseline:.2f}" + ("" if change is None else f" ({change:+.1%})")
    return text if comparison.passed else f"**{text} REGRESSION**"


def _overview(result: BatchResult, link_base: Path | None) -> list[str]:
    rows = []
    for o in result.outcomes:
        s = o.summary
        if s is None:
            rows.append((o.name, VERDICTS[o.verdict], "-", "-", "-", "-",
                         _seconds(o.wall_s) if o.exit_code is not None else "-"))
            continue
        r, lat = s["requests"], s["latency_ms"]
        rows.append((o.name, VERDICTS[o.verdict],
                     f"{s['throughput_rps']:.2f} / {s['predicted_throughput_rps']:.2f}",
                     f"{lat['p50']:.0f} / {lat['p99']:.0f}",
                     f"{r['lost']} / {r['duplicates']} / {r['mismatched']}",
                     _link(o, link_base), _seconds(o.wall_s)))
    return _table(("scenario", "verdict", "throughput rps (measured / predicted)",
                   "latency ms (p50 / p99)", "lost / dup / mismatched", "report", "wall"),
                  rows)


def _figures(outcome: Outcome) -> list[str]:
    s = outcome.summary
    assert s is not None
    by_name = {c.name: c for c in outcome.comparisons or []}
    baseline = outcome.comparisons is not None
    r, lat = s["requests"], s["latency_ms"]
    rows = [("throughput", f"{s['throughput_rps']:.2f} rps",
             f"{s['predicted_throughput_rps']:.2f} rps predicted "
             f"(ratio {s['throughput_ratio']:.2f})", _delta(by_name.get("throughput"))),
            ("latency p50 / p99", f"{lat['p50']:.0f} / {lat['p99']:.0f} ms", "",
             _delta(by_name.get("latency p99"))),
            ("requests sent / completed", f"{r['sent']} / {r['completed']}", "", ""),
            ("lost / duplicates / mismatched",
             f"{r['lost']} / {r['duplicates']} / {r['mismatched']}", "", "")]
    header = ("", "measured", "predicted", "baseline (change)")
    if not baseline:
        return _table(header[:3], [row[:3] for row in rows])
    return _table(header, rows)


def _faults(outcome: Outcome) -> list[str]:
    assert outcome.summary is not None
    by_name = {c.name: c for c in outcome.comparisons or []}
    checks = {c.name: c for c in outcome.checks}
    rows = []
    for fault in outcome.summary["faults"]:
        label = fault_label(fault)

        def after(key: str, fault: dict = fault) -> str:
            if key not in fault:            # a summary from before the field existed
                return "-"
            value = fault[key]
            return "never" if value is None else f"+{value - fault['at_s']:.2f} s"
        check = checks.get(f"recover_within {label}")
        slo = "" if check is None else ("ok" if check.passed else f"**{check.message}**")
        rows.append((label, after("detected_s"), after("recovered_s"),
                     after("recovered_rel_s"), slo,
                     _delta(by_name.get(f"recovery {label}"))))
    header = ("fault", "detected", "recovered", "back to the rate before",
              "recover_within SLO", "baseline recovery s")
    if outcome.comparisons is None:
        return _table(header[:5], [row[:5] for row in rows])
    return _table(header, rows)


def _section(outcome: Outcome, link_base: Path | None) -> list[str]:
    lines = [f"### {outcome.name}: {VERDICTS[outcome.verdict]}", ""]
    if outcome.exit_code is None:
        return [*lines, f"Not run: {outcome.skipped or 'its turn has not come yet'}", ""]
    if outcome.summary is None:
        detail = outcome.error or f"exit code {outcome.exit_code}"
        return [*lines, f"`{outcome.scenario_file}`: no results ({_cell(detail)}).", ""]
    lines += [f"`{outcome.scenario_file}`, report {_link(outcome, link_base)}", "",
              *_figures(outcome), ""]
    if outcome.summary["faults"]:
        lines += [*_faults(outcome), ""]
    failed = [c.message for c in outcome.checks if not c.passed]
    failed += [c.message for c in outcome.comparisons or [] if not c.passed]
    if failed:
        lines += ["Failed:", *(f"- {_cell(text)}" for text in failed), ""]
    return lines


def render_markdown(result: BatchResult, link_base: Path | None = None) -> str:
    """The whole summary as Markdown text."""
    counts = ", ".join(f"{result.count(v)} {v}" for v in VERDICTS if result.count(v))
    context = [f"wall {_seconds(result.wall_s)}"]
    if result.duration:
        context.append(f"--duration {result.duration}")
    if result.baseline is not None:
        context.append(f"baseline `{result.baseline}` ±{result.tolerance:.0%}")
    lines = [f"## edgepipe: {len(result.outcomes)} scenario"
             f"{'s' if len(result.outcomes) != 1 else ''}: {counts} ({', '.join(context)})",
             "", *_overview(result, link_base), ""]
    for outcome in result.outcomes:
        lines += _section(outcome, link_base)
    return "\n".join(lines)
