"""Runs seeded schedules on simulated clusters and judges them:

    python -m testbed.control.sim --seed S [--schedules K] [--faults N] [--tight] [--churn]
                                  [--trace] [--jobs J]

Schedule `S + i` (i < K) builds its cluster (testbed.control.sim.world.Cluster.random) and
its fault schedule (testbed.control.sim.nemesis.draw, or with --churn nemesis.churn: N
overlapping crash/restart pairs) from its seed alone, so any failure is replayed by
`--seed S+i` (the command is printed with it). One run: deploy, start a closed-
loop workload, apply the schedule, wait until every fault has healed and the plane has
settled (every live, healthy node usable, a healthy epoch active; at most `SETTLE_CAP_S`)
and the request timeout has passed since the last heal, measure the throughput over
`WINDOW_S` against the plan's prediction, stop issuing, drain,
and check that every request was answered exactly once (testbed.control.sim.checks). Each
line also shows the rate answered while the faults came (the workload's start to the last
heal) beside the first plan's prediction: no invariant, a figure of how the plane copes.
With `--jobs J`, J worker processes run the schedules (each one still from its seed alone,
so a line is the same whichever process ran it) and the lines come in seed order.

The plane iterates over sets of host names in places, and Python salts string hashes per
process: the command line therefore runs under PYTHONHASHSEED=0 (it re-executes itself when
that is not set), so a printed seed replays the same trace in any process.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from testbed.control.sim.checks import Checker
from testbed.control.sim.nemesis import Schedule, churn, draw
from testbed.control.sim.world import Cluster, World

READY_CAP_S = 30.0          # the first deployment must be serving by then
WARMUP_S = 2.0              # the workload runs this long before the first fault
SETTLE_CAP_S = 120.0        # after the last fault healed (back-offs double: allow several)
SETTLE_STEP_S = 0.5
FILL_S = 2.0                # a new epoch's pipeline fills before the window
WINDOW_S = 5.0              # throughput measured over this
WINDOW_TRIES = 5            # a window cut short by a new epoch is measured again
DRAIN_S = 15.0
DRAIN_STEP_S = 0.1


@dataclass
class Outcome:
    seed: int
    schedule: Schedule
    violations: list[tuple[float, str, str]]
    sent: int
    completed: int
    duplicates: int
    epochs: int
    measured_rps: float
    predicted_rps: float
    during_rps: float           # answered per second while faults came (start to last heal)
    first_rps: float            # the first plan's prediction, for scale
    sim_s: float
    digest: str

    @property
    def ok(self) -> bool:
        return not self.violations

    def line(self) -> str:
        kinds = ",".join(self.schedule.kinds()) or "none"
        verdict = "ok" if self.ok else "FAIL " + ",".join(sorted({v[1] for v in
                                                                 self.violations}))
        return (f"seed {self.seed}: {verdict}  faults {len(self.schedule.steps)} ({kinds}) "
                f"epochs {self.epochs} requests {self.completed}/{self.sent} "
                f"dup {self.duplicates} rps {self.measured_rps:.1f}/"
                f"{self.predicted_rps:.1f} during {self.during_rps:.1f}/{self.first_rps:.1f} "
                f"sim {self.sim_s:.0f}s")


def digest(world: World) -> str:
    return hashlib.sha256(repr(world.trace).encode()).hexdigest()[:16]


def run_schedule(seed: int, most: int = 6, span_s: float = 20.0, tight: bool = False,
                 churning: bool = False) -> tuple[Outcome, World]:
    rng = random.Random(seed)
    world = World(Cluster.random(rng, tight), seed)
    checker = Checker(world)
    hosts = sorted(world.hosts)
    schedule = churn(seed, hosts, most) if churning else draw(seed, hosts, span_s, most)
    world.start()
    measured = predicted = during = first = 0.0
    while world.plane.state() != "ready" and world.now < READY_CAP_S:
        world.run_until(world.now + 0.1)
    if world.plane.state() != "ready":
        world.violation("no_recovery", f"not ready after {READY_CAP_S:.0f} s "
                        f"(state {world.plane.state()})")
    else:
        reply = world.command({"cmd": "start_workload"})
        assert reply["ok"], reply
        assert world.plane.active is not None
        first = world.plane.active.plan.predicted_throughput_rps
        begin = world.now + WARMUP_S
        for step in schedule.steps:
            world.at(begin + step.at, world.fault, step.action, step.target, step.params)
        world.run_until(begin + schedule.healed_at)
        if schedule.healed_at > 0:
            during = sum(1 for t in world.dispatcher.done_times
                         if begin <= t) / schedule.healed_at
        deadline = world.now + SETTLE_CAP_S
        while why := checker.unsettled():
            if world.now >= deadline:
                checker.not_settled(why)
                break
            world.run_until(world.now + SETTLE_STEP_S)
        else:
            # a frame lost to a fault too short to notice waits for the request timeout
            # before it is sent again: the bound includes it
            world.run_until(max(world.now, begin + schedule.healed_at
                                + world.cfg.workload.timeout_s))
            measured, predicted = measure(world, checker)
        world.dispatcher.stop_issuing(world.now, DRAIN_S)
        # until the last answer is in (well under a second), not to the drain's deadline:
        # the settled cluster idles after it (of 318 runs, one had a plane event there)
        drained = world.now + DRAIN_S + 1.0
        while world.dispatcher.state != "done" and world.now < drained:
            world.run_until(min(world.now + DRAIN_STEP_S, drained))
        if world.dispatcher.state != "done":
            world.dispatcher.finish()
        checker.finish()
    d = world.dispatcher
    outcome = Outcome(seed, schedule, list(world.violations), len(d.requests), d.completed,
                      d.duplicates, world.plane.numbers.next - 1, measured, predicted,
                      during, first, world.now, digest(world))
    return outcome, world


def measure(world: World, checker: Checker) -> tuple[float, float]:
    """Throughput over a window in which one healthy epoch served throughout."""
    measured = predicted = 0.0
    for _ in range(WINDOW_TRIES):
        active = world.plane.active
        world.run_until(world.now + FILL_S)
        start = world.now
        world.run_until(start + WINDOW_S)
        if active is None or world.plane.active is not active or active.broken:
            continue
        predicted = active.plan.predicted_throughput_rps
        measured = checker.throughput(start, world.now, predicted)
        return measured, predicted
    world.violation("no_recovery", f"the epoch in force changed in each of {WINDOW_TRIES} "
                    f"throughput windows")
    return measured, predicted


@dataclass(frozen=True)
class Options:
    """What every schedule of one command line shares."""

    faults: int
    tight: bool
    churn: bool
    trace: bool


def judged(seed: int, options: Options) -> tuple[Outcome, list[str]]:
    """One schedule's outcome and, with --trace, its trace's lines: what a worker process
    (--jobs) sends back, as the world itself is not worth pickling."""
    outcome, world = run_schedule(seed, options.faults, tight=options.tight,
                                  churning=options.churn)
    trace = [f"  {t:9.3f} {kind} {fields}" for t, kind, fields in world.trace] \
        if options.trace else []
    return outcome, trace


def outcomes(seeds: range, options: Options, jobs: int) -> Iterator[tuple[Outcome, list[str]]]:
    """The schedules' outcomes in seed order, from `jobs` worker processes (1: this one)."""
    run = functools.partial(judged, options=options)
    if jobs <= 1:
        yield from map(run, seeds)
        return
    with multiprocessing.Pool(min(jobs, len(seeds))) as pool:
        yield from pool.imap(run, seeds)


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("PYTHONHASHSEED") != "0":
        # string hashes must be the same in every process for a seed to replay
        env = dict(os.environ, PYTHONHASHSEED="0")
        args = [sys.executable, "-m", "testbed.control.sim",
                *(sys.argv[1:] if argv is None else argv)]
        os.execve(sys.executable, args, env)
    p = argparse.ArgumentParser(prog="python -m testbed.control.sim",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="the first schedule's seed")
    p.add_argument("--schedules", type=int, default=1, help="how many (seeds S, S+1, ...)")
    p.add_argument("--faults", type=int, default=6,
                   help="at most this many per schedule (--churn: this many crash/restart "
                        "pairs)")
    p.add_argument("--tight", action="store_true",
                   help="hosts with room for one or two workers and a few stage files")
    p.add_argument("--churn", action="store_true",
                   help="crash/restart pairs of different hosts every 2-4 s instead")
    p.add_argument("--trace", action="store_true", help="print each run's trace")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes running schedules side by side")
    args = p.parse_args(argv)
    if args.schedules < 1 or args.faults < 1 or args.jobs < 1:
        p.error("--schedules, --faults and --jobs must be at least 1")
    failed = []
    during: list[float] = []        # answered during the faults, a share of the first plan's
    started = time.monotonic()
    seeds = range(args.seed, args.seed + args.schedules)
    options = Options(args.faults, args.tight, args.churn, args.trace)
    for seed, (outcome, trace) in zip(seeds, outcomes(seeds, options, args.jobs)):
        print(outcome.line(), flush=True)
        if outcome.first_rps > 0:
            during.append(outcome.during_rps / outcome.first_rps)
        for line in trace:
            print(line)
        if not outcome.ok:
            failed.append(seed)
            for step in outcome.schedule.steps:
                print(f"    step {step.describe()}")
            for t, kind, detail in outcome.violations[:10]:
                print(f"    {t:.3f}s {kind}: {detail}")
            print(f"    replay: python -m testbed.control.sim --seed {seed} "
                  f"--faults {args.faults}{' --tight' if args.tight else ''}"
                  f"{' --churn' if args.churn else ''} --trace")
    took = time.monotonic() - started
    print(f"{args.schedules} schedules, {len(failed)} failed, {took:.1f} s"
          + (f"; failed seeds {failed}" if failed else ""))
    if during:
        print(f"during the faults: {100 * sum(during) / len(during):.0f}% of the first "
              f"plan's predicted rps answered (mean), {100 * min(during):.0f}% at worst")
    return 1 if failed else 0
