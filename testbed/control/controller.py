"""The controller: `python -m testbed.control.controller CONFIG.json`, on the dispatcher host.

This module is the ZeroMQ shell: it binds the sockets, reads the clock, validates every
frame, feeds what arrives to testbed.control.plane.ControlPlane (which decides everything
described below, pure) and carries out its actions: messages to agents, events.jsonl lines,
jobs in the job thread (solving, splitting, hashing), model chunks served to agents.

Division of labour (Kubernetes-shaped): the controller is scheduler + controller-manager. It
decides where stages run and when that changes; the heavy work behind a decision (solving,
splitting, hashing, reference outputs) runs in a job thread (testbed.control.planning), the choice
among candidate plans follows testbed.control.policy, model versions come from a repository
directory
(testbed.control.repository). Agents (stage_image.agent) only execute; the dispatcher
(testbed.control.dispatcher, in this process) feeds and checks the pipeline; the driver
(testbed.experiment.driver) is the experimenter and talks to us over a REP socket.

Workers and epochs. A worker is a process on a host, known by (host, data port), holding one
stage model of one version; it serves that stage for one or more epochs (a route each: where
its output goes), or none (a warm standby). Every deployment is an *epoch*: a plan whose
stages are workers. An epoch goes waiting (for its agents' hello) -> deploying (every route
asked for) -> active (all routes confirmed: the dispatcher switches to its stage 0) ->
draining or retired (its routes withdrawn). Reconciliation is level-triggered: every heartbeat
lists each worker of a host with its confirmed routes; what we want and it lacks is asked for
again, what it has and we do not want (a retired epoch's route, a worker we forgot because its
node was lost) is withdrawn. A node that was only cut off therefore never serves a stale
epoch when it comes back: its workers lose the routes of retired epochs (and drop their
frames) as soon as its first heartbeat arrives.

Failures. A host silent for `suspect_after_missed` heartbeat intervals is suspected
(`node.suspected`); a worker dying is reported by its agent at once (`worker.failed`). Its
workers are forgotten, every epoch that used one is broken, and a re-plan starts at once
(after `replan_delay_s` when set: the simulated Kubernetes wait), unless a sound epoch is
being deployed that the failure does not touch: it is let finish (`replan.deferred`; under
overlapping faults each re-plan superseded the epoch still loading its models, and nothing
became active), and the rejoin rule weighs a host that came back meanwhile once it serves
(testbed.control.core.replan). The re-plan (policy) keeps
surviving workers where the bottleneck allows. To recover in about a second, the controller
prepares for the next failure while all is well: for each node of the active plan it computes
the plan it would move to if that node died (contingency plans, in the background), and
loads the stages those plans would newly need as warm standbys on spare nodes (`prepare`). On
a failure that matches a contingency, the new epoch is all existing workers: a few routes, no
model transfer, no model load. A straggler (a stage of the active epoch computing
`straggler_factor` x slower than planned, and slower than the bottleneck, for
`straggler_after_s`, from the per-second load its agent reports) is handled like a failing
host (`node.straggler`, `node.unhealthy`): the pipeline moves off it, draining rather than
replaying, and it is tried again after the unhealthy back-off. When no plan fits the live
nodes, `plan.infeasible` says why, the controller waits, and tries again whenever a node
becomes usable; nothing blocks. An epoch of pipelines side by side (`planner.pipelines`)
gets no contingency plans: the pipelines a loss leaves whole are the next epoch at once, and
a better plan is looked for afterwards (kept by the rejoin rule below).

Switching. When the old epoch is broken, the dispatcher switches and replays every unanswered
request at once, and the old epoch is retired. When it is healthy (a rejoin, a new model
version), the dispatcher switches and the old epoch drains: its in-flight requests finish
there (results checked against their own version), and what is left after `drain_s` is
replayed before it is retired. Either way no request is lost or answered twice.

Rejoin. A node back from a suspicion, restart or failure is used again only after it has been
stable for `rejoin_hold_s`, doubled for each failure while it served (testbed.control.core.
backoff; a new suspicion restarts the clock), and then only if the plan
with it beats the plan in force by `rejoin_margin` (policy.better_by_margin); otherwise
`rejoin.declined` and it becomes a spare (and may hold a standby). While no plan fits, a node
that returns is tried at once, and so are nodes still in their hold when a plan is found
infeasible: nothing is running that could flap. A suspected host that
comes back with its workers still running (it was slow, not dead: a small CPU share starves
its agent now and then) keeps them as standbys (`standby.readopted`), so taking it back
loads nothing. Which start of a host's agent is listened to is decided by
testbed.control.admission (an incarnation id per start: a restart is `agent.restarted` even
when the pid repeats, and a message of an earlier start is dropped); an agent's `disk` failure
is `disk.fault` and the host is planned around like a failing one.

Model versions. The controller polls the repository (`repository`, default RUN_DIR/repository)
for new versions; a new one is hashed and its reference outputs computed, then (with
`auto_rollout`) planned and deployed beside the running version and switched to as above.
`{"cmd": "rollback"}` goes back to the version that served before; `{"cmd": "rollout",
"version": N}` to any known version.

CONFIG.json (testbed.control.state.ControllerConfig; unknown fields are refused):
  run_dir, model (ONNX path, version `version`), instance (planner instance JSON path),
  hosts {name: IP}, dispatcher_ip,
  planner {algorithm: "auto", time_limit_s: 2.0, seed: 0},
  workload {see testbed.control.dispatcher.Workload},
  host ("dispatcher"), control_port (18000), sink_port (19000), data_port_base (20000),
  data_port_span (20000; per host), control_ipc ("ipc://RUN_DIR/control.sock"),
  version (1), plan (plan.json for epoch 1, instead of solving),
  stages_dir (a split matching that plan, instead of splitting),
  repository (RUN_DIR/repository), repository_poll_s (0.5), auto_rollout (true),
  base_reserve_bytes (the initial model's activation reserve, when known), curve_keypair
  (a stage_image.security keypair file: CurveZMQ on; agents then need its public key),
  agent_keys ({host: agent public key}; with curve_keypair only these agents get in, each
  only as its own host, and the sink only admits the last stages of live epochs: see
  testbed.control.auth), and the control settings, flat: every field of
  formats.control.ControlSettings (heartbeat_ms, suspect_after_missed, rejoin_hold_s, ...;
  their defaults are stated there).

Driver commands: testbed.control.commands (the `embedded` ones), checked before the plane
sees them; every reply has "ok".
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import zmq
from zmq.auth import CURVE_ALLOW_ANY

from formats.errors import EXIT_BAD_INPUT, InputError
from partitioner.instance import InfeasibleError, load_instance, plan_from_json, plan_problems
from stage_image.security import Gate, KeyPair, apply_server, load_keypair, start_gates, user_id
from stage_image.wire import CHUNK_BYTES, FrameError, decode_control, encode_control
from testbed.control import commands
from testbed.control.auth import AgentKeys, Peers, sink_senders
from testbed.control.core.actions import Event
from testbed.control.dispatcher import Dispatcher, compute_references, seeded_pool
from testbed.control.plane import ControlPlane
from testbed.control.plane_io import Action, Send, StartJob
from testbed.control.planning import (
    Planner,
    PlanRequest,
    Prepared,
    VersionInfo,
    cut_indices,
    sha256_file,
    version_instance,
)
from testbed.control.state import ControllerConfig, EventLog

__all__ = ["Controller", "ControllerConfig", "cut_indices", "main"]


class Controller:
    """The shell around one ControlPlane (module docstring)."""

    def __init__(self, cfg: ControllerConfig, log: logging.Logger,
                 dispatch_log: logging.Logger) -> None:
        self.cfg, self.log = cfg, log
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        self.events = EventLog(cfg.run_dir / "events.jsonl", log)
        instance = load_instance(cfg.instance)
        missing = [n.name for n in instance.nodes if n.name not in cfg.hosts]
        if missing:
            raise InputError(f"no IP address for instance nodes {missing}", field="hosts")
        self.base_instance = instance
        from testbed.control.repository import Watcher

        assert cfg.repository is not None
        self.watcher = Watcher(cfg.repository)
        self.next_poll = 0.0
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)   # a restarted agent takes its name
        # CurveZMQ (off by default in the embedded backend): the control channel with the
        # driver's keypair (agents get its public key), every worker and the dispatcher
        # with a keypair of their own, generated by the plane and sent over that channel
        self.curve = load_keypair(cfg.curve_keypair) if cfg.curve_keypair else None
        if self.curve is not None:
            apply_server(self.router, self.curve)
        # Authentication (testbed.control.auth): ZAP admits only the run's agent keys on the
        # control port and the live last stages' keys (by data token) on the sink.
        self.agent_keys = AgentKeys(cfg.agent_keys) if cfg.agent_keys is not None else None
        # the dispatcher's keys: the sink's Gate checks the last stages' data tokens with them
        dispatcher_keys = KeyPair.generate() if self.curve else None
        self.sink_gate = Gate(own=dispatcher_keys)
        self.peers = Peers()
        gates: dict[str, Gate] = {}
        if self.curve is not None:
            # the sink's data hops are authenticated by token (stage_image.security), which
            # admits nobody without the Gate: with keys the sink always has one
            gates["sink"] = self.sink_gate
        if self.agent_keys is not None:
            gates["control"] = Gate(self.agent_keys.publics())
        self.zap = start_gates(self.ctx, gates) if gates else None
        if self.zap is not None:
            # with a ZAP handler in the context every CURVE server asks it: without agent
            # keys the control port admits any agent that knows our public key, as before
            if self.agent_keys is None:
                self.zap.configure_curve(domain="control", location=CURVE_ALLOW_ANY)
            self.router.zap_domain = b"control"
        self.router.bind(f"tcp://{cfg.dispatcher_ip}:{cfg.control_port}")
        self.rep = self.ctx.socket(zmq.REP)
        self.rep.setsockopt(zmq.LINGER, 0)
        self.rep.bind(cfg.control_ipc)
        self.dispatcher = Dispatcher(self.ctx, f"tcp://{cfg.dispatcher_ip}:{cfg.sink_port}",
                                     self.events.emit, dispatch_log,
                                     keys=dispatcher_keys,
                                     zap_domain="sink" if self.curve else None,
                                     data_auth="token")
        self.planner = Planner(cfg.run_dir, cfg.planner.algorithm, cfg.planner.time_limit_s,
                               cfg.planner.seed, cfg.control.reuse_tolerance,
                               cfg.planner.pipelines, cfg.planner.spare)
        self.plane = ControlPlane(cfg, {n.name for n in instance.nodes}, self.dispatcher,
                                  curve=self.curve is not None)
        self.jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plan")
        self.job: tuple[str, Future[Any]] | None = None
        self.csv_written = False

    # -- carrying out the plane's actions ------------------------------------------------------

    def execute(self, actions: list[Action] | None = None) -> None:
        actions = self.plane.take() if actions is None else actions
        if self.zap is not None and actions:
            # before the deploys go out: a new last stage's worker connects to the sink
            # soon after its agent hears of it (an epoch changes state only with actions)
            self.sink_gate.set(sink_senders(self.plane.epochs.values()))
        for action in actions:
            if isinstance(action, Event):
                self.events.emit(action.kind, **action.fields)
            elif isinstance(action, Send):
                self.send(action.host, action.kind, action.blob, **action.fields)
            elif isinstance(action, StartJob):
                self.start_job(action)

    def start_job(self, action: StartJob) -> None:
        kind = action.kind
        if kind == "bootstrap":
            future = self.jobs.submit(self._bootstrap)
        elif kind == "initial":
            future = self.jobs.submit(self._initial_plan)
        elif kind == "version":
            future = self.jobs.submit(self._load_version, action.manifest)
        else:
            if kind in ("plan", "rejoin"):
                assert action.request is not None
                self.log.info("%s over %s (%s)", kind, sorted(action.request.live),
                              action.request.reason)
            future = self.jobs.submit(self.planner.prepare, action.request)
        self.job = (kind, future)

    def collect_job(self, now: float) -> None:
        if self.job is None or not self.job[1].done():
            return
        (kind, future), self.job = self.job, None
        try:
            result, error = future.result(), None
        except Exception as exc:  # noqa: BLE001 - the plane decides what a failure means
            result, error = None, exc
            if not isinstance(exc, (InfeasibleError, InputError)):
                self.log.error("%s job failed", kind, exc_info=exc)
        self.plane.job_done(kind, result, error, now)

    # -- the jobs (in the job thread: no plane state is touched) -------------------------------

    def _bootstrap(self) -> tuple[Any, Any, VersionInfo]:
        """The input pool and the first version's references (once)."""
        pool = seeded_pool(self.cfg.model, self.cfg.workload)
        info = VersionInfo(self.cfg.version, self.cfg.model, sha256_file(self.cfg.model),
                           self.base_instance, str(self.cfg.model))
        return pool, compute_references(self.cfg.model, pool), info

    def _initial_plan(self) -> Prepared:
        cfg = self.cfg
        info = self.plane.infos[cfg.version]
        live = frozenset(self.plane.nodes)
        if cfg.plan is None:
            return self.planner.prepare(PlanRequest("initial", "initial", info, live))
        plan = plan_from_json(info.instance, json.loads(cfg.plan.read_text()))
        problems = plan_problems(info.instance, plan.stages, plan.chains)
        if problems:
            raise InfeasibleError(f"the given plan is not valid: {'; '.join(problems)}")
        return self.planner.prepare(PlanRequest("initial", "initial (given)", info, live,
                                                given=plan, given_stages=cfg.stages_dir))

    def _load_version(self, manifest: Any) -> tuple[VersionInfo, Any]:
        """A published version, checked (SHA-256) and with its references for the pool."""
        actual = sha256_file(manifest.model)
        if actual != manifest.sha256:
            raise InputError(f"model.onnx has SHA-256 {actual[:12]}, the manifest says "
                             f"{manifest.sha256[:12]}", file=manifest.directory)
        instance = version_instance(self.base_instance, manifest, self.cfg.base_reserve_bytes)
        info = VersionInfo(manifest.version, manifest.model, actual, instance, manifest.source)
        return info, compute_references(manifest.model, self.dispatcher.pool)

    # -- agents --------------------------------------------------------------------------------

    def send(self, host: str, kind: str, blob: bytes | None = None, **fields: Any) -> None:
        # keyed agents: the connection the host's key last spoke from (testbed.control.auth)
        identity = self.peers.identity(host) if self.agent_keys is not None else None
        try:
            self.router.send_multipart([identity or host.encode(),
                                        *encode_control(kind, blob, **fields)],
                                       flags=zmq.NOBLOCK)
        except zmq.Again:
            self.log.warning("control queue to %s full; %s dropped", host, kind)
        except zmq.ZMQError as exc:
            # ROUTER_MANDATORY is off: an unknown peer is silently dropped; anything else
            # is logged and repaired by the next heartbeat's reconciliation
            self.log.warning("cannot send %s to %s: %s", kind, host, exc)

    def on_router(self, budget: int = 256) -> None:
        for _ in range(budget):
            try:
                parts = self.router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            host = parts[0].bytes.decode("utf-8", "replace")
            try:
                msg = decode_control(parts[1:])
            except FrameError as exc:
                self.log.warning("bad control message from %s dropped: %s", host[:64], exc)
                continue
            if self.agent_keys is not None:
                claimed = msg["host"] if msg.type in ("hello", "heartbeat") else None
                known, why = self.agent_keys.host_for(user_id(parts[-1]), claimed)
                if known is None:
                    self.log.warning("control message dropped: %s", why)
                    continue
                self.peers.heard(known, parts[0].bytes)
                host = known
            if host not in self.cfg.hosts:
                self.log.warning("message from unknown agent %r ignored", host[:64])
                continue
            if msg.type in ("hello", "heartbeat") and msg["host"] != host:
                self.log.warning("agent %s claims to be %s; ignored", host, msg["host"])
                continue
            now = time.monotonic()
            if msg.type == "hello":
                if msg.fields.get("ip") and msg["ip"] != self.cfg.hosts[host]:
                    self.log.warning("agent %s says its IP is %s, config says %s", host,
                                     msg["ip"], self.cfg.hosts[host])
                self.plane.on_hello(host, msg.fields, now)
            elif msg.type == "heartbeat":
                self.plane.on_heartbeat(host, msg.fields, now)
            elif msg.type == "worker":
                self.plane.on_worker(host, msg.fields, now)
            elif msg.type == "fetch":
                self.on_fetch(host, msg.fields)
            else:
                self.log.warning("unexpected %s from %s ignored", msg.type, host)
            self.execute()

    def on_fetch(self, host: str, f: dict[str, Any]) -> None:
        sha, offset = f["sha256"], f["offset"]
        path = self.plane.models.get(sha)
        if path is None:
            self.send(host, "chunk", sha256=sha, offset=offset, total=0,
                      error="unknown sha256")
            return
        try:
            total = path.stat().st_size
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read(CHUNK_BYTES)
        except OSError as exc:
            self.send(host, "chunk", sha256=sha, offset=offset, total=0, error=str(exc)[:200])
            return
        if offset > total:
            self.send(host, "chunk", sha256=sha, offset=offset, total=total,
                      error="offset beyond the end")
            return
        self.send(host, "chunk", data, sha256=sha, offset=offset, total=total)
        if offset + len(data) >= total:
            self.events.emit("model.sent", host=host, sha256=sha, bytes=total)

    # -- the driver ----------------------------------------------------------------------------

    def on_command(self, raw: bytes) -> dict[str, Any]:
        try:
            cmd, _ = commands.parse([raw], "embedded")
        except commands.CommandError as exc:
            return {"ok": False, "error": f"bad command: {exc}"}
        reply = self.plane.command(cmd, time.monotonic())
        if cmd["cmd"] == "status":
            reply["last_event"] = self.events.last
        self.execute()
        return reply

    # -- periodic work -------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        self.collect_job(now)
        if self.dispatcher.pool and now >= self.next_poll:
            self.next_poll = now + self.cfg.repository_poll_s
            found, problems = self.watcher.poll()
            self.plane.repository(found, problems, now)
        self.plane.tick(now)
        self.execute()

    def write_requests(self) -> None:
        try:
            self.dispatcher.write_csv(self.cfg.run_dir / "requests.csv")
        except OSError as exc:
            self.log.error("cannot write requests.csv: %s", exc)
        self.csv_written = True       # written or not: not retried every tick

    def run(self) -> None:
        cfg = self.cfg
        self.events.emit("controller.started", host=cfg.host, pid=os.getpid(),
                         control=f"tcp://{cfg.dispatcher_ip}:{cfg.control_port}",
                         sink=self.dispatcher.sink_address, ipc=cfg.control_ipc,
                         repository=str(cfg.repository))
        self.plane.start()
        self.execute()
        while self.plane.running:
            poller = zmq.Poller()
            poller.register(self.router, zmq.POLLIN)
            poller.register(self.rep, zmq.POLLIN)
            poller.register(self.dispatcher.sink, zmq.POLLIN)
            if self.dispatcher.wants_pollout():
                assert self.dispatcher.push is not None
                poller.register(self.dispatcher.push, zmq.POLLOUT)
            wait = min(0.05, self.dispatcher.next_wakeup(time.monotonic()))
            ready = dict(poller.poll(math.ceil(wait * 1000)))
            if self.dispatcher.sink in ready:
                self.dispatcher.on_sink()
            if self.router in ready:
                self.on_router()
            if self.rep in ready:
                try:
                    raw = self.rep.recv(zmq.NOBLOCK)
                except zmq.Again:
                    raw = None
                if raw is not None:
                    self.rep.send(json.dumps(self.on_command(raw), default=str).encode())
            now = time.monotonic()
            self.tick(now)
            self.dispatcher.pump(now)
            if self.dispatcher.state == "done" and not self.csv_written:
                # before any status says "done": the driver may read the file right away
                self.write_requests()
        self.shutdown()

    def shutdown(self) -> None:
        self.dispatcher.stop_issuing(time.monotonic(), drain=False)
        self.dispatcher.finish()
        if self.dispatcher.requests and not self.csv_written:
            self.write_requests()
        for host in self.plane.health.nodes:
            self.send(host, "stop", epoch=-1)
        self.events.emit("controller.stopped", **self.dispatcher.counts())
        time.sleep(0.2)     # let the stop messages leave before the sockets close
        self.jobs.shutdown(wait=False, cancel_futures=True)
        self.dispatcher.close()
        self.router.close(0)
        self.rep.close(0)
        if self.zap is not None:
            self.zap.stop()         # its ZAP socket would keep ctx.term() waiting
        self.ctx.term()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m testbed.control.controller CONFIG.json\n"
              "(the k3s backend's loop is python -m testbed.k8s.loop)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        cfg = ControllerConfig.load(argv[0])
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger(f"controller[{cfg.host}]")
    try:
        controller = Controller(cfg, log, logging.getLogger(f"dispatcher[{cfg.host}]"))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    def on_signal(signum: int, _frame: Any) -> None:
        controller.plane.running = False

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    controller.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
