"""testbed/control/sim: the real ControlPlane in a simulated cluster under seeded fault
schedules. Many schedules per run, replay determinism, and each bug the simulation found as
a regression test (a seed that showed it, replayed through the command line, which fixes
PYTHONHASHSEED so the seed means the same run in every process).

The seeds below name runs of the current generators (world.Cluster.random, nemesis.draw):
a change to either gives every seed another cluster and schedule, and these must be found
again (`python -m testbed.control.sim --seed 0 --schedules 200 [--tight]`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.control.sim.nemesis import KINDS, draw
from testbed.control.sim.run import run_schedule

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = 20      # per CI run; the time is printed by the command (see the report)


def sim(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED="0")
    return subprocess.run([sys.executable, "-m", "testbed.control.sim", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_many_schedules_hold_every_invariant() -> None:
    result = sim("--seed", "1000", "--schedules", str(SCHEDULES))
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{SCHEDULES} schedules, 0 failed" in result.stdout


def test_the_same_seed_replays_the_same_trace() -> None:
    first, world = run_schedule(7)
    again, _ = run_schedule(7)
    other, _ = run_schedule(8)
    assert first.digest == again.digest and first.line() == again.line()
    assert first.digest != other.digest
    assert len(world.trace) > 50 and first.completed > 100


def test_schedules_cover_every_fault_kind_and_heal() -> None:
    actions = set()
    for seed in range(200):
        schedule = draw(seed, ["edge1", "edge2", "edge3"])
        actions |= {s.action for s in schedule.steps}
        times = [s.at for s in schedule.steps]
        assert times == sorted(times)
        for begin, end in KINDS.values():
            # every fault that has an end ends in the schedule, after it began
            starts = [s for s in schedule.steps if s.action == begin]
            ends = [s for s in schedule.steps if s.action == end]
            assert end is None or len(ends) >= len(starts)
    assert actions == {a for pair in KINDS.values() for a in pair if a is not None}


def test_a_failure_prints_its_seed_and_the_command_that_replays_it() -> None:
    # tight seed 3 shows the open hand-over bug (below): a failing run to look at
    result = sim("--seed", "3", "--tight")
    assert result.returncode == 1
    assert "seed 3: FAIL" in result.stdout
    assert "replay: python -m testbed.control.sim --seed 3 --faults 6 --tight --trace" \
        in result.stdout


# -- bugs the simulation found ------------------------------------------------------------------

@pytest.mark.parametrize("seed", ["21", "27", "39"])
def test_standbys_leave_room_for_workers(seed: str) -> None:
    """Tight seeds that ran a worker out of memory before two fixes in plane.py:
    reconcile_standbys chose several standbys for one host in one pass, each judged against
    the slots loaded before the pass only (`fits(..., also=picked)` now); and a new
    epoch's fresh worker was loaded beside the host's unused standbys (`make_room` now
    releases them first)."""
    result = sim("--seed", seed, "--tight")
    assert result.returncode == 0, result.stdout


@pytest.mark.xfail(strict=True, reason="open: a hand-over loads the new epoch's workers "
                   "while the old epoch's still run on the same host, and the planner "
                   "counts only the new stage's memory")
def test_a_handover_counts_the_old_epochs_workers() -> None:
    result = sim("--seed", "3", "--tight")
    assert "memory:" not in result.stdout, result.stdout


@pytest.mark.xfail(strict=True, reason="open (issue 11 item 4): agents keep models of "
                   "retired epochs and nothing counts disk, so a 72-192 MiB disk fills up")
def test_retired_models_do_not_fill_the_disk() -> None:
    result = sim("--seed", "35", "--tight")
    assert "disk:" not in result.stdout, result.stdout
