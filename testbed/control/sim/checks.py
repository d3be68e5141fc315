"""The invariants of a simulated run (Jepsen's checker), checked as the run goes and at its
end. A violation is a (time, kind, detail) on the world; kinds:

- `mismatch`: a result not computed by one model version over every segment in order
  (the world's sink checks each result as it arrives);
- `memory`: a worker started where the host's memory does not hold it (the world kills it);
- `disk`: a model write found the disk full while no disk fault was on (the world's agent);
- `dead_host`: a plan deployed with a stage on a host that had been silent (crashed,
  paused or cut off) for longer than the plane needs to notice;
- `answered_twice`: a request delivered to the user more than once;
- `lost`: a request neither answered nor reported lost when the run ended, or reported
  lost although the cluster was whole and drained (`finish`);
- `not_readmitted`: a live, healthy node still not usable for plans when the run settled;
- `no_recovery`: no healthy active epoch, or one still deploying, when the run settled;
- `throughput`: once faults healed and the plan settled, the measured throughput below
  `THROUGHPUT_BOUND` of the plan's prediction.

Division of labour: the world reports what it sees (testbed.control.sim.world); this module
watches the trace (`Checker.observe`) and judges the end (`settled`, `finish`);
testbed.control.sim.run decides when the end is.
"""

from __future__ import annotations

from typing import Any

from testbed.control import events as ev
from testbed.control.sim.world import World

THROUGHPUT_BOUND = 0.9      # recovery's definition (issue 11): 90% of the plan's prediction


class Checker:
    def __init__(self, world: World) -> None:
        self.world = world
        self.silent_since: dict[str, float] = {}
        settings = world.settings
        # the plane notices a silence after silence_s; a heartbeat interval and a tick of
        # slack for the timing of beats and ticks
        self.notice_s = settings.silence_s + 2 * settings.heartbeat_s + 0.1
        world.observers.append(self.observe)

    def observe(self, kind: str, fields: dict[str, Any]) -> None:
        world = self.world
        for host in world.hosts.values():
            silent = not host.up or host.paused or host.partitioned
            if silent:
                self.silent_since.setdefault(host.name, world.now)
            else:
                self.silent_since.pop(host.name, None)
        if kind == ev.PLAN_DEPLOYED:
            for name in sorted(set(fields["hosts"])):
                since = self.silent_since.get(name)
                if since is not None and world.now - since > self.notice_s:
                    world.violation("dead_host", f"epoch {fields['epoch']} deployed with a "
                                    f"stage on {name}, silent for "
                                    f"{world.now - since:.2f} s")

    def unsettled(self) -> list[str]:
        """Why the run has not settled yet (empty: it has): every live, healthy node usable,
        a healthy epoch active, nothing deploying or draining."""
        plane, world = self.world.plane, self.world
        out = [f"{h} not usable" for h in sorted(world.hosts)
               if world.hosts[h].healthy and not plane.usable(h)]
        if plane.active is None or plane.active.broken:
            out.append("no healthy active epoch")
        if plane.deploying is not None:
            out.append(f"epoch {plane.deploying.number} still deploying")
        if plane.draining:
            # its requests share the hosts' CPUs with the new epoch's: not yet the plan's pace
            out.append(f"epochs {[e.number for e in plane.draining]} draining")
        if plane.waiting_for_nodes:
            out.append(f"waiting for nodes: {plane.infeasible_reason}")
        return out

    def not_settled(self, why: list[str]) -> None:
        for reason in why:
            kind = "not_readmitted" if reason.endswith("not usable") else "no_recovery"
            self.world.violation(kind, reason)

    def throughput(self, start: float, end: float, predicted: float) -> float:
        done = sum(1 for t in self.world.dispatcher.done_times if start <= t < end)
        measured = done / (end - start)
        if measured < THROUGHPUT_BOUND * predicted:
            self.world.violation("throughput", f"{measured:.2f} rps measured over "
                                 f"[{start:.1f}, {end:.1f}) s, {predicted:.2f} predicted")
        return measured

    def finish(self) -> None:
        """Every request answered exactly once, none lost (the run ends whole and drained)."""
        d = self.world.dispatcher
        twice = [r.rid for r in d.requests if r.answers > 1]
        if twice:
            self.world.violation("answered_twice", f"requests {twice[:10]}")
        open_ = [r.rid for r in d.requests if r.status == "pending"]
        lost = [r.rid for r in d.requests if r.status == "lost"]
        if open_ or lost:
            self.world.violation("lost", f"{len(lost)} lost ({lost[:10]}), {len(open_)} "
                                 f"unanswered, of {len(d.requests)}")
