"""One call of run_scenario.py over one or more scenarios (files, or directories of them), as a
CI fault-injection job runs it.

Division of labour: the driver owns one run (`run(scenario, out_dir) -> exit code`) and the
checks that refuse a scenario before anything is built (`problem(scenario)`); this module
reads and checks *every* file first (any bad input: exit 2 and nothing runs), then runs the
scenarios one after the other, each with its own network, and turns their results into the
outcome records that junit.py, markdown.py and regression.py work on. With several scenarios
each one's results go to OUT/<scenario name>/ with its console output as driver.log, and the
reports are rewritten after every scenario, so a job killed half-way still publishes what
ran. One scenario file behaves as a plain run_scenario.py call always did (OUT is its
results directory), plus the reports asked for.

Exit code: 0 every scenario passed (SLOs and baseline), 1 one failed or broke, 2 bad input
(before anything ran, or a scenario refused at its turn, e.g. an infeasible plan); an
interrupted call stops at once with the interrupted run's code.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from formats.errors import EXIT_BAD_INPUT, InputError
from formats.scenario import Scenario, load_scenario, with_duration
from testbed.experiment.junit import render_junit
from testbed.experiment.markdown import render_markdown
from testbed.experiment.outcome import BatchResult, Outcome
from testbed.experiment.prepare import Interrupted, log, on_signal
from testbed.experiment.regression import compare, find_baseline
from testbed.experiment.results import slo_checks

SCENARIO_SUFFIXES = (".yaml", ".yml")
LOG_TAIL_LINES = 40


def scenario_files(paths: list[str]) -> tuple[list[Path], bool]:
    """The scenario files named (a directory: its *.yaml / *.yml files, sorted), and whether
    this is a multi-scenario call (more than one path, or any directory)."""
    files = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in SCENARIO_SUFFIXES)
            if not found:
                raise InputError("no scenario files (*.yaml) in this directory", file=path)
            files += found
        else:
            files.append(path)      # load_scenario says what is wrong with it, if anything
    return files, len(paths) > 1 or any(Path(p).is_dir() for p in paths)


class _Tee(io.TextIOBase):
    """Console output passed through unchanged and also kept (a run's driver.log)."""

    def __init__(self, console: TextIO, copy: TextIO) -> None:
        self.console, self.copy = console, copy

    def write(self, text: str) -> int:
        self.console.write(text)
        self.copy.write(text)
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        self.copy.flush()


@contextlib.contextmanager
def _captured(copy: TextIO) -> Iterator[None]:
    with contextlib.redirect_stdout(_Tee(sys.stdout, copy)), \
            contextlib.redirect_stderr(_Tee(sys.stderr, copy)):
        yield


class _SignalLatch:
    """SIGINT/SIGTERM interrupt the run in progress as before (prepare.on_signal) and are
    remembered, so the call stops instead of starting the next scenario."""

    def __init__(self) -> None:
        self.received: int | None = None
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGINT, self)

    def __call__(self, signum: int, frame: Any) -> None:
        self.received = signum
        on_signal(signum, frame)


def _why_broken(console: str, exit_code: int) -> str:
    """The driver's last word on a run that wrote no summary."""
    for line in reversed(console.splitlines()):
        if any(mark in line for mark in ("run failed:", "error:", "interrupted", "Error:")):
            return line.strip()
    return f"exit code {exit_code}"


def _read_summary(out_dir: Path, since: float) -> dict[str, Any] | None:
    """This run's summary.json (not one an earlier run left in the same directory)."""
    path = out_dir / "summary.json"
    try:
        if path.stat().st_mtime < since:
            return None
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) else None


