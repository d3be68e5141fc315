"""A simulated cluster around the real `ControlPlane`: virtual clock, agents with heartbeats,
workers that fetch (over the host's link), verify and load their models (time proportional
to size, at the host's speed) and compute at the host's speed, links with bandwidth and
delay, disks with sizes, and a dispatcher that issues, times out, replays and de-duplicates
requests as testbed.control.dispatcher does. Everything is seeded: no threads, no sockets,
no sleeps, no wall clock.

Division of labour: the plane (testbed.control.plane) decides; the world carries out its
actions (`Send` reaches the host's agent after the link's delay, `StartJob` runs the real
planner (testbed.control.planning.Planner, with stage files described, not split) and answers
after a simulated time, `Event` goes to the trace) and feeds back what it observes (hellos,
heartbeats, worker reports, job outcomes, ticks), exactly where the ZeroMQ shell
(testbed.control.controller) would. Faults (testbed.control.sim.nemesis) act on hosts
through `World.fault`; the invariants (testbed.control.sim.checks) watch the trace and the
world's state.

The agent model follows stage_image.agent: `deploy`/`prepare` start or route a worker on a
port (a different model on a busy port is a `conflict`), `stop` withdraws an epoch's routes
and ends workers left with nothing, `release` ends a worker; a model is fetched unless it is
on the disk, written (first evicting, oldest first, cached models no worker on the host
holds, as the real agent does; ENOSPC when the disk is still full), checked and loaded; a
worker whose memory does not fit in the host's is killed (the cgroup's OOM kill). A worker
computes frames of the epochs it has a route for and drops the others.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from formats.control import ControlSettings
from partitioner.instance import Instance, Node, Plan, Segment
from partitioner.profile import FORKED_RUNTIME_BYTES
from stage_image.agent import choose_evictions
from testbed.control import events as ev
from testbed.control.core.actions import Event
from testbed.control.dispatcher import Route, Workload
from testbed.control.plane import ControlPlane
from testbed.control.plane_io import Send, StartJob
from testbed.control.planning import (
    Planner,
    PlanRequest,
    Prepared,
    StageFile,
    VersionInfo,
)
from testbed.control.state import ControllerConfig

MiB = 1 << 20
SOURCE = "dispatcher"
TICK_S = 0.05                   # the controller's loop wakes at least this often
JOB_S = {"bootstrap": 0.2, "version": 0.3, "initial": 0.05}    # else PLAN_JOB_S
PLAN_JOB_S = 0.03
VERIFY_BYTES_PER_S = 200e6      # SHA-256 at one full core
LOAD_BYTES_PER_S = 50e6         # onnxruntime session creation at one full core
LOAD_FIXED_S = 0.3              # interpreter and imports of a worker
ROUTE_S = 0.005                 # a route line on a running worker's stdin, then `routed`
STOP_S = 0.05                   # SIGTERM to exit
FETCH_RETRY_S = 5.0             # the agent's fetch timeout


# -- the cluster ------------------------------------------------------------------------------

@dataclass(frozen=True)
class HostSpec:
    name: str
    speed: float                # cores
    memory_bytes: int           # the planner's figure (one stage; the runtime is on top)
    disk_bytes: int
    delay_s: float              # one way, host <-> switch


@dataclass(frozen=True)
class Cluster:
    """What the world simulates and the planner plans for."""

    hosts: list[HostSpec]
    instance: Instance

    @classmethod
    def random(cls, rng: random.Random, tight: bool = False) -> Cluster:
        """A small heterogeneous cluster: 4-6 hosts, a model of 4-7 segments. Hosts hold
        about three workers and a dozen stage files, or with `tight` (the issue's 64 MiB
        disks) one or two workers and a few files."""
        segments = [Segment(round(rng.uniform(4, 30), 2), rng.randint(2, 16) * MiB,
                            rng.randint(8, 200) * 1000) for _ in range(rng.randint(4, 7))]
        # a stage file's weights take on disk what they take in memory (stage_bytes)
        segments = [replace(s, model_bytes=s.memory_bytes) for s in segments]
        hosts = []
        for i in range(rng.randint(4, 6)):
            memory = rng.randint(60, 300) * MiB if tight else rng.randint(350, 600) * MiB
            disk = rng.randint(3, 8) * 24 * MiB if tight else rng.randint(40, 80) * 24 * MiB
            hosts.append(HostSpec(f"edge{i + 1}", round(rng.uniform(0.3, 1.0), 2), memory,
                                  disk, rng.uniform(0.0005, 0.005)))
        names = [SOURCE] + [h.name for h in hosts]
        bandwidth = {(a, b): float(rng.choice((50, 100, 200, 1000)))
                     for a, b in itertools.combinations(names, 2)}
        instance = Instance(segments, rng.randint(50, 600) * 1000,
                            [Node(h.name, h.speed, h.memory_bytes, h.disk_bytes)
                             for h in hosts], SOURCE, bandwidth, frame_overhead_ms=1.5)
        return cls(hosts, instance)


def model_sha(version: int, first: int, end: int) -> str:
    return hashlib.sha256(f"v{version}:{first}:{end}".encode()).hexdigest()


def stage_bytes(instance: Instance, first: int, end: int) -> int:
    """A stage file's size: its weights, taken as its segments' memory."""
    return sum(s.memory_bytes for s in instance.segments[first:end])


@dataclass
class SimPlanner(Planner):
    """The real planner (solver, repairs, reuse rule), with stage files described instead of
    split, and no wall-clock figures in what it returns (the trace must be reproducible).
    The solver's plan is a function of the instance it is given (and the planner's fixed
    settings), and the instances repeat: every epoch's contingency plans ask again for the
    same live sets, and a published version has the same instance as the one before it.
    `solved` remembers the answers by the instance's full contents (its repr: every field,
    floats exactly), so a repeat is the same plan, not a similar one. The solves are most of
    a schedule's time (5-10 ms each, about a dozen distinct ones per schedule)."""

    solved: dict[tuple[str, int], Plan] = field(default_factory=dict)

    def stage_files(self, version: VersionInfo, plan: Plan,
                    ) -> tuple[list[StageFile], Path, bool]:
        files = [StageFile(Path(f"v{version.version}/{s.first}_{s.end}.onnx"),
                           model_sha(version.version, s.first, s.end),
                           stage_bytes(version.instance, s.first, s.end), ["in"], ["out"])
                 for s in plan.stages]
        return files, Path(f"v{version.version}"), True

    def solve(self, version: VersionInfo, instance: Instance, spare: int = 0) -> Plan:
        key = (repr(instance), spare)
        if key not in self.solved:
            self.solved[key] = replace(super().solve(version, instance, spare), solve_s=None)
        return self.solved[key]

    def prepare(self, req: PlanRequest) -> Prepared:
        prepared = super().prepare(req)
        prepared.solve_s = prepared.split_s = 0.0
        return prepared


