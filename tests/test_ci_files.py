"""The ready-made CI files (docs/ci/): every command their jobs run is one of ours, with
flags our command lines accept (parsed by their own argparse parsers), the scenario call
passes the real check of every file it names (`--check`: what the job would run, minus the
runs), and the reports and results the jobs publish are the files that call writes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.experiment import cli, driver

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / "docs" / "ci"


def _lines(block: str) -> list[str]:
    """The commands of a `run:` block or a script item (a `|` block: one per line)."""
    return [line.strip() for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def github_commands(doc: dict[str, Any]) -> list[str]:
    return [line for job in doc["jobs"].values() for step in job["steps"]
            if "run" in step for line in _lines(step["run"])]


def gitlab_commands(doc: dict[str, Any]) -> list[str]:
    return [line for job in doc.values() if isinstance(job, dict)
            for key in ("before_script", "script", "after_script")
            for item in job.get(key, []) for line in _lines(item)]


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))


def check_command(line: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fails unless `line` is a command of ours with accepted arguments; returns the
    scenario call's report paths ({"out", "junit", "summary_md"}) when it is that call."""
    argv = shlex.split(line)
    program = Path(argv[0]).name
    if program == "make":
        assert set(argv[1:]) <= _make_targets(), line
        return {}
    if program == "pip":
        assert argv[1:] == ["install", "--no-deps", "--no-build-isolation", "-e", "."], line
        assert 'edgepipe = "testbed.experiment.cli:main"' in \
            (ROOT / "pyproject.toml").read_text()
        return {}
    if program == "rm":
        assert argv[1] == "-rf" and all(p.startswith("results/") for p in argv[2:]), line
        return {}
    assert program == "edgepipe", f"not a command of ours: {line}"
    verb, rest = argv[1], argv[2:]
    assert verb in cli.VERBS, line
    if verb == "cleanup":
        cli.cleanup_parser().parse_args(rest)       # not run: it would act on this machine
        return {}
    assert verb == "run", line
    args = driver.parse_args(rest, "edgepipe run")
    monkeypatch.chdir(ROOT)                         # the job's working directory: a checkout
    assert cli.main(["run", *rest, "--check"]) == 0, line
    return {"out": args.out, "junit": args.junit, "summary_md": args.summary_md}


def _scenario_call(commands: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    calls = [found for found in (check_command(c, monkeypatch) for c in commands) if found]
    assert len(calls) == 1
    call = calls[0]
    assert call["junit"].startswith(call["out"] + "/")
    assert call["summary_md"].startswith(call["out"] + "/")
    return call


def test_github_actions_workflow(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = yaml.safe_load((CI / "github-actions.yml").read_text())
    commands = github_commands(doc)
    assert any(c.startswith(".venv/bin/edgepipe cleanup") for c in commands)
    call = _scenario_call(commands, monkeypatch)
    steps = doc["jobs"]["scenarios"]["steps"]
    uses = {step["uses"].split("@")[0]: step.get("with", {}) for step in steps if "uses" in step}
    assert uses["actions/upload-artifact"]["path"] == call["out"]
    assert uses["mikepenz/action-junit-report"]["report_paths"] == call["junit"]
    # cleanup, upload and report also after a failed or cancelled scenario call
    call_step = next(i for i, step in enumerate(steps) if "edgepipe run" in step.get("run", ""))
    assert all(step.get("if") == "always()" for step in steps[call_step + 1:])


def test_gitlab_ci_job(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    (job,) = doc.values()
    call = _scenario_call(gitlab_commands(doc), monkeypatch)
    assert job["artifacts"]["reports"]["junit"] == call["junit"]
    assert call["out"] + "/" in job["artifacts"]["paths"]
    assert job["artifacts"]["when"] == "always"
    assert any("edgepipe cleanup" in line for line in job["after_script"])


def test_a_command_that_is_not_ours_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for line in ("mn -c", ".venv/bin/edgepipe run scenarios/ --no-such-flag",
                 ".venv/bin/edgepipe run scenarios/ --duration 15s"):
        with pytest.raises((AssertionError, SystemExit)):
            check_command(line, monkeypatch)
