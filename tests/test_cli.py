"""The `edgepipe` console command: `pip install .` (of a copy of the sources, into a private
prefix, no downloads) gives a working command whose verbs are run_scenario.py's and the
partitioner's command lines; `edgepipe cleanup` clears a dead run from its records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import fresh_run_id

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("formats", "partitioner", "stage_image", "testbed")


@pytest.fixture(scope="module")
def edgepipe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The installed command and the environment that finds its packages (not this
    checkout's: the command must work from what pip installed)."""
    work = tmp_path_factory.mktemp("install")
    source = work / "source"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    prefix = work / "prefix"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--disable-pip-version-check", "--no-index",
                    "--prefix", str(prefix), str(source)], check=True, timeout=300)
    site = sysconfig.get_path("purelib", vars={"base": str(prefix)})
    env = {**os.environ, "PYTHONPATH": site, "EDGEPIPE_STATE_DIR": str(work / "state")}
    return prefix / "bin" / "edgepipe", env


def call(edgepipe: tuple[Path, dict[str, str]], *argv: str,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    command, env = edgepipe
    return subprocess.run([str(command), *argv], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT.parent, timeout=120)


def test_pip_install_gives_the_edgepipe_command(
        edgepipe: tuple[Path, dict[str, str]]) -> None:
    top = call(edgepipe, "--help")
    assert top.returncode == 0
    for verb in ("run", "plan", "split", "cleanup"):
        assert f"    {verb} " in top.stdout
    run = call(edgepipe, "run", "--help")
    assert run.stdout.startswith("usage: edgepipe run") and "--junit FILE" in run.stdout
    plan = call(edgepipe, "plan", "--help")
    assert plan.stdout.startswith("usage: edgepipe plan") and "--topology" in plan.stdout
    assert call(edgepipe, "split", "--help").stdout.startswith("usage: edgepipe split")
    assert call(edgepipe, "explode").returncode == 2
    # the installed code, not this checkout, answers: run a real check of a scenario file
    check = call(edgepipe, "run", str(ROOT / "scenarios" / "node_failure.yaml"), "--check")
    assert check.returncode == 0, check.stderr
    bad = call(edgepipe, "run", str(ROOT / "scenarios" / "node_failure.yaml"), "--check",
               "--duration", "5s")
    assert bad.returncode == 2 and "node_failure.yaml:13: at:" in bad.stderr
    listed = json.loads(call(edgepipe, "cleanup", "--list", "--json").stdout)
    assert listed["runs"] == [] and listed["state_dir"] == edgepipe[1]["EDGEPIPE_STATE_DIR"]


@pytest.mark.root
def test_cleanup_clears_a_dead_run_and_keeps_a_live_one(
        edgepipe: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """A driver that died (here: a process that recorded a directory and exited) leaves its
    record; `edgepipe cleanup` undoes it. A run whose driver lives is left alone."""
    dead_id, live_id = fresh_run_id("cz"), fresh_run_id("cl")
    made = tmp_path / "made-by-the-dead-run"
    record = ("from pathlib import Path; from testbed.emulation.records import RunRecord; "
              "r = RunRecord.claim({id!r}, Path({dir!r})); "
              "Path({made!r}).mkdir(); r.add('dirs', {made!r})")
    env = {**edgepipe[1], "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", record.format(id=dead_id, dir=str(tmp_path),
                                                        made=str(made))],
                   env=env, check=True, timeout=60)
    live = subprocess.Popen([sys.executable, "-c", record.format(
        id=live_id, dir=str(tmp_path), made=str(tmp_path / "live")) +
        "; import sys; sys.stdin.read()"], env=env, stdin=subprocess.PIPE)
    try:
        state = Path(edgepipe[1]["EDGEPIPE_STATE_DIR"])
        for _ in range(100):
            if (state / f"{live_id}.json").exists() and (tmp_path / "live").exists():
                break
            subprocess.run(["sleep", "0.1"], check=True)
        result = call(edgepipe, "cleanup", "--json")
        assert result.returncode == 0, result.stderr
        actions = {row["run_id"]: row["action"] for row in json.loads(result.stdout)["runs"]}
        assert actions == {dead_id: "cleared", live_id: "kept: its driver runs"}
        assert not made.exists() and not (state / f"{dead_id}.json").exists()
        assert (state / f"{live_id}.json").exists()
    finally:
        live.communicate(b"", timeout=30)
    (state / f"{live_id}.json").unlink()