@dataclass(frozen=True)
class Manifest:
    """A published model version, as testbed.control.repository's manifest looks to the
    plane."""

    version: int
    sha256: str
    source: str
    published: str


# -- hosts ------------------------------------------------------------------------------------

@dataclass
class Worker:
    port: int
    version: int
    sha256: str
    size: int
    first: int
    end: int
    standby: bool
    routes: dict[int, tuple[int, str]] = field(default_factory=dict)   # epoch -> stage, next
    confirmed: set[int] = field(default_factory=set)
    state: str = "fetching"     # fetching | starting | ready | exited | failed
    stopping: bool = False
    window: tuple[float, int, float] = (0.0, 0, 0.0)     # start, frames, compute ms
    load: tuple[int, float] | None = None

    @property
    def alive(self) -> bool:
        return self.state in ("fetching", "starting", "ready") and not self.stopping

    @property
    def memory(self) -> int:
        return FORKED_RUNTIME_BYTES + self.size


@dataclass
class Host:
    spec: HostSpec
    up: bool = True
    paused: bool = False
    partitioned: bool = False
    slow: float = 1.0
    disk_filler: int = 0
    incarnation: int = 1
    pid: int = 1000
    workers: dict[int, Worker] = field(default_factory=dict)
    disk: dict[str, int] = field(default_factory=dict)       # sha256 -> bytes on disk
    staged: dict[str, int] = field(default_factory=dict)     # kept on disk, no worker
    cpu_queue: deque[tuple[Worker, Frame]] = field(default_factory=deque)
    cpu_busy: bool = False
    held: list[tuple[Callable[..., None], tuple[Any, ...]]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def memory_limit(self) -> int:
        return self.spec.memory_bytes + FORKED_RUNTIME_BYTES

    @property
    def disk_free(self) -> int:
        return self.spec.disk_bytes - self.disk_filler - sum(self.disk.values())

    @property
    def reachable(self) -> bool:
        return self.up and not self.partitioned

    @property
    def healthy(self) -> bool:
        return self.up and not (self.paused or self.partitioned or self.slow > 1.0
                                or self.disk_filler)


# -- the dispatcher ---------------------------------------------------------------------------

@dataclass
class Request:
    rid: int
    index: int
    epoch: int = 0
    attempts: int = 0
    sent: float = 0.0
    last_send: float = 0.0
    status: str = "pending"     # pending | completed | lost
    answers: int = 0            # results delivered to the user (must stay <= 1)


@dataclass(frozen=True)
class Frame:
    rid: int
    epoch: int
    version: int
    sent: float
    done: tuple[tuple[int, int, int], ...] = ()     # (version, first, end) computed so far


class SimDispatcher:
    """testbed.control.dispatcher.Dispatcher's rules on the virtual clock (DispatcherPort)."""

    sink_address = "tcp://dispatcher:19000"
    keys = None

    def __init__(self, world: World) -> None:
        self.world = world
        self.pool: list[Any] = []
        self.references: set[int] = set()
        self.state = "idle"
        self.workload: Workload | None = None
        self.route: Route | None = None
        self.next_head = 0
        self.requests: list[Request] = []
        self.pending: dict[int, Request] = {}
        self.retired: set[int] = set()
        self.completed = self.lost = self.mismatched = self.duplicates = 0
        self.stale_results = self.replays = 0
        # (done, attempt seconds) of the last 5 s, only those no later attempt outlasts: the
        # longest is the first (a sliding-window maximum, not a scan of every answer per tick)
        self.recent: deque[tuple[float, float]] = deque()
        self.done_times: list[float] = []
        self.drain_deadline = 0.0

    def set_pool(self, pool: list[Any]) -> None:
        self.pool = pool

    def add_version(self, version: int, references: Any) -> None:
        self.references.add(version)

    def switch(self, route: Route, replay: bool = True) -> int:
        if route.version not in self.references:
            raise ValueError(f"no references for version {route.version}")
        if not route.heads:
            raise ValueError("a route needs at least one stage 0")
        self.route, self.next_head = route, 0
        return self.replay_epochs(None, "epoch") if replay else 0

    def replay_epochs(self, epochs: set[int] | None, reason: str) -> int:
        replayed = 0
        for request in sorted(self.pending.values(), key=lambda r: r.rid):
            if epochs is None or request.epoch in epochs:
                replayed += request.attempts > 0
                self.send(request)
        if replayed:
            self.world.record("requests.replayed", reason=reason, count=replayed)
        return replayed

    def retire(self, epoch: int) -> None:
        self.retired.add(epoch)

    def in_flight_on(self, epoch: int) -> int:
        return sum(1 for r in self.pending.values() if r.epoch == epoch and r.attempts)

    def start(self, workload: Workload) -> None:
        if self.state != "idle":
            raise RuntimeError(f"workload already {self.state}")
        if self.route is None or not self.pool:
            raise RuntimeError("no active epoch yet")
        self.workload, self.state = workload, "running"

    def status(self) -> dict[str, Any]:
        return {"sent": len(self.requests), "completed": self.completed, "lost": self.lost}

    # -- the loop's work -------------------------------------------------------------------

    def pump(self, now: float) -> None:
        w = self.workload
        if w is None:
            return
        if self.state == "running":
            while len(self.pending) < w.concurrency:
                request = Request(len(self.requests), len(self.requests) % len(self.pool))
                self.requests.append(request)
                self.pending[request.rid] = request
                self.send(request)
        if self.state == "draining" and (not self.pending or now >= self.drain_deadline):
            self.finish()
            return
        timeout = self.timeout_s(now)
        for request in sorted(self.pending.values(), key=lambda r: r.rid):
            if now - request.last_send > timeout:
                self.replays += 1
                self.send(request)

    def timeout_s(self, now: float) -> float:
        assert self.workload is not None
        while self.recent and self.recent[0][0] < now - 5.0:
            self.recent.popleft()
        return max(self.workload.timeout_s, 3.0 * (self.recent[0][1] if self.recent else 0.0))

    def send(self, request: Request) -> None:
        """Send (again) on the current route; a frame to a head that is gone is lost and
        times out (the real PUSH socket's TCP connection to a dead host stays up)."""
        route, now = self.route, self.world.now
        if request.attempts == 0:
            request.sent = now
        request.attempts += 1
        request.last_send = now
        if route is None:
            return
        request.epoch = route.epoch
        head = route.heads[self.next_head % len(route.heads)].address
        self.next_head += 1
        self.world.send_frame(SOURCE, head, Frame(request.rid, route.epoch, route.version,
                                                  now), self.world.instance.input_bytes)

    def stop_issuing(self, now: float, drain_s: float) -> None:
        if self.state == "running":
            self.state, self.drain_deadline = "draining", now + drain_s

    def finish(self) -> None:
        for request in self.pending.values():
            request.status = "lost"
        self.lost += len(self.pending)
        self.pending.clear()
        self.state = "done"

    def on_result(self, frame: Frame) -> None:
        now = self.world.now
        if frame.epoch in self.retired:
            self.stale_results += 1
            return
        request = self.requests[frame.rid]
        if request.status != "pending":
            self.duplicates += 1
            return
        request.status, request.answers = "completed", request.answers + 1
        request.epoch = frame.epoch
        del self.pending[frame.rid]
        self.completed += 1
        self.done_times.append(now)
        expected, covered = frame.version, 0
        for version, first, end in frame.done:
            if version != expected or first != covered:
                break
            covered = end
        if covered != len(self.world.instance.segments) or frame.version not in self.references:
            self.mismatched += 1
            self.world.violation("mismatch", f"request {frame.rid}: result of epoch "
                                 f"{frame.epoch} computed as {list(frame.done)}")
        took = now - frame.sent
        while self.recent and self.recent[-1][1] <= took:
            self.recent.pop()
        self.recent.append((now, took))


# -- the world --------------------------------------------------------------------------------

def settings_for_sim() -> ControlSettings:
    """The shipped defaults, with the unhealthy back-off at the rejoin hold's base so that a
    schedule settles in tens of simulated seconds rather than minutes."""
    return ControlSettings(unhealthy_hold_s=5.0)


class World:
    def __init__(self, cluster: Cluster, seed: int,
                 settings: ControlSettings | None = None, concurrency: int | None = None) -> None:
        self.cluster, self.instance = cluster, cluster.instance
        self.rng = random.Random(seed)
        self.now = 0.0
        self.queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self.seq = itertools.count()
        self.hosts = {h.name: Host(h) for h in cluster.hosts}
        self.trace: list[tuple[float, str, dict[str, Any]]] = []
        self.violations: list[tuple[float, str, str]] = []
        self.observers: list[Callable[[str, dict[str, Any]], None]] = []
        self.link_free: dict[tuple[str, str], float] = {}
        # per frame, what does not change in a run: addresses parsed, links' bandwidth and
        # delay (looked up once per pair)
        self.addresses: dict[str, tuple[str, int]] = {}
        self.mbps: dict[tuple[str, str], float] = {}
        self.delays: dict[tuple[str, str], float] = {}
        self.settings = settings or settings_for_sim()
        workload = Workload(concurrency=concurrency or 2 * len(self.hosts) + 4,
                            duration_s=1e9, timeout_s=5.0)
        hosts = {h: h for h in self.hosts}
        self.cfg = ControllerConfig(Path("sim"), Path("sim/model.onnx"),
                                    Path("sim/instance.json"), hosts, SOURCE,
                                    control=self.settings, workload=workload)
        self.dispatcher = SimDispatcher(self)
        self.planner = SimPlanner(Path("sim"), "optimal", 2.0, 0,
                                  self.settings.reuse_tolerance)
        self.plane = ControlPlane(self.cfg, set(self.hosts), self.dispatcher)
        self.versions: dict[int, VersionInfo] = {}
        self.next_version = 2
        self.job_seq = 0

    # -- the clock ---------------------------------------------------------------------------

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self.queue, (max(t, self.now), next(self.seq), fn, args))

    def run_until(self, t: float) -> None:
        while self.queue and self.queue[0][0] <= t:
            when, _, fn, args = heapq.heappop(self.queue)
            self.now = when
            fn(*args)
        self.now = max(self.now, t)

    def record(self, kind: str, /, **fields: Any) -> None:
        self.trace.append((round(self.now, 6), kind, fields))
        for observer in self.observers:
            observer(kind, fields)

    def violation(self, kind: str, detail: str) -> None:
        self.violations.append((round(self.now, 3), kind, detail))
        self.record("violation", kind=kind, detail=detail)

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        self.plane.start()
        self.execute()
        for host in self.hosts.values():
            self.boot(host, self.rng.uniform(0.05, 0.4))
        self.at(TICK_S, self.tick)

    def tick(self) -> None:
        self.plane.tick(self.now)
        self.execute()
        self.dispatcher.pump(self.now)
        self.at(self.now + TICK_S, self.tick)

    def command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        reply = self.plane.command(cmd, self.now)
        self.execute()
        return reply

    # -- carrying out the plane's actions ------------------------------------------------------

    def execute(self) -> None:
        for action in self.plane.take():
            if isinstance(action, Event):
                ev.check(action.kind, action.fields)
                self.record(action.kind, **action.fields)
            elif isinstance(action, Send):
                self.to_agent(action)
            elif isinstance(action, StartJob):
                self.start_job(action)

    def start_job(self, job: StartJob) -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = self.run_job(job)
        except Exception as exc:  # noqa: BLE001 - the plane decides what a failure means
            error = exc
        self.job_seq += 1
        self.at(self.now + JOB_S.get(job.kind, PLAN_JOB_S), self.job_done, job.kind, result,
                error, self.job_seq)

    def run_job(self, job: StartJob) -> Any:
        if job.kind == "bootstrap":
            info = VersionInfo(1, Path("sim/model.onnx"), model_sha(1, 0, 0), self.instance,
                               "sim")
            self.versions[1] = info
            return list(range(8)), None, info
        if job.kind == "initial":
            return self.planner.prepare(PlanRequest("initial", "initial",
                                                    self.plane.infos[self.cfg.version],
                                                    frozenset(self.plane.nodes)))
        if job.kind == "version":
            manifest: Manifest = job.manifest
            return self.versions[manifest.version], None
        assert job.request is not None
        return self.planner.prepare(job.request)

    def job_done(self, kind: str, result: Any, error: BaseException | None, _n: int) -> None:
        self.plane.job_done(kind, result, error, self.now)
        self.execute()

    def publish(self) -> int:
        """A new model version in the repository (same graph, new weights)."""
        number, self.next_version = self.next_version, self.next_version + 1
        self.versions[number] = VersionInfo(number, Path(f"sim/v{number}.onnx"),
                                            model_sha(number, 0, 0), self.instance, "sim")
        self.plane.repository([Manifest(number, model_sha(number, 0, 0), "sim", "")], [],
                              self.now)
        self.execute()
        return number

    # -- the network ---------------------------------------------------------------------------

    def delay(self, a: str, b: str) -> float:
        delay = self.delays.get((a, b))
        if delay is None:
            delay = self.delays[(a, b)] = sum(self.hosts[h].spec.delay_s for h in (a, b)
                                              if h in self.hosts)
        return delay

    def connected(self, a: str, b: str) -> bool:
        ha, hb = self.hosts.get(a), self.hosts.get(b)
        return (ha is None or ha.reachable) and (hb is None or hb.reachable)

    def to_agent(self, send: Send) -> None:
        host = self.hosts[send.host]
        if self.connected(SOURCE, host.name):
            self.at(self.now + self.delay(SOURCE, host.name), self.on_host, host,
                    host.incarnation, self.agent_message, send)

    def to_plane(self, host: Host, kind: str, fields: dict[str, Any]) -> None:
        if self.connected(host.name, SOURCE):
            self.at(self.now + self.delay(host.name, SOURCE), self.plane_message, host.name,
                    kind, fields)

    def plane_message(self, host: str, kind: str, fields: dict[str, Any]) -> None:
        if not self.connected(host, SOURCE):
            return                      # cut off on the way
        if kind == "hello":
            self.plane.on_hello(host, fields, self.now)
        elif kind == "heartbeat":
            self.plane.on_heartbeat(host, fields, self.now)
        else:
            self.plane.on_worker(host, fields, self.now)
        self.execute()

    def send_frame(self, src: str, address: str, frame: Frame, nbytes: int) -> None:
        """A data frame from `src` to a worker's address (or the sink): serialised on the
        link at its bandwidth, then the path's delay."""
        parsed = self.addresses.get(address)
        if parsed is None:
            parsed = self.addresses[address] = parse_address(address)
        dst, port = parsed
        if not self.connected(src, dst):
            return
        mbps = self.mbps.get((src, dst))
        if mbps is None:
            mbps = self.mbps[(src, dst)] = self.instance.bandwidth(src, dst) or 0.0
        wire = 0.0 if mbps == float("inf") else nbytes * 8 / (mbps * 1e6) if mbps else 1e9
        start = max(self.now, self.link_free.get((src, dst), 0.0))
        self.link_free[(src, dst)] = start + wire
        self.at(start + wire + self.delay(src, dst), self.deliver_frame, dst, port, frame)

    def deliver_frame(self, dst: str, port: int, frame: Frame) -> None:
        if dst == SOURCE:
            self.dispatcher.on_result(frame)
            return
        host = self.hosts[dst]
        if host.reachable:
            self.on_host(host, host.incarnation, self.worker_frame, port, frame)

    # -- hosts ---------------------------------------------------------------------------------

    def on_host(self, host: Host, incarnation: int, fn: Callable[..., None],
                *args: Any) -> None:
        """Run `fn` on the host, if it still runs the incarnation it was meant for; a paused
        host runs it when it resumes."""
        if not host.up or host.incarnation != incarnation:
            return
        if host.paused:
            host.held.append((fn, (host, *args)))
            return
        fn(host, *args)

    def boot(self, host: Host, after: float) -> None:
        self.at(self.now + after, self.on_host, host, host.incarnation, self.hello)

    def hello(self, host: Host) -> None:
        self.to_plane(host, "hello", {"host": host.name, "pid": host.pid, "ip": host.name})
        self.heartbeat(host)

    def heartbeat(self, host: Host) -> None:
        workers = []
        for w in host.workers.values():
            self.roll_window(w)
            workers.append({"port": w.port, "sha256": w.sha256, "state": w.state,
                            "standby": w.standby,
                            "load": list(w.load) if w.load is not None else None,
                            "routes": [[e, w.routes[e][0]] for e in sorted(w.confirmed)
                                       if e in w.routes]})
        self.to_plane(host, "heartbeat", {"host": host.name, "seq": 0, "workers": workers})
        self.at(self.now + self.settings.heartbeat_s, self.on_host, host, host.incarnation,
                self.heartbeat)

    def report(self, host: Host, w: Worker, state: str, detail: str = "",
               reason: str | None = None, epochs: list[int] | None = None) -> None:
        if state in ("exited", "failed"):
            w.state = state
        extra = {"reason": reason} if reason else {}
        for epoch in epochs if epochs is not None else sorted(w.routes) or [0]:
            stage = w.routes[epoch][0] if epoch in w.routes else 0
            self.to_plane(host, "worker", {"port": w.port, "epoch": epoch, "stage": stage,
                                           "state": state, "detail": detail, **extra})

    def agent_message(self, host: Host, send: Send) -> None:
        f = send.fields
        if send.kind in ("deploy", "prepare"):
            self.on_deploy(host, f)
        elif send.kind == "stop":
            for w in list(host.workers.values()):
                if f["epoch"] == -1:
                    w.routes.clear()
                    w.standby = False
                else:
                    w.routes.pop(f["epoch"], None)
                    w.confirmed.discard(f["epoch"])
                if not w.routes and not w.standby:
                    self.terminate(host, w)
        elif send.kind == "release":
            w = host.workers.get(f["port"])
            if w is not None:
                w.standby = False
                w.routes.clear()
                self.terminate(host, w)
        elif send.kind == "stage":
            host.staged = {m["sha256"]: m["size"] for m in f["models"]}
            mbps = self.instance.bandwidth(SOURCE, host.name) or 1.0
            for sha, size in host.staged.items():
                if sha not in host.disk and sha in self.plane.models:
                    took = 2 * self.delay(SOURCE, host.name) + size * 8 / (mbps * 1e6)
                    self.at(self.now + took, self.on_host, host, host.incarnation,
                            self.staged_fetched, sha, size)

    def on_deploy(self, host: Host, f: dict[str, Any]) -> None:
        port, epoch = f["port"], f.get("epoch")
        route = (f["stage"], f["next"]) if epoch is not None else None
        w = host.workers.get(port)
        if w is not None and w.state in ("exited", "failed") and not w.stopping:
            del host.workers[port]
            w = None
        if w is None:
            first, end = self.segments_of(f["sha256"], f["version"])
            w = Worker(port, f["version"], f["sha256"], f["size"], first, end,
                       standby=route is None)
            if route is not None:
                w.routes[epoch] = route
            host.workers[port] = w
            self.ensure_model(host, w)
            return
        if w.sha256 != f["sha256"] or w.version != f["version"] or not w.alive:
            self.to_plane(host, "worker", {
                "port": port, "epoch": epoch or 0, "stage": f.get("stage", 0),
                "state": "failed", "reason": "conflict",
                "detail": f"port {port} is still held by model {w.sha256[:12]}"})
            return
        if route is None:
            w.standby = True
            return
        if w.routes.get(epoch) == route:
            if epoch in w.confirmed:
                self.report(host, w, "ready", reason="started", epochs=[epoch])
            return
        w.routes[epoch] = route
        w.confirmed.discard(epoch)
        w.standby = False
        if w.state == "ready":
            self.at(self.now + ROUTE_S, self.on_host, host, host.incarnation, self.routed, w,
                    epoch)

    def segments_of(self, sha: str, version: int) -> tuple[int, int]:
        n = len(self.instance.segments)
        for first in range(n):
            for end in range(first + 1, n + 1):
                if model_sha(version, first, end) == sha:
                    return first, end
        raise ValueError(f"unknown model {sha[:12]}")

    def routed(self, host: Host, w: Worker, epoch: int) -> None:
        if host.workers.get(w.port) is w and w.alive and epoch in w.routes and \
                epoch not in w.confirmed:
            w.confirmed.add(epoch)
            self.report(host, w, "ready", reason="started", epochs=[epoch])

    def terminate(self, host: Host, w: Worker) -> None:
        if w.state in ("starting", "ready") and not w.stopping:
            w.stopping = True
            self.at(self.now + STOP_S, self.on_host, host, host.incarnation, self.stopped, w)
        elif not w.stopping and host.workers.get(w.port) is w:
            del host.workers[w.port]

    def stopped(self, host: Host, w: Worker) -> None:
        if w.state != "failed":
            self.report(host, w, "exited", "stopped (exit code 0)", "stopped", epochs=[0])
        if host.workers.get(w.port) is w:
            del host.workers[w.port]

    def ensure_model(self, host: Host, w: Worker) -> None:
        if w.sha256 in host.disk:
            self.at(self.now + w.size / (VERIFY_BYTES_PER_S * host.spec.speed), self.on_host,
                    host, host.incarnation, self.load_worker, w)
            return
        if w.sha256 not in self.plane.models:
            self.report(host, w, "failed", f"model {w.sha256[:12]}: unknown sha256", "fetch")
            return
        mbps = self.instance.bandwidth(SOURCE, host.name) or 1.0
        took = 2 * self.delay(SOURCE, host.name) + w.size * 8 / (mbps * 1e6)
        self.at(self.now + took, self.on_host, host, host.incarnation, self.fetched, w)

    def fetched(self, host: Host, w: Worker) -> None:
        if host.workers.get(w.port) is not w or w.stopping:
            return
        if not host.reachable or not self.connected(SOURCE, host.name):
            self.at(self.now + FETCH_RETRY_S, self.on_host, host, host.incarnation,
                    self.retry_fetch, w)
            return
        if w.sha256 not in host.disk:
            if not self.make_room(host, w.sha256, w.size):
                if not host.disk_filler:
                    self.violation("disk", f"{host.name}: no room for model {w.sha256[:12]} "
                                   f"({w.size} bytes, {host.disk_free} free, "
                                   f"{len(host.disk)} models cached)")
                self.report(host, w, "failed", "ENOSPC: No space left on device (writing "
                            "model)", "disk")
                return
            host.disk[w.sha256] = w.size
        self.at(self.now + w.size / (VERIFY_BYTES_PER_S * host.spec.speed), self.on_host,
                host, host.incarnation, self.load_worker, w)

    def staged_fetched(self, host: Host, sha: str, size: int) -> None:
        """A staged model arrived: written as the agent would, never over a worker's."""
        if host.staged.get(sha) == size and sha not in host.disk and \
                self.make_room(host, sha, size):
            host.disk[sha] = size

    def make_room(self, host: Host, sha: str, size: int) -> bool:
        """As the agent: evict models no live worker holds, staged ones last; True when
        `size` bytes then fit."""
        cached = [(other, n, order) for order, (other, n) in enumerate(host.disk.items())]
        # a failed or stopping worker holds no model (a disk fault's failed workers stay
        # listed, and once kept their models from eviction)
        keep = {other.sha256 for other in host.workers.values() if other.alive}
        for victim in choose_evictions(cached, keep, host.disk_free, size,
                                       frozenset(host.staged) - {sha}):
            del host.disk[victim]
        return host.disk_free >= size

    def retry_fetch(self, host: Host, w: Worker) -> None:
        if host.workers.get(w.port) is w and w.state == "fetching" and not w.stopping:
            self.ensure_model(host, w)

    def load_worker(self, host: Host, w: Worker) -> None:
        if host.workers.get(w.port) is not w or w.stopping or w.state != "fetching":
            return
        w.state = "starting"
        took = LOAD_FIXED_S + w.size / (LOAD_BYTES_PER_S * host.spec.speed) * host.slow
        self.at(self.now + took, self.on_host, host, host.incarnation, self.worker_ready, w)

    def worker_ready(self, host: Host, w: Worker) -> None:
        if host.workers.get(w.port) is not w or w.stopping or w.state != "starting":
            return
        used = sum(o.memory for o in host.workers.values()
                   if o is not w and o.state in ("ready", "starting") and not o.stopping)
        if used + w.memory > host.memory_limit:
            self.violation("memory", f"{host.name}: worker v{w.version} "
                           f"[{w.first}, {w.end}) on port {w.port} needs {w.memory >> 20} "
                           f"MiB, {used >> 20} of {host.memory_limit >> 20} MiB in use")
            self.report(host, w, "failed", "killed by signal 9 (out of memory)", "exit")
            w.confirmed.clear()
            return
        w.state = "ready"
        w.window = (self.now, 0, 0.0)
        w.confirmed = set(w.routes)
        self.report(host, w, "ready", reason="started",
                    epochs=sorted(w.confirmed) if w.routes else [0])

    # -- frames ------------------------------------------------------------------------------

    def worker_frame(self, host: Host, port: int, frame: Frame) -> None:
        w = host.workers.get(port)
        if w is None or w.state != "ready" or w.stopping or frame.epoch not in w.routes:
            return                          # no such worker, or a frame of another epoch
        host.cpu_queue.append((w, frame))
        if not host.cpu_busy:
            self.next_frame(host)

    def next_frame(self, host: Host) -> None:
        """The host's CPU takes the next frame, at the speed it has now (one at a time,
        first come first served, whichever worker it is for)."""
        if not host.cpu_queue:
            return
        w, frame = host.cpu_queue.popleft()
        segments = self.instance.segments[w.first:w.end]
        compute_s = (sum(s.compute_ms for s in segments)
                     + self.instance.stage_overhead_ms(w.first)) \
            / host.spec.speed * host.slow / 1000.0
        host.cpu_busy = True
        self.at(self.now + compute_s, self.on_host, host, host.incarnation, self.computed, w,
                frame, compute_s)

    def computed(self, host: Host, w: Worker, frame: Frame, compute_s: float) -> None:
        host.cpu_busy = False
        self.next_frame(host)
        if host.workers.get(w.port) is not w or w.state != "ready":
            return
        route = w.routes.get(frame.epoch)
        if route is None:
            return
        start, frames, ms = w.window
        w.window = (start, frames + 1, ms + 1000 * compute_s)
        self.roll_window(w)
        out = Frame(frame.rid, frame.epoch, frame.version, frame.sent,
                    (*frame.done, (w.version, w.first, w.end)))
        self.send_frame(host.name, route[1], out, self.instance.segments[w.end - 1].output_bytes)

    def roll_window(self, w: Worker) -> None:
        start, frames, ms = w.window
        if self.now - start >= 1.0:
            w.load = (frames, ms / frames if frames else 0.0)
            w.window = (self.now, 0, 0.0)

    # -- faults (testbed.control.sim.nemesis decides which, and when) --------------------------

    def fault(self, action: str, target: str, params: dict[str, Any]) -> None:
        self.record("fault", action=action, target=target, **params)
        if action == "publish":
            self.publish()
        elif action == "rollback":
            self.command({"cmd": "rollback"})
        else:
            self.host_fault(self.hosts[target], action, params)
        self.record("fault.done", action=action, target=target)

    def host_fault(self, host: Host, action: str, params: dict[str, Any]) -> None:
        if action == "crash":
            host.up = False
            host.workers.clear()
            host.held.clear()
            host.cpu_queue.clear()
            host.cpu_busy = False
        elif action == "restart":
            # the machine boots again (link up, agent started): a new incarnation, no workers,
            # the disk as it was
            host.up, host.paused = True, False
            host.incarnation += 1
            host.pid += 1
            host.workers.clear()
            host.staged.clear()
            host.held.clear()
            host.cpu_queue.clear()
            host.cpu_busy = False
            self.boot(host, self.rng.uniform(0.2, 1.0))
        elif action == "pause":
            host.paused = True
        elif action == "resume":
            if host.paused:
                host.paused = False
                held, host.held = host.held, []
                for fn, args in held:
                    self.at(self.now, self.on_host, host, host.incarnation, fn, *args[1:])
        elif action == "partition":
            host.partitioned = True
        elif action == "heal":
            host.partitioned = False
        elif action == "slow":
            host.slow = float(params["factor"])
        elif action == "fast":
            host.slow = 1.0
        elif action == "disk_full":
            host.disk_filler = max(0, host.disk_free) + host.disk_filler
        elif action == "disk_free":
            host.disk_filler = 0
        else:
            raise ValueError(f"unknown fault {action!r}")


def parse_address(address: str) -> tuple[str, int]:
    """tcp://HOST:PORT (the plane's addresses use host names as IPs here)."""
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    return host, int(port)
