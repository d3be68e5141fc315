"""testbed/control/plane.py: the embedded controller's decisions without processes, sockets
or sleeps: a fake clock, a fake dispatcher, agent messages as dicts, and the actions checked.

The same decisions with real agents and workers: tests/test_runtime_loopback.py and
tests/test_recovery.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from formats.control import ControlSettings
from partitioner.instance import InfeasibleError, Instance, Node, Plan, Segment, Stage
from testbed.control.core.actions import Event
from testbed.control.dispatcher import Route, Workload
from testbed.control.plane import ControlPlane
from testbed.control.plane_io import Send, StartJob
from testbed.control.planning import PlanRequest, Prepared, StageFile, VersionInfo
from testbed.control.state import ControllerConfig

MiB = 1024 * 1024
EDGES = ("e1", "e2", "e3")


class FakeDispatcher:
    def __init__(self) -> None:
        self.pool: list[Any] = []
        self.state = "idle"
        self.sink_address = "tcp://10.0.0.1:19000"
        self.keys = None
        self.routes: list[tuple[Route, bool]] = []
        self.retired: list[int] = []
        self.in_flight: dict[int, int] = {}

    def set_pool(self, pool: list[Any]) -> None:
        self.pool = pool

    def add_version(self, version: int, references: list[Any]) -> None:
        pass

    def switch(self, route: Route, replay: bool = True) -> int:
        self.routes.append((route, replay))
        return 0

    def replay_epochs(self, epochs: set[int] | None, reason: str) -> int:
        return 0

    def retire(self, epoch: int) -> None:
        self.retired.append(epoch)

    def in_flight_on(self, epoch: int) -> int:
        return self.in_flight.get(epoch, 0)

    def start(self, workload: Workload) -> None:
        self.state = "running"

    def status(self) -> dict[str, Any]:
        return {}


def instance() -> Instance:
    nodes = [Node(n, 1.0, 256 * MiB) for n in EDGES]
    bandwidth = {(a, b): 1000.0 for a in ("d", *EDGES) for b in EDGES if a < b}
    return Instance([Segment(10.0, MiB, 1000), Segment(10.0, MiB, 100)], 1000, nodes, "d",
                    bandwidth)


def stage_file(i: int) -> StageFile:
    return StageFile(Path(f"/m/stage_{i}.onnx"), f"{i:064x}", 100, ["x"], ["y"])


class World:
    """A plane, its dispatcher and a clock; helpers speak for the agents."""

    def __init__(self, **control: Any) -> None:
        cfg = ControllerConfig(Path("/run"), Path("/m.onnx"), Path("/i.json"),
                               {h: f"10.0.0.{i + 2}" for i, h in enumerate(EDGES)}, "10.0.0.1",
                               control=ControlSettings(heartbeat_ms=100, **control))
        self.dispatcher = FakeDispatcher()
        self.plane = ControlPlane(cfg, set(EDGES), self.dispatcher)
        self.instance = instance()
        self.info = VersionInfo(1, Path("/m.onnx"), "ab" * 32, self.instance, "m")
        self.now = 0.0

    def take(self, kind: type | None = None) -> list[Any]:
        out = self.plane.take()
        return [a for a in out if kind is None or isinstance(a, kind)]

    def prepared(self, first: str, second: str, kind: str = "initial") -> Prepared:
        plan = Plan.of(self.instance, [Stage(0, 1, first), Stage(1, 2, second)], "given",
                       False)
        request = PlanRequest(kind, kind, self.info, frozenset(EDGES),
                              generation=self.plane.numbers.next)
        return Prepared(request, plan, [stage_file(0), stage_file(1)], None)

    def hello_all(self) -> None:
        for i, host in enumerate(EDGES):
            self.plane.on_hello(host, {"pid": 100 + i}, self.now)

    def beat(self, host: str, routes: dict[int, list[list[int]]] | None = None) -> None:
        workers = [{"port": port, "sha256": slot.stage.sha256, "state": "ready",
                    "routes": [[e, s] for e, s in slot.routes.items()],
                    "standby": slot.standby, "load": None}
                   for (h, port), slot in self.plane.slots.items() if h == host]
        self.plane.on_heartbeat(host, {"host": host, "seq": 0, "workers": workers}, self.now)

    def serving(self, first: str = "e1", second: str = "e2") -> None:
        """Bootstrapped, epoch 1 on (first, second), active."""
        self.plane.start()
        assert [a.kind for a in self.take(StartJob)] == ["bootstrap"]
        self.plane.job_done("bootstrap", ([{"x": 0}], [], self.info), None, self.now)
        assert [a.kind for a in self.take(StartJob)] == ["initial"]
        self.hello_all()
        self.plane.job_done("initial", self.prepared(first, second), None, self.now)
        sends = self.take(Send)
        assert [(s.host, s.kind) for s in sends] == [(first, "deploy"), (second, "deploy")]
        for s in sends:
            self.plane.on_worker(s.host, {"port": s.fields["port"], "epoch": 1, "stage": 0,
                                          "state": "ready", "detail": "", "reason": "started"},
                                 self.now)
        assert self.plane.active is not None and self.plane.active.number == 1
        self.take()

    def advance(self, seconds: float, beating: tuple[str, ...] = EDGES) -> list[Any]:
        """Time passes in 50 ms ticks; the `beating` hosts heartbeat every 100 ms."""
        out = []
        end = self.now + seconds
        step = 0
        while self.now < end - 1e-9:
            self.now = round(self.now + 0.05, 6)
            step += 1
            if step % 2 == 0:
                for host in beating:
                    self.beat(host)
            self.plane.tick(self.now)
            out += self.take()
        return out


def kinds(actions: list[Any]) -> list[str]:
    return [a.kind for a in actions if isinstance(a, Event)]


def test_the_first_epoch_deploys_after_every_hello_and_serves_when_confirmed() -> None:
    world = World()
    world.serving()
    route, replay = world.dispatcher.routes[-1]
    assert route.epoch == 1 and route.heads[0].address.startswith("tcp://10.0.0.2:")
    assert replay                                    # no old pipeline to hand over from
    assert world.plane.state() == "ready"


def test_a_silent_serving_node_is_suspected_and_replanned() -> None:
    world = World(suspect_after_missed=3, standby=False)
    world.serving()
    out = world.advance(1.0, beating=("e1", "e3"))
    assert "node.suspected" in kinds(out)
    suspected = next(a for a in out if isinstance(a, Event) and a.kind == "node.suspected")
    assert suspected.fields["host"] == "e2" and 300 < suspected.fields["silent_ms"] <= 400
    jobs = [a for a in out if isinstance(a, StartJob)]
    assert jobs and jobs[0].kind == "plan" and jobs[0].request is not None
    assert jobs[0].request.kind == "failure" and "e2" not in jobs[0].request.live
    assert world.plane.active is not None and world.plane.active.broken


def test_a_worker_failure_backs_the_host_off_and_replans_at_once() -> None:
    world = World(standby=False, unhealthy_hold_s=10.0)
    world.serving()
    port = next(p for (h, p) in world.plane.slots if h == "e2")
    world.plane.on_worker("e2", {"port": port, "epoch": 1, "stage": 1, "state": "failed",
                                 "detail": "killed", "reason": "exit"}, world.now)
    out = world.take()
    assert kinds(out)[:3] == ["worker.failed", "node.unhealthy", "replan.requested"]
    world.plane.tick(world.now)
    job = world.take(StartJob)[0]
    assert job.request is not None and "e2" not in job.request.live
    # the new plan, deployed as epoch 2: epoch 1 is replaced and its requests replayed
    world.plane.job_done("plan", world.prepared("e1", "e3", "failure"), None, world.now)
    for s in world.take(Send):
        if s.kind == "deploy":
            world.plane.on_worker(s.host, {"port": s.fields["port"], "epoch": 2, "stage": 0,
                                           "state": "ready", "detail": "",
                                           "reason": "started"}, world.now)
    assert world.plane.active is not None and world.plane.active.number == 2
    assert world.dispatcher.routes[-1][1] is True and world.dispatcher.retired == [1]
    # e2 is usable again only after its back-off
    assert not world.plane.usable("e2")
    out = world.advance(10.0)
    assert "node.healthy" in kinds(out) and world.plane.usable("e2")


def failed_over(bridged: Plan | None) -> tuple[World, list[Any]]:
    """e2's worker of epoch 1 fails; the failure plan (e1, e3), bridging `bridged` if given,
    deploys and serves as epoch 2. The world, and what the plane did on its next tick."""
    world = World(standby=False, unhealthy_hold_s=10.0)
    world.serving()
    fail_worker(world, "e2", stage=1)
    world.plane.tick(world.now)
    world.take()
    prepared = world.prepared("e1", "e3", "failure")
    prepared.bridged = bridged
    world.plane.job_done("plan", prepared, None, world.now)
    computed = next(a for a in world.take() if isinstance(a, Event)
                    and a.kind == "plan.computed")
    assert ("bridged" in computed.fields) == (bridged is not None)
    for s in [s for s in world.plane.slots.values() if 2 in s.routes]:
        world.plane.on_worker(s.host, {"port": s.port, "epoch": 2, "stage": 0,
                                       "state": "ready", "detail": "", "reason": "started"},
                              world.now)
    assert world.plane.active is not None and world.plane.active.number == 2
    world.take()
    world.plane.tick(world.now)
    return world, world.take()


def test_a_quick_bridge_serves_then_the_plan_it_stood_in_for_is_looked_for() -> None:
    """A failure plan that bridges a slower-to-deploy one (testbed.control.policy's
    quick-bridge rule) serves at once; as soon as it does, a rejoin-kind plan is asked for,
    so the better plan follows by the rejoin rule, loaded beside the bridge."""
    instance_ = instance()
    better = Plan.of(instance_, [Stage(0, 1, "e3"), Stage(1, 2, "e1")], "optimal", True)
    world, out = failed_over(better)
    assert world.plane.active is not None and world.plane.active.bridge
    (job,) = [a for a in out if isinstance(a, StartJob)]
    assert job.kind == "rejoin" and job.request is not None
    assert "quick bridge" in job.request.reason
    # an ordinary failure plan asks for nothing more
    world, out = failed_over(None)
    assert world.plane.active is not None and not world.plane.active.bridge
    assert not [a for a in out if isinstance(a, StartJob) and a.kind == "rejoin"]


def test_a_restart_is_a_new_incarnation_even_with_the_same_pid() -> None:
    world = World(standby=False)
    world.serving()
    # e2's agent starts again and gets the same pid (a container): its id is new
    world.plane.on_hello("e2", {"pid": 101, "incarnation": "0123456789abcdef"}, world.now)
    out = world.take()
    assert kinds(out)[:2] == ["agent.restarted", "replan.requested"]
    assert not any(h == "e2" for h, _ in world.plane.slots)     # its workers died with it
    # a heartbeat of the new start is the same incarnation: nothing more happens
    world.plane.on_heartbeat("e2", {"host": "e2", "seq": 1, "workers": [],
                                    "incarnation": "0123456789abcdef"}, world.now)
    assert "agent.restarted" not in kinds(world.take())
    # a late message of the start before it is stale and dropped
    world.plane.on_hello("e2", {"pid": 101}, world.now)
    assert kinds(world.take()) == ["agent.stale"]
    # a heartbeat of a start whose hello was lost admits it
    world.plane.on_heartbeat("e2", {"host": "e2", "seq": 1, "workers": [],
                                    "incarnation": "fedcba9876543210"}, world.now)
    assert "agent.restarted" in kinds(world.take())


def test_a_straggler_is_flagged_once_while_the_move_off_it_is_under_way() -> None:
    world = World(standby=False, straggler_factor=2.0, straggler_after_s=1.0,
                  unhealthy_hold_s=30.0)
    world.serving()
    slots = {h: (p, s) for (h, p), s in world.plane.slots.items()}

    def beat(host: str, ms: float) -> None:
        port, slot = slots[host]
        world.plane.on_heartbeat(host, {"host": host, "seq": 0, "workers": [
            {"port": port, "sha256": slot.stage.sha256, "state": "ready", "standby": False,
             "load": [10, ms], "routes": [[1, slot.routes[1]]]}]}, world.now)

    flags = []
    for _ in range(8):          # e2 at 5x its plan for 8 s; e1 on time
        world.now += 1.0
        beat("e1", 11.0)
        beat("e2", 55.0)
        flags += [a for a in world.take(Event) if a.kind == "node.straggler"]
    # one flag: the re-plan it asked for is not superseded by a new flag every second
    assert len(flags) == 1 and flags[0].fields["host"] == "e2"
    # a broken epoch (e1's worker died) judges no straggler: its re-plan would only supersede
    # the epoch being deployed
    world = World(standby=False, straggler_factor=2.0, straggler_after_s=1.0)
    world.serving()
    slots = {h: (p, s) for (h, p), s in world.plane.slots.items()}
    world.plane.on_worker("e1", {"port": slots["e1"][0], "epoch": 1, "stage": 0,
                                 "state": "failed", "detail": "killed", "reason": "exit"},
                          world.now)
    assert world.plane.active is not None and world.plane.active.broken
    for _ in range(4):
        world.now += 1.0
        beat("e2", 55.0)
    assert "node.straggler" not in kinds(world.take())


def test_standbys_chosen_in_one_pass_share_a_hosts_room() -> None:
    from testbed.control.policy import Held

    world = World(standby=False)
    world.serving()                 # e1 serves stage 0: one forked worker (30 MiB + 1 MiB)
    prepared = world.prepared("e1", "e2")
    key, file = Held("e1", 1, 2, 1), stage_file(1)
    fits = world.plane.contingency.fits
    # 256 MiB: the serving worker (31 MiB), the new one (1 MiB) and seven pending ones (31 MiB
    # each) fit; with eight pending it does not, though each alone would
    pending = [(Held("e1", 0, 1, 1), stage_file(0))]
    assert fits("e1", prepared, key, file)
    assert fits("e1", prepared, key, file, pending * 7)
    assert not fits("e1", prepared, key, file, pending * 8)
    # pending workers of other hosts take no room here
    assert fits("e1", prepared, key, file, [(Held("e2", 0, 1, 1), stage_file(0))] * 5)


def test_each_contingency_plans_standbys_load_before_the_queue_is_done() -> None:
    world = World()
    world.serving("e1", "e2")                      # e3 is spare
    world.plane.tick(world.now)
    (job,) = world.take(StartJob)
    assert job.kind == "contingency" and job.request is not None
    assert job.request.excluded == "e1"
    # if e1 is lost: e3 takes its stage 0 (a new stage file: a standby to load)
    plan = Plan.of(world.instance, [Stage(0, 1, "e3"), Stage(1, 2, "e2")], "given", False)
    world.plane.job_done("contingency", Prepared(job.request, plan, [stage_file(0), None],
                                                 None), None, world.now)
    out = world.take()
    # e2's plan is still to come, but e1's standby is on its way already
    assert [(s.host, s.kind) for s in out if isinstance(s, Send)] == [("e3", "prepare")]
    assert "standby.prepared" in kinds(out) and "contingency.ready" not in kinds(out)


@pytest.mark.parametrize("e3_disk", [0, 54 * MiB + MiB // 2])
def test_once_every_plan_is_known_the_standbys_are_decided_again_together(e3_disk: int) -> None:
    """The first loss's plan takes the one standby place of the spare e3 as soon as it is
    known; the second loss needs a stage there too, with far fewer bytes to load: once both
    plans are known the place goes to it (core.standby.cover), and the first is released.
    The first's model then goes to e3's disk, with no worker, where the disk holds it."""
    world = World()
    tight = [Node(n, 1.0, 256 * MiB if n != "e3" else 10 * MiB, e3_disk if n == "e3" else 0)
             for n in EDGES]
    world.instance = Instance(world.instance.segments, 1000, tight, "d",
                              world.instance.bandwidth_mbps)
    world.info = VersionInfo(1, Path("/m.onnx"), "ab" * 32, world.instance, "m")
    world.serving("e1", "e2")
    big = StageFile(Path("/m/big.onnx"), "b" * 64, 50 * MiB, ["x"], ["y"])
    small = StageFile(Path("/m/small.onnx"), "c" * 64, MiB, ["x"], ["y"])
    for lost, stages, files in (
            ("e1", [Stage(0, 1, "e3"), Stage(1, 2, "e2")], [big, None]),
            ("e2", [Stage(0, 1, "e1"), Stage(1, 2, "e3")], [None, small])):
        world.plane.tick(world.now)
        (job,) = world.take(StartJob)
        assert job.request is not None and job.request.excluded == lost
        plan = Plan.of(world.instance, stages, "given", False)
        world.plane.job_done("contingency", Prepared(job.request, plan, files, None), None,
                             world.now)
        out = world.take()
        if lost == "e1":        # e1's plan, alone so far: its standby is on its way
            assert [(s.host, s.kind) for s in out if isinstance(s, Send)] == [("e3", "prepare")]
    sends = [(s.host, s.kind, s.fields.get("sha256")) for s in out if isinstance(s, Send)]
    assert ("e3", "release", None) in sends and ("e3", "prepare", small.sha256) in sends
    standbys = [(slot.host, slot.stage.sha256) for slot in world.plane.slots.values()
                if slot.standby]
    assert standbys == [("e3", small.sha256)]
    assert "contingency.ready" not in kinds(out)
    # e1's loss, not covered, is planned once more, told that e3 had no room; the same
    # answer again ends it: the plans are ready and no third plan is asked
    world.plane.tick(world.now)
    (job,) = world.take(StartJob)
    assert job.request is not None and job.request.excluded == "e1"
    assert job.request.full == frozenset({"e3"}) and "no room on e3" in job.request.reason
    plan = Plan.of(world.instance, [Stage(0, 1, "e3"), Stage(1, 2, "e2")], "given", False)
    world.plane.job_done("contingency", Prepared(job.request, plan, [big, None], None), None,
                         world.now)
    out = world.take()
    assert kinds(out)[-1] == "contingency.ready"
    ready = out[-1]
    assert isinstance(ready, Event)
    staged = [(s.host, s.fields["models"]) for s in out if isinstance(s, Send)
              and s.kind == "stage"]
    if e3_disk:     # the 50 MiB file fits alone (with the 4 MiB reserve), not beside the 1
        assert staged == [] and ready.fields["staged"] == []
    else:
        assert staged == [("e3", [{"sha256": big.sha256, "size": big.size}])]
        assert ready.fields["staged"] == [f"e3:{big.sha256[:12]}"]
        assert world.plane.models[big.sha256] == big.path     # served to e3's agent
    world.plane.tick(world.now)
    assert not world.take(StartJob)


def test_a_disk_failure_is_a_disk_fault_planned_around() -> None:
    world = World(standby=False)
    world.serving()
    port = next(p for (h, p) in world.plane.slots if h == "e2")
    world.plane.on_worker("e2", {"port": port, "epoch": 1, "stage": 1, "state": "failed",
                                 "detail": "ENOSPC writing model", "reason": "disk"},
                          world.now)
    assert kinds(world.take())[:4] == ["disk.fault", "worker.failed", "node.unhealthy",
                                       "replan.requested"]


def test_a_returned_node_is_held_then_checked_for_a_better_plan() -> None:
    world = World(suspect_after_missed=3, rejoin_hold_s=2.0, standby=False)
    world.serving("e1", "e2")
    world.advance(0.5, beating=("e1", "e2"))          # e3 (a spare) goes silent
    out = world.advance(1.0)                            # and comes back
    assert "node.returned" in kinds(out) and not world.plane.usable("e3")
    out = world.advance(2.0)
    assert "node.stable" in kinds(out)
    job = next(a for a in out if isinstance(a, StartJob))
    assert job.kind == "rejoin" and job.request is not None and "e3" in job.request.live
    # the same placement back: declined by the margin rule, nothing deployed
    world.plane.job_done("rejoin", world.prepared("e1", "e2", "rejoin"), None, world.now)
    out = world.take()
    assert kinds(out) == ["rejoin.declined"] and not [a for a in out if isinstance(a, Send)]


def test_a_node_back_while_a_sound_epoch_deploys_waits_for_the_rejoin_rule() -> None:
    world = World(standby=False, unhealthy_hold_s=1.0, suspect_after_missed=100)
    world.serving()
    fail_worker(world, "e2", stage=1)
    world.plane.tick(world.now)
    world.take()
    world.plane.job_done("plan", world.prepared("e1", "e3", "failure"), None, world.now)
    sends = [s for s in world.take(Send) if s.kind == "deploy"]
    assert world.plane.deploying is not None and world.plane.deploying.number == 2
    out = world.advance(1.5, beating=())          # e2's back-off ends; epoch 2 still loads
    assert "node.healthy" in kinds(out) and "replan.requested" not in kinds(out)
    assert not [a for a in out if isinstance(a, StartJob)]
    for s in sends:                               # epoch 2 serves; then e2 is weighed
        world.plane.on_worker(s.host, {"port": s.fields["port"], "epoch": 2, "stage": 0,
                                       "state": "ready", "detail": "", "reason": "started"},
                              world.now)
    assert world.plane.active is not None and world.plane.active.number == 2
    world.plane.tick(world.now)
    jobs = world.take(StartJob)
    assert jobs and jobs[0].kind == "rejoin" and "e2" in jobs[0].request.live


def outage_with_a_slow_deploy(escape_estimate_s: float) -> tuple[World, list[Any]]:
    """e2's worker fails; the failure plan (e1, e3), epoch 2, is estimated to need 20 s to
    deploy, and nothing serves meanwhile. e2 is usable again 1.5 s later, and the plan with
    it is estimated at `escape_estimate_s`. The world, and what the plane did with it."""
    world = World(standby=False, unhealthy_hold_s=1.0, suspect_after_missed=100)
    world.serving()
    fail_worker(world, "e2", stage=1)
    world.plane.tick(world.now)
    world.take()
    slow = world.prepared("e1", "e3", "failure")
    slow.deploy_estimate_s = 20.0
    world.plane.job_done("plan", slow, None, world.now)
    world.take()
    out = world.advance(1.5, beating=())
    assert "node.healthy" in kinds(out) and "replan.requested" in kinds(out)
    (job,) = [a for a in out if isinstance(a, StartJob)]
    assert job.kind == "plan" and "nothing serves and epoch 2" in job.request.reason
    escape = world.prepared("e1", "e2", "failure")
    escape.deploy_estimate_s = escape_estimate_s
    world.plane.job_done("plan", escape, None, world.now)
    return world, world.take()


def test_while_nothing_serves_a_node_back_replaces_a_slow_deploy_if_it_serves_sooner() -> None:
    """The outage-escape rule (testbed.control.policy): 18.5 s are left of epoch 2's
    estimate; a plan with e2 that deploys in 1 s replaces it, one that needs 17 s does not
    (epoch 2 finishes, e2 is weighed by the rejoin rule once it serves)."""
    world, out = outage_with_a_slow_deploy(1.0)
    assert world.plane.deploying is not None and world.plane.deploying.number == 3
    assert "epoch.abandoned" in kinds(out)
    world, out = outage_with_a_slow_deploy(17.0)
    assert world.plane.deploying is not None and world.plane.deploying.number == 2
    (deferred,) = [a for a in out if isinstance(a, Event) and a.kind == "replan.deferred"]
    assert deferred.fields["deploying_epoch"] == 2 and "not sooner" in deferred.fields["reason"]
    assert world.plane.rejoin_hosts == {"e2"}


def fail_worker(world: World, host: str, epoch: int = 1, stage: int = 0) -> None:
    port = next(p for (h, p) in world.plane.slots if h == host)
    world.plane.on_worker(host, {"port": port, "epoch": epoch, "stage": stage,
                                 "state": "failed", "detail": "killed", "reason": "exit"},
                          world.now)


def confirm(world: World, sends: list[Send], epoch: int) -> None:
    for s in sends:
        if s.kind == "deploy":
            world.plane.on_worker(s.host, {"port": s.fields["port"], "epoch": epoch,
                                           "stage": 0, "state": "ready", "detail": "",
                                           "reason": "started"}, world.now)


def deploying_on_e3(world: World) -> list[Send]:
    """Epoch 1 on (e1, e2) serving, e1's worker fails, the re-plan puts both stages on e3:
    epoch 2 deploys, the broken epoch 1 still uses e2."""
    world.serving()
    fail_worker(world, "e1")
    world.plane.tick(world.now)
    (job,) = world.take(StartJob)
    assert job.kind == "plan"
    world.plane.job_done("plan", world.prepared("e3", "e3", "failure"), None, world.now)
    assert world.plane.deploying is not None and world.plane.deploying.number == 2
    return world.take(Send)


def test_a_fault_outside_the_deploying_epoch_lets_it_finish() -> None:
    world = World(standby=False)
    sends = deploying_on_e3(world)
    fail_worker(world, "e2")        # the broken epoch 1's other host; epoch 2 does not use it
    out = world.take()
    assert "replan.requested" not in kinds(out)
    (deferred,) = [a for a in out if isinstance(a, Event) and a.kind == "replan.deferred"]
    assert deferred.fields["deploying_epoch"] == 2
    world.plane.tick(world.now)
    assert world.take(StartJob) == [] and world.plane.deploying.number == 2
    confirm(world, sends, 2)
    assert world.plane.active is not None and world.plane.active.number == 2
    # epoch 1 was broken: its requests are replayed on epoch 2
    assert world.dispatcher.routes[-1][0].epoch == 2 and world.dispatcher.routes[-1][1]
    # the driver's request is never held
    world.take()
    fail_worker(world, "e3", epoch=2)
    world.plane.tick(world.now)
    world.take()
    world.plane.job_done("plan", world.prepared("e2", "e2", "failure"), None, world.now)
    world.plane.command({"cmd": "replan"}, world.now)
    assert "replan.requested" in kinds(world.take())


def test_a_fault_touching_the_deploying_epoch_replans() -> None:
    world = World(standby=False)
    deploying_on_e3(world)
    port = next(p for (h, p) in world.plane.slots if h == "e3")
    world.plane.on_worker("e3", {"port": port, "epoch": 2, "stage": 0, "state": "failed",
                                 "detail": "killed", "reason": "exit"}, world.now)
    out = world.take()
    assert "replan.requested" in kinds(out) and "replan.deferred" not in kinds(out)
    assert world.plane.deploying is not None and world.plane.deploying.broken
    world.plane.tick(world.now)
    (job,) = world.take(StartJob)
    assert job.request is not None and job.request.live == frozenset({"e2"})


def test_a_request_pending_while_an_epoch_was_planned_is_answered_by_it() -> None:
    world = World(standby=False)
    world.serving()
    fail_worker(world, "e1")
    world.plane.tick(world.now)
    assert [j.kind for j in world.take(StartJob)] == ["plan"]
    fail_worker(world, "e2")        # while the plan is computed: a second request waits
    assert "replan.requested" in kinds(world.take())
    world.plane.job_done("plan", world.prepared("e3", "e3", "failure"), None, world.now)
    sends = world.take(Send)
    world.plane.tick(world.now)
    out = world.take()
    # epoch 2 does not use e2 (a plan that did would have been stale): it answers the
    # second request too, which would otherwise have superseded it
    assert "replan.deferred" in kinds(out) and not [a for a in out if isinstance(a, StartJob)]
    confirm(world, sends, 2)
    assert world.plane.active is not None and world.plane.active.number == 2


def test_a_host_available_while_a_sound_epoch_deploys_is_weighed_after() -> None:
    world = World(standby=False)
    deploying_on_e3(world)
    # the driver's re-plan finds no plan: waiting for nodes, epoch 2 still deploys
    world.plane.command({"cmd": "replan"}, world.now)
    world.plane.tick(world.now)
    assert [j.kind for j in world.take(StartJob)] == ["plan"]
    world.plane.job_done("plan", None, InfeasibleError("no room"), world.now)
    assert world.plane.waiting_for_nodes and world.plane.deploying is not None
    world.take()
    # e2's agent restarts: its request for a plan is held, e2 is kept for the rejoin rule
    world.plane.on_hello("e2", {"pid": 7, "incarnation": "0123456789abcdef"}, world.now)
    out = world.take()
    assert "replan.requested" not in kinds(out)
    assert [e.fields["reason"] for e in out if isinstance(e, Event)
            and e.kind == "replan.deferred"][-1] == "e2 available"
    assert world.plane.rejoin_hosts == {"e2"}


def test_hosts_in_their_rejoin_hold_are_tried_at_once_when_no_plan_fits() -> None:
    world = World(standby=False, rejoin_hold_s=10.0)
    world.serving()
    world.plane.on_hello("e3", {"pid": 7, "incarnation": "0123456789abcdef"}, world.now)
    assert not world.plane.usable("e3")         # restarted: held while epoch 1 serves
    fail_worker(world, "e1")
    world.plane.tick(world.now)
    (job,) = world.take(StartJob)
    assert job.request is not None and "e3" not in job.request.live
    world.plane.job_done("plan", None, InfeasibleError("no room"), world.now)
    # nothing fits without e3, so its hold does not apply: it is planned with now, not in
    # ten seconds when its hold ends
    assert kinds(world.take())[-2:] == ["plan.infeasible", "replan.requested"]
    world.plane.tick(world.now)
    (job,) = world.take(StartJob)
    assert job.request is not None and "e3" in job.request.live


def test_stale_plans_are_dropped() -> None:
    world = World(standby=False)
    world.serving()
    port = next(p for (h, p) in world.plane.slots if h == "e2")
    world.plane.on_worker("e2", {"port": port, "epoch": 1, "stage": 1, "state": "failed",
                                 "detail": "x", "reason": "exit"}, world.now)
    world.plane.tick(world.now)
    world.take()
    # the plan comes back using e2, which failed meanwhile
    world.plane.job_done("plan", world.prepared("e1", "e2", "failure"), None, world.now)
    out = world.take()
    assert kinds(out)[0] == "plan.stale" and world.plane.active.number == 1


@pytest.mark.parametrize("cmd, error", [
    ({"cmd": "rollback"}, "nothing to roll back"),
    ({"cmd": "rollout", "version": 9}, "not known"),
    ({"cmd": "start_workload", "workload": {"seed": 99}}, "fixed by the config"),
])
def test_commands_refused_with_a_reason(cmd: dict[str, Any], error: str) -> None:
    world = World()
    world.serving()
    reply = world.plane.command(cmd, world.now)
    assert reply["ok"] is False and error in reply["error"]


def test_status_and_start() -> None:
    world = World()
    world.serving()
    status = world.plane.command({"cmd": "status"}, world.now)
    assert status["state"] == "ready" and status["epoch"] == 1
    assert status["nodes"]["e1"]["usable"] is True
    assert world.plane.command({"cmd": "start_workload"}, world.now)["ok"]
    assert world.dispatcher.state == "running"


def test_reconcile_asks_again_for_what_a_heartbeat_lacks_and_withdraws_the_rest() -> None:
    world = World(standby=False)
    world.serving()
    port = next(p for (h, p) in world.plane.slots if h == "e1")
    resend = world.plane.control.resend_s
    # e1 reports its worker without the epoch's route: asked again, but not before resend_s
    entry = {"port": port, "sha256": stage_file(0).sha256, "state": "ready", "routes": [],
             "standby": False, "load": None}
    world.now = 0.5
    world.plane.on_heartbeat("e1", {"host": "e1", "seq": 1, "workers": [entry]}, world.now)
    assert not world.take(Send)
    world.now = resend + 0.1
    world.plane.on_heartbeat("e1", {"host": "e1", "seq": 2, "workers": [entry]}, world.now)
    assert [(s.kind, s.fields["epoch"]) for s in world.take(Send)] == [("deploy", 1)]
    # a worker we do not know is released; a route of an epoch gone is withdrawn, once
    stray = {"port": 30999, "sha256": "f" * 64, "state": "ready", "routes": [],
             "standby": False, "load": None}
    old = {**entry, "routes": [[1, 0], [7, 0]]}
    world.plane.on_heartbeat("e1", {"host": "e1", "seq": 3, "workers": [old, stray]},
                             world.now)
    sends = sorted((s.kind, str(s.fields)) for s in world.take(Send))
    assert sends == [("release", "{'port': 30999}"), ("stop", "{'epoch': 7}")]
    world.plane.on_heartbeat("e1", {"host": "e1", "seq": 4, "workers": [old, stray]},
                             world.now)
    assert not world.take(Send)                      # rate-limited per action


def test_a_straggler_moves_the_pipeline_off_its_host() -> None:
    world = World(standby=False, straggler_factor=2.0, straggler_after_s=1.0)
    world.serving()
    port = next(p for (h, p) in world.plane.slots if h == "e2")
    planned = world.plane.active.compute_ms[1]
    entry = {"port": port, "sha256": stage_file(1).sha256, "state": "ready",
             "routes": [[1, 1]], "standby": False, "load": [10, 3 * planned]}
    out = []
    for t in (0.2, 0.7, 1.2):
        world.now = t
        world.plane.on_heartbeat("e2", {"host": "e2", "seq": 1, "workers": [entry]}, t)
        out += world.take()
    assert kinds(out) == ["node.straggler", "node.unhealthy", "replan.requested"]
    assert next(a for a in out if isinstance(a, Event)).fields["factor"] == 3.0
    world.beat("e1")
    world.beat("e3")
    world.plane.tick(world.now)                       # the others are beating: not broken
    job = world.take(StartJob)[0]
    assert job.request is not None and job.request.kind == "straggler"
    assert "e2" not in job.request.live


def test_pipelines_side_by_side_lose_one_and_the_other_serves_at_once() -> None:
    world = World(standby=False)
    world.plane.start()
    world.plane.job_done("bootstrap", ([{"x": 0}], [], world.info), None, world.now)
    world.hello_all()
    plan = Plan.of(world.instance, [Stage(0, 2, "e1"), Stage(0, 2, "e2")], "given", False,
                   chains=(1, 1))
    request = PlanRequest("initial", "initial", world.info, frozenset(EDGES))
    files = [StageFile(Path("/m/whole.onnx"), "c" * 64, 100, ["x"], ["y"])] * 2
    world.plane.job_done("initial", Prepared(request, plan, files, None), None, world.now)
    for s in world.take(Send):
        world.plane.on_worker(s.host, {"port": s.fields["port"], "epoch": 1, "stage": 0,
                                       "state": "ready", "detail": "", "reason": "started"},
                              world.now)
    assert world.plane.active is not None and len(world.dispatcher.routes[-1][0].heads) == 2
    world.take()
    port = next(p for (h, p) in world.plane.slots if h == "e2")
    world.plane.on_worker("e2", {"port": port, "epoch": 1, "stage": 0, "state": "failed",
                                 "detail": "x", "reason": "exit"}, world.now)
    world.plane.tick(world.now)
    out = world.take()
    # no planning job: the pipeline on e1 is the next epoch, every worker already serving
    assert not [a for a in out if isinstance(a, StartJob)]
    deployed = next(a for a in out if isinstance(a, Event) and a.kind == "plan.computed")
    assert deployed.fields["hosts"] == ["e1"] and deployed.fields["reused_stages"] == 1
    assert world.plane.improve == "1 of 2 pipelines left"     # a better plan is looked for
    route = next(a for a in out if isinstance(a, Send) and a.kind == "deploy")
    assert route.host == "e1" and route.fields["epoch"] == 2
    world.plane.on_worker("e1", {"port": route.fields["port"], "epoch": 2, "stage": 0,
                                 "state": "ready", "detail": "", "reason": "started"},
                          world.now)
    assert world.plane.active.number == 2 and world.dispatcher.retired == [1]
