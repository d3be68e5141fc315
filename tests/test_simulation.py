"""testbed/control/sim: the real ControlPlane in a simulated cluster under seeded fault
schedules. Many schedules per run, replay determinism, and each bug the simulation found as
a regression test (a seed that showed it, replayed through the command line, which fixes
PYTHONHASHSEED so the seed means the same run in every process).

The seeds below name runs of the current generators (world.Cluster.random, nemesis.draw,
nemesis.churn):
a change to either gives every seed another cluster and schedule, and these must be found
again (`python -m testbed.control.sim --seed 0 --schedules 200 [--tight]`).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from partitioner.instance import Node, Plan, Stage
from testbed.control import events as ev
from testbed.control.core.actions import Event
from testbed.control.plane_io import Send
from testbed.control.planning import PlanRequest, Prepared
from testbed.control.sim import run as sim_run
from testbed.control.sim.checks import Checker
from testbed.control.sim.nemesis import KINDS, churn, draw
from testbed.control.sim.run import run_schedule
from testbed.control.sim.world import Cluster, Frame
from testbed.control.sim.world import World as SimWorld
from tests.test_plane import MiB, World, stage_file

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = 1000    # per CI run, in 2 processes: 163 CPU-s, 83 s wall on 2 cores (mostly the
                    # planner's exact solves, ~15 distinct live sets per schedule)


def sim(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED="0")
    return subprocess.run([sys.executable, "-m", "testbed.control.sim", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_many_schedules_hold_every_invariant() -> None:
    result = sim("--seed", "1000", "--schedules", str(SCHEDULES), "--jobs", "2")
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


def test_worker_processes_give_the_lines_one_process_gives() -> None:
    alone = sim("--seed", "7", "--schedules", "4")
    shared = sim("--seed", "7", "--schedules", "4", "--jobs", "2")
    assert alone.returncode == shared.returncode == 0, alone.stdout + shared.stdout
    # the same lines in seed order, but the summary's wall time
    def lines(result: subprocess.CompletedProcess[str]) -> list[str]:
        return [line for line in result.stdout.splitlines() if " schedules, " not in line]

    assert len(lines(alone)) == 5 and lines(alone) == lines(shared)


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


def test_churn_crashes_a_host_that_is_up_while_others_are_still_down() -> None:
    hosts = ["edge1", "edge2", "edge3", "edge4"]
    overlapping = 0
    for seed in range(200):
        steps = churn(seed, hosts).steps
        assert [s.at for s in steps] == sorted(s.at for s in steps)
        crashes = [s for s in steps if s.action == "crash"]
        assert len(crashes) == 6 and len(steps) == 12
        assert all(2.0 <= b.at - a.at <= 4.0 + 1e-3 for a, b in zip(crashes, crashes[1:]))
        down: set[str] = set()
        for step in steps:
            if step.action == "crash":
                assert step.target not in down      # its restart would end this crash
                overlapping += bool(down)
                down.add(step.target)
            else:
                down.remove(step.target)
        assert not down                             # every crashed host is back at the end
    assert overlapping > 0.6 * 200 * 5              # most crashes land while one is down


def test_churn_schedules_hold_every_invariant() -> None:
    result = sim("--seed", "1", "--schedules", "4", "--churn")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "4 schedules, 0 failed" in result.stdout and "during the faults:" in result.stdout
    assert result.stdout.count("faults 12 (crash,restart)") == 4


def test_a_failure_prints_its_seed_and_the_command_that_replays_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # no shipped seed fails any more: a violation planted in a real schedule's outcome
    real = sim_run.run_schedule

    def planted(seed: int, *args: object, **kwargs: object) -> tuple[object, SimWorld]:
        outcome, world = real(seed, *args, **kwargs)
        outcome.violations.append((world.now, "lost", "planted"))
        return outcome, world

    monkeypatch.setenv("PYTHONHASHSEED", "0")     # main re-executes itself without it
    monkeypatch.setattr(sim_run, "run_schedule", planted)
    assert sim_run.main(["--seed", "35", "--tight"]) == 1
    out = capsys.readouterr().out
    assert "seed 35: FAIL lost" in out and "lost: planted" in out
    assert "replay: python -m testbed.control.sim --seed 35 --faults 6 --tight --trace" in out
    assert "1 schedules, 1 failed" in out and "failed seeds [35]" in out


# -- bugs the simulation found --------------------------------------------------------------
# Each first as the plane's rule (tests.test_plane's fake world: two 1 MiB segments, workers
# of 70 MiB runtime), then as the tight seeds that showed it (they ran a worker out of memory
# before the fix).

def tight(memory_mib: dict[str, int], speed: dict[str, float] | None = None) -> World:
    """Epoch 1 serving on e1 (stage 0) and e2 (stage 1), with these node memories."""
    w = World()
    w.instance.nodes = [Node(n.name, (speed or {}).get(n.name, 1.0),
                             memory_mib.get(n.name, 256) * MiB) for n in w.instance.nodes]
    w.serving()
    return w


def events(actions: list[object], kind: str) -> list[Event]:
    return [a for a in actions if isinstance(a, Event) and a.kind == kind]


def test_standbys_chosen_in_one_pass_count_each_others_memory() -> None:
    w = tight({"e3": 25})
    # the plan for the loss of e1 needs stage 0 on e3, the one for e2 needs stage 1 on e3:
    # one standby fits in e3's 25 MiB, two need 1 + 31 MiB (a forked worker's runtime)
    plans = {}
    for lost, stages in (("e1", [Stage(0, 1, "e3"), Stage(1, 2, "e2")]),
                         ("e2", [Stage(0, 1, "e1"), Stage(1, 2, "e3")])):
        request = PlanRequest("contingency", f"if {lost} is lost", w.info,
                              frozenset({"e1", "e2", "e3"} - {lost}), excluded=lost)
        files = [stage_file(i) if s.node == "e3" else None for i, s in enumerate(stages)]
        plans[lost] = Prepared(request, Plan.of(w.instance, stages, "given", False), files,
                               None)
    w.plane.contingency.plans, w.plane.contingency.queue = plans, []
    w.plane.contingency.reconcile_standbys()
    prepared = [e.fields["host"] for e in events(w.take(), "standby.prepared")]
    assert prepared == ["e3"]


def test_a_rejoin_that_does_not_fit_beside_the_epoch_in_force_is_declined() -> None:
    # e1 is slow: stages on e2 and e3 halve the bottleneck, but e2 still runs epoch 1's
    # stage 1 until the hand-over drained, and a second worker does not fit in its 25 MiB
    w = tight({"e2": 25}, speed={"e1": 0.5})
    w.plane.rejoin_done(w.prepared("e2", "e3", kind="rejoin"))
    out = w.take()
    declined = events(out, ev.REJOIN_DECLINED)
    assert [e.fields["reason"] for e in declined] == ["no memory for the hand-over on e2"]
    assert not events(out, ev.PLAN_COMPUTED) and w.plane.deploying is None


def test_a_handover_that_does_not_fit_replaces_the_epoch_in_force() -> None:
    w = tight({"e2": 25})
    old = w.plane.active
    assert old is not None
    w.plane.new_epoch(w.prepared("e2", "e3", kind="rollout"))
    releases = [a for a in w.take(Send) if a.kind == "release"]
    # epoch 1 cannot drain beside the new stage 0 on e2: it is replaced (its requests are
    # replayed on epoch 2), and its worker on e2 makes room at once
    assert old.broken and w.plane.deploying is not None
    assert [a.host for a in releases] == ["e2"]
    assert sum(s.host == "e2" for s in w.plane.slots.values()) == 1


@pytest.mark.parametrize("seed", ["3", "12", "18", "21", "27", "30", "39"])
def test_tight_seeds_that_ran_out_of_memory(seed: str) -> None:
    """3: a broken epoch's workers kept their memory while its replacement loaded, and a
    rejoin loaded beside the epoch in force; 18: a rollout; 12, 30: straggler hand-overs;
    21, 27, 39: standbys (two chosen at once, or left beside a new epoch's worker)."""
    result = sim("--seed", seed, "--tight")
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("seed", ["35", "153"])
def test_retired_models_do_not_fill_the_disk(seed: str) -> None:
    """35 (issue 11 item 4): agents kept models of retired epochs, so a 72-192 MiB disk
    filled up; they now evict what no worker holds before writing. 153: the simulated agent
    also kept the models of workers that had failed (on a disk fault that had ended), which
    the real agent (stage_image.agent: alive workers only) evicts."""
    result = sim("--seed", seed, "--tight")
    assert "disk:" not in result.stdout, result.stdout


# -- the checker sees what it is for ----------------------------------------------------------

def test_the_checks_catch_each_kind_of_violation() -> None:
    world = SimWorld(Cluster.random(random.Random(5)), 5)
    checker = Checker(world)
    world.start()
    world.run_until(10.0)
    assert world.plane.state() == "ready" and not world.violations
    world.command({"cmd": "start_workload"})
    world.run_until(12.0)
    d = world.dispatcher
    n = len(world.instance.segments)
    # a result computed by two versions, and one missing a segment
    rid = next(iter(d.pending))
    d.on_result(Frame(rid, 1, 1, 0.0, ((1, 0, 1), (2, 1, n))))
    rid = next(iter(d.pending))
    d.on_result(Frame(rid, 1, 1, 0.0, ((1, 1, n),)))
    # a plan deployed on a host silent for longer than detection takes
    host = sorted(world.hosts)[0]
    world.fault("crash", host, {})
    world.run_until(world.now + 5.0)
    checker.observe(ev.PLAN_DEPLOYED, {"epoch": 99, "hosts": [host]})
    # a request answered twice, and requests still open at the end
    d.requests[0].answers = 2
    checker.finish()
    # throughput far below the prediction
    checker.throughput(world.now - 1.0, world.now, 1e6)
    kinds = [kind for _, kind, _ in world.violations]
    assert kinds.count("mismatch") == 2
    assert {"dead_host", "answered_twice", "lost", "throughput"} <= set(kinds)