def _line_of_name(path: Path) -> int | None:
    """The line of a scenario file's top-level `name:` (the Scenario does not keep it)."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("name:"):
            return number
    return None


def _load_all(files: list[Path], args: argparse.Namespace,
              problem: Callable[[Scenario], str | None]) -> tuple[list[Scenario], list[str]]:
    """Every scenario read and checked; the errors of all of them, not just the first."""
    scenarios, errors = [], []
    for path in files:
        try:
            scenario = load_scenario(path)
            if args.duration:
                scenario = with_duration(scenario, args.duration)
        except InputError as exc:
            errors.append(str(exc))
            continue
        refused = problem(scenario)
        if refused:
            errors.append(refused)
            continue
        scenarios.append(scenario)
    names: dict[str, Path] = {}
    for scenario in scenarios:
        if scenario.name in names:
            errors.append(str(InputError(
                f"scenario name {scenario.name!r} is also the name of {names[scenario.name]}: "
                "their results would share OUT/<scenario name>/", file=scenario.path,
                line=_line_of_name(scenario.path), field="name")))
        names.setdefault(scenario.name, scenario.path)
    return scenarios, errors


def _write_reports(result: BatchResult, args: argparse.Namespace) -> None:
    if args.junit:
        path = Path(args.junit)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_junit(result, socket.gethostname()))
    if args.summary_md:
        path = Path(args.summary_md)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_markdown(result, path.resolve().parent))


def _print_table(result: BatchResult) -> None:
    print(f"\n{'scenario':<22} {'verdict':<9} {'exit':>4} {'rps':>6} {'pred':>6} "
          f"{'p99 ms':>7} {'lost':>5} {'dup':>4} {'mism':>5} {'wall s':>7}")
    for o in result.outcomes:
        s = o.summary
        code = "-" if o.exit_code is None else o.exit_code
        if s is None:
            print(f"{o.name:<22} {o.verdict:<9} {code:>4}  {o.error or o.skipped}")
            continue
        r = s["requests"]
        print(f"{o.name:<22} {o.verdict:<9} {code:>4} {s['throughput_rps']:>6.2f} "
              f"{s['predicted_throughput_rps']:>6.2f} {s['latency_ms']['p99']:>7.0f} "
              f"{r['lost']:>5} {r['duplicates']:>4} {r['mismatched']:>5} {o.wall_s:>7.1f}")
    print(f"{len(result.outcomes)} scenarios in {result.wall_s:.0f} s: {result.count('passed')} "
          f"passed, {len(result.outcomes) - result.count('passed')} not")


def _run_into(outcome: Outcome, scenario: Scenario, run: Callable[[Scenario, Path], int],
              several: bool, latch: _SignalLatch) -> None:
    """One run, its console output kept (and, with several scenarios, its driver.log)."""
    outcome.out_dir.mkdir(parents=True, exist_ok=True)
    console = io.StringIO()
    with contextlib.ExitStack() as stack:
        copy: TextIO = console
        if several:
            copy = _Tee(stack.enter_context((outcome.out_dir / "driver.log").open("w")),
                        console)
        stack.enter_context(_captured(copy))
        started = time.time()
        try:
            outcome.exit_code = run(scenario, outcome.out_dir)
        except Interrupted:
            raise
        except Exception:
            if latch.received is not None:
                # the signal hit inside an import or a library that wrapped it (e.g.
                # "ImportError: initialization failed"): an interruption, not a bug
                raise Interrupted(latch.received) from None
            # A bug of ours in one run (its network is torn down by then) must not cost
            # the other scenarios their runs, nor the call its reports.
            traceback.print_exc()
            outcome.exit_code = 1
    outcome.wall_s = time.time() - started
    outcome.summary = _read_summary(outcome.out_dir, started)
    if outcome.summary is None:
        text = console.getvalue()
        outcome.error = "" if outcome.exit_code == 0 else _why_broken(text, outcome.exit_code)
        outcome.log_tail = "\n".join(text.splitlines()[-LOG_TAIL_LINES:])


def _combined(outcomes: list[Outcome]) -> int:
    codes = [o.exit_code for o in outcomes if o.exit_code is not None]
    codes += [1 for o in outcomes if o.exit_code == 0 and o.regressed]
    return max(codes, default=0)


def run_batch(args: argparse.Namespace, results_root: Path,
              problem: Callable[[Scenario], str | None],
              run: Callable[[Scenario, Path], int]) -> int:
    """The call (module docstring). `args`: run_scenario.py's parsed arguments."""
    started = time.time()
    try:
        files, several = scenario_files(args.scenario)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    scenarios, errors = _load_all(files, args, problem)
    baselines: dict[str, dict[str, Any] | None] = {}
    if args.baseline and not errors:
        try:
            baselines = {s.name: find_baseline(Path(args.baseline), s.name) for s in scenarios}
        except InputError as exc:
            errors.append(str(exc))
    if errors:
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        if several:
            print(f"error: {len(errors)} of {len(files)} scenario files refused; nothing ran",
                  file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.check:
        print(f"{len(scenarios)} scenario file{'s' if len(scenarios) != 1 else ''} checked: "
              + ", ".join(s.name for s in scenarios))
        return 0

    def out_dir_of(scenario: Scenario) -> Path:
        # Absolute: processes in hosts and containers do not share our working directory.
        if several:
            return (Path(args.out or results_root) / scenario.name).resolve()
        return Path(args.out or results_root / scenario.name).resolve()

    result = BatchResult([Outcome(s.name, s.path, out_dir_of(s)) for s in scenarios], started,
                         duration=args.duration,
                         baseline=Path(args.baseline) if args.baseline else None,
                         tolerance=args.tolerance)
    latch = _SignalLatch()
    interrupted_code: int | None = None
    try:
        for index, (scenario, outcome) in enumerate(zip(scenarios, result.outcomes)):
            if several:
                log(f"== scenario {index + 1}/{len(scenarios)}: {scenario.name} "
                    f"({scenario.path}) -> {outcome.out_dir}")
            _run_into(outcome, scenario, run, several, latch)
            if outcome.summary is not None:
                outcome.checks = slo_checks(scenario.slo, outcome.summary)
                baseline = baselines.get(scenario.name)
                if baseline is not None:
                    outcome.comparisons = compare(outcome.summary, baseline, args.tolerance)
                    for comparison in outcome.comparisons:
                        if not comparison.passed:
                            print(f"regression: {scenario.name}: {comparison.message}")
            result.wall_s = time.time() - started
            _write_reports(result, args)
            if latch.received is not None:
                interrupted_code = 128 + latch.received
                break
    except Interrupted as exc:
        # Between two runs, or out of a run that did not catch it (its teardown ran on the
        # way out): nothing of ours is up.
        log(f"interrupted ({exc}); nothing of this call is left running")
        interrupted_code = exc.exit_code
    if latch.received is not None:
        name = signal.Signals(latch.received).name
        for outcome in result.outcomes:
            if outcome.exit_code is None:
                outcome.skipped = f"the call was interrupted ({name})"
    result.wall_s = time.time() - started
    _write_reports(result, args)
    if several:
        _print_table(result)
    summary_path = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_path:
        with open(summary_path, "a") as handle:
            handle.write(render_markdown(result, Path.cwd()) + "\n")
    if interrupted_code is not None:
        return interrupted_code
    return _combined(result.outcomes)
