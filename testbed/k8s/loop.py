"""The k3s backend's control loop: `python -m testbed.k8s.loop --backend k3s ...`, run in the
controller's pod (or on the lab VM with a kubeconfig).

Division of labour, as in the Mininet modules: the algorithms are plain functions and classes
on plain data, the API calls sit at the edges.
- `Decider` (testbed.k8s.decider) decides and does nothing else: no sockets, no API, no clock
  of its own (every call takes `now`); it answers with actions (`Replan`, `Deploy`,
  `ForceDelete`, `Prune`, `Event`), which this module carries out.
- Planning is the embedded controller's: testbed.control.planning.Planner (solve over the live
  nodes, repairs that keep the current cuts, the split at the plan's stage ends, cached).
  The rules are the decision core's, shared with the embedded controller
  (testbed.control.core): the back-off, the rejoin hold and margin, the pending re-plan and
  epoch numbers, stale plans, stalls. The settings are formats.control.ControlSettings
  (controller.json of the inputs; keys this loop cannot apply are refused before a run).
- testbed.k8s.manifests turns a plan into manifests; testbed.k8s.backend.K3sBackend applies them
  (`deploy_epoch`), force-deletes pods stuck on dead nodes and prunes old epochs; its
  ModelServer hands the stage models to the init containers.
- `HeartbeatReceiver` takes the stage workers' `stage_heartbeat`s (stage_image.worker) on
  the controller Service's control port and validates every frame (stage_image.wire).
- `K3sController` wires it up: watch threads and the receiver fill one queue, a single loop
  thread feeds the Decider and starts the slow work (planning, API calls) in one job thread,
  and events.jsonl is written with the embedded controller's EventLog and event names.
- With a workload in its inputs, the controller also hosts the load generator + sink and the
  driver's command port (testbed.k8s.workload.WorkloadHost, a thread of its own): the last
  stage of every epoch sends to the sink (which, with CurveZMQ, admits the last stages of
  the epochs not yet pruned, and nobody else), and when an epoch is ready (`plan.deployed`) the
  dispatcher switches to its stage 0 and replays what is unanswered.

Node health. A node is dead when the API says so (NotReady, cordoned, a NoSchedule/NoExecute
taint, gone) *or* its stage's heartbeats have been silent for `suspect_after_missed` x
`heartbeat_ms` (3 x 200 ms by default, as embedded). Heartbeats are expected only from the
nodes of the epoch in force, and only once that node's stage has sent one for this epoch:
every epoch rolls every stage pod (the epoch is in the pod template), and a pod that is still
fetching its model is not silent, it is starting (a stage not serving `deploy_timeout_s` after
the deploy counts as a failure). A dead node is usable again only when both signals agree: the
API says usable, and there is a sign of life since it was found dead. A stage of the epoch in
force must have beaten again; a node we moved away from (nothing of ours beats there) must
have been seen down and up again by the API, or the API must have had `api_grace_s` to notice
a failure and not have (then the node is fine and our pod or its path failed): the API's
"Ready" lags a crash by 40 s, and alone would bring a crashed node straight back. It must then
be stable for `rejoin_hold_s` (doubled for each time it failed while serving, up to two
minutes: testbed.control.core.backoff), and the plan with it must beat the plan in force by
`rejoin_margin` (testbed.control.core.rejoin), else `rejoin.declined`. While no plan fits
(`plan.infeasible`) the loop waits, and tries again as soon as a node returns, without the
hold: nothing runs that could flap. Nothing blocks: a failed plan or deploy is retried
after `retry_s`.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import zmq
from kubernetes import config

from formats.control import ControlSettings
from formats.errors import EXIT_BAD_INPUT, InputError
from partitioner.instance import (
    InfeasibleError,
    Instance,
    Plan,
    instance_from_json,
    plan_from_json,
    plan_problems,
)
from stage_image.security import KeyPair, apply_server, generate_deployment_keys
from stage_image.wire import MAX_STAGE_HEARTBEAT_BYTES, FrameError, decode_control
from testbed.control.core.actions import Event
from testbed.control.dispatcher import Head, Route, Workload
from testbed.control.planning import Planner, PlanRequest, Prepared, VersionInfo, restrict
from testbed.control.state import EventLog
from testbed.k8s import manifests as k8s
from testbed.k8s.backend import (
    K3sBackend,
    ModelServer,
    latest_epoch,
)
from testbed.k8s.decider import Action, Decider, Deploy, ForceDelete, Prune, Replan
from testbed.k8s.manifests import ControllerInputs, K8sSettings, StageModel
from testbed.k8s.workload import WorkloadHost

# -- planning and manifests for an epoch ------------------------------------------------------

def stage_models(prepared: Prepared) -> tuple[list[StageModel], Path]:
    """The manifests' view of a prepared plan's stage files (already hashed), and the
    directory of the split they come from (what the model server serves them from)."""
    models = []
    for index, stage in enumerate(prepared.stages):
        if stage is None:
            raise ValueError(f"stage {index} has no stage file: every k3s epoch starts new pods")
        models.append(StageModel(stage.path.name, list(stage.inputs), list(stage.outputs),
                                 stage.sha256, stage.size))
    if prepared.stage_dir is None:
        raise ValueError("the prepared plan has no split directory")
    return models, prepared.stage_dir


def epoch_settings(base: K8sSettings, epoch: int, n_stages: int,
                   controller_keys: KeyPair | None) -> K8sSettings:
    """The settings of one epoch: its number and, with CurveZMQ, fresh keys for its stages
    and the controller's own keypair, which outlives epochs (the heartbeat receiver, bound
    once, is a CURVE server with it)."""
    keys = None
    if base.curve:
        if controller_keys is None:
            raise ValueError("CurveZMQ is on: the controller needs its keypair")
        keys = {**generate_deployment_keys(k8s.endpoint_names(n_stages)[:-1]),
                "controller": controller_keys}
    return replace(base, epoch=epoch, curve_keys=keys)


def initial_request(version: VersionInfo, live: frozenset[str], reason: str,
                    given: Plan | None) -> PlanRequest:
    """The first plan: the one the driver wrote (plan.json) if it fits the live nodes, else
    a fresh solve."""
    if given is not None and not plan_problems(restrict(version.instance, set(live)),
                                               given.stages):
        return PlanRequest("initial", f"{reason} (given plan)", version, live, given=given)
    return PlanRequest("initial", reason, version, live)


# -- heartbeats -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Beat:
    host: str
    epoch: int
    stage: int
    seq: int
    received: float             # time.monotonic() at receipt


def parse_heartbeat(frames: list[bytes], received: float) -> Beat:
    """Validate a received stage heartbeat; FrameError (and nothing else) when it is not
    one: one part, at most MAX_STAGE_HEARTBEAT_BYTES, and the `stage_heartbeat` schema of
    stage_image.wire (JSON only, exact fields and types, host name syntax)."""
    if len(frames) != 1:
        raise FrameError(f"a heartbeat is one part, got {len(frames)}")
    if len(frames[0]) > MAX_STAGE_HEARTBEAT_BYTES:
        raise FrameError(f"a heartbeat is at most {MAX_STAGE_HEARTBEAT_BYTES} bytes, got "
                         f"{len(frames[0])}")
    msg = decode_control(frames)
    if msg.type != "stage_heartbeat":
        raise FrameError(f"expected a stage_heartbeat, got {msg.type}")
    return Beat(msg["host"], msg["epoch"], msg["stage"], msg["seq"], received)


class HeartbeatReceiver:
    """A PULL socket for the stage workers' heartbeats, read by a thread of its own (receipt
    times do not wait for the loop). Bound at construction, so a port in use fails at once.
    With `keys`, a CURVE server: only workers given the controller's public key get in."""

    def __init__(self, address: str, on_beat: Callable[[Beat], None],
                 log: logging.Logger, keys: KeyPair | None = None) -> None:
        self.on_beat, self.log = on_beat, log
        self.accepted = 0
        self.rejected = 0
        self._last_warning = 0.0
        self._stop = threading.Event()
        self.ctx = zmq.Context(1)
        self.sock = self.ctx.socket(zmq.PULL)
        # ZeroMQ drops a peer that sends a larger message before it is ever buffered
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_STAGE_HEARTBEAT_BYTES)
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            apply_server(self.sock, keys)
        self.sock.bind(address)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)

    def start(self) -> HeartbeatReceiver:
        self.thread.start()
        return self

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                continue
            self.receive(frames, time.monotonic())
        self.sock.close(0)

    def receive(self, frames: list[bytes], received: float) -> Beat | None:
        try:
            beat = parse_heartbeat(frames, received)
        except FrameError as exc:
            self.rejected += 1
            # one line per second at most: a flood of garbage must not flood the log
            if received - self._last_warning >= 1.0:
                self._last_warning = received
                self.log.warning("bad heartbeat dropped (%d so far): %s", self.rejected, exc)
            return None
        self.accepted += 1
        self.on_beat(beat)
        return beat

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join()
        else:
            self.sock.close(0)
        self.ctx.term()


# -- the controller ---------------------------------------------------------------------------

FileState = tuple[int, float, bool]         # size, mtime, hashed (and not the right file)


def model_ready(path: Path, sha256: str, last: FileState | None,
                ) -> tuple[bool, FileState | None]:
    """One check of a model being copied in: (ready, what was seen). The file is hashed only
    once its size and mtime held still for a whole poll interval (kubectl cp writes it in
    place), so a partial copy is never trusted, and a wrong file only once per change."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False, None
    if last is None or last[:2] != (stat.st_size, stat.st_mtime):
        return False, (stat.st_size, stat.st_mtime, False)
    if last[2]:
        return False, last
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest() == sha256, (stat.st_size, stat.st_mtime, True)


class K3sController:
    """The loop (module docstring). `run()` until `stop()`; tests pass a backend on a fake
    API server, a model server and a heartbeat address on loopback."""

    def __init__(self, settings: K8sSettings, inputs: ControllerInputs, work_dir: Path,
                 model: Path, timing: ControlSettings, log: logging.Logger,
                 events: Path | None = None, backend: K3sBackend | None = None,
                 model_server: ModelServer | None = None,
                 heartbeat_bind: str | None = None, keys: KeyPair | None = None,
                 sink_bind: str | None = None, command_bind: str | None = None,
                 stage0_address: Callable[[K8sSettings, str], str] | None = None) -> None:
        self.settings, self.inputs, self.log = settings, inputs, log
        self.work_dir, self.model = work_dir, model
        self.timing = timing
        self.instance: Instance = instance_from_json(inputs.instance, "instance.json")
        missing = sorted({n.name for n in self.instance.nodes} - set(settings.nodes))
        if missing:
            raise InputError(f"nodes {missing} of the instance have no resources",
                             file="settings.json", field="nodes")
        try:
            self.given = (plan_from_json(self.instance, dict(inputs.plan))
                          if inputs.plan is not None else None)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InputError(f"does not match instance.json: {exc!r}", file="plan.json") from exc
        self.backend = backend or K3sBackend(settings)      # no API, no side effects
        work_dir.mkdir(parents=True, exist_ok=True)
        self.events = EventLog(events or work_dir / "events.jsonl", log)
        # the controller's own CurveZMQ keypair, for every epoch (epoch_settings): the driver's
        # (its Secret, --keypair), so that it knows whom it talks to; else one of our own
        self.keys = (keys or KeyPair.generate()) if settings.curve else None
        self.planner = Planner(work_dir, inputs.algorithm, inputs.time_limit_s, seed=0,
                               tolerance=0.05)
        self.model_server = model_server or ModelServer(port=settings.model_port)
        self.inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.receiver = None
        if settings.heartbeat_ms is not None:
            self.receiver = HeartbeatReceiver(
                heartbeat_bind or f"tcp://*:{settings.control_port}",
                lambda beat: self.inbox.put(("beat", beat)), log, self.keys)
        self.jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="k3s-job")
        self.pending: list[tuple[Future[Any], Callable[[Future[Any], float], list[Action]]]] = []
        self.stopping = threading.Event()
        self.decider: Decider | None = None
        self.version: VersionInfo | None = None
        self.prepared: Prepared | None = None
        # where the dispatcher sends an epoch's requests, from its settings and stage 0's
        # node: stage 0's Service (tests map it to loopback)
        self.stage0_address = stage0_address or (lambda s, _node: k8s.stage_address(0, s))
        self.routes: dict[int, Route] = {}
        # epoch -> public keys of its last stages: the sink admits the epochs not yet pruned
        self.sink_keys: dict[int, list[str]] = {}
        self.workload: WorkloadHost | None = None
        if inputs.workload is not None:
            self.workload = WorkloadHost(
                Workload.from_json(dict(inputs.workload)), work_dir, model,
                inputs.model_sha256, self.events.path, self.events.emit, log, self.view,
                sink_bind or f"tcp://*:{settings.sink_port}",
                command_bind or f"tcp://*:{settings.command_port}", self.keys,
                inputs.driver_public)

    def stop(self) -> None:
        self.stopping.set()

    def view(self) -> dict[str, Any]:
        """The loop's state for the command port's status (read from the workload's thread:
        a few attribute reads, no locks needed for a snapshot this coarse)."""
        decider = self.decider
        if decider is None:
            return {"state": "starting", "epoch": None, "last_event": self.events.last}
        plan = decider.plan
        state = ("waiting_nodes" if decider.waiting is not None else
                 "ready" if decider.ready and not decider.broken() else
                 "deploying" if plan is not None and decider.deployed_at is not None else
                 "planning")
        return {"state": state, "epoch": decider.epoch if plan is not None else None,
                "version": decider.version, "degraded": decider.waiting,
                "plan": plan.to_json() if plan is not None else None,
                "predicted_throughput_rps": plan.predicted_throughput_rps if plan else None,
                "dead": sorted(decider.dead), "last_event": self.events.last}

    # -- start ---------------------------------------------------------------------------------

    def wait_for_model(self, poll_s: float = 1.0) -> bool:
        """Until the model of the inputs' hash is in place (False: stopped meanwhile)."""
        seen: FileState | None = None
        next_note = 0.0
        while not self.stopping.is_set():
            ready, seen = model_ready(self.model, self.inputs.model_sha256, seen)
            if ready:
                return True
            if time.monotonic() >= next_note:
                next_note = time.monotonic() + 15.0
                self.log.info("waiting for the model %s with sha256 %s...: copy it in with "
                              "kubectl cp (docs/lab.md)", self.model,
                              self.inputs.model_sha256[:12])
            self.stopping.wait(poll_s)
        return False

    def start(self) -> None:
        """Everything before the loop: the epoch to continue from, the node list, threads."""
        self.version = VersionInfo(self.settings.model_version, self.model,
                                   self.inputs.model_sha256, self.instance, str(self.model))
        next_epoch = latest_epoch(self.backend.epoch_objects()) + 1
        candidates = {n.name for n in self.instance.nodes}
        self.decider = Decider(candidates, self.timing, next_epoch, self.version.version)
        self.decider.nodes_listed(self.backend.nodes())
        self.events.emit("controller.started", backend="k3s", pid=os.getpid(),
                         namespace=self.settings.namespace, next_epoch=next_epoch,
                         heartbeats=self.receiver.address if self.receiver else None,
                         model_server=self.model_server.port)
        self._thread("watch-nodes", lambda stop: self.backend.watch_nodes(
            lambda kind, node: self.inbox.put(("node", kind, node)), stop))
        self._thread("watch-pods", lambda stop: self.backend.watch_pods(
            lambda kind, pod: self.inbox.put(("pod", kind, pod)), stop))
        if self.receiver is not None:
            self.receiver.start()

    def _thread(self, name: str, watch: Callable[[threading.Event], None]) -> None:
        """A watch that never dies of an API error: it reports it and watches again."""
        def forever() -> None:
            while not self.stopping.is_set():
                try:
                    watch(self.stopping)
                except Exception as exc:  # noqa: BLE001 - any API or connection error
                    self.inbox.put(("error", name, f"{type(exc).__name__}: {exc}"[:500]))
                    self.stopping.wait(1.0)
        threading.Thread(target=forever, name=name, daemon=True).start()

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        self.model_server.start()          # the readiness probe (/healthz) answers from now
        if self.workload is not None:
            self.workload.start()          # the driver uploads the model through it
        try:
            if not self.wait_for_model():
                return 0
            if self.workload is not None:
                self.workload.bootstrap()
            try:
                self.start()
            except Exception as exc:  # noqa: BLE001 - API unreachable or refused at start
                # exit: the Deployment restarts the pod (with back-off) and it starts over
                self.log.error("cannot start: %s: %s", type(exc).__name__, exc)
                return 1
            while not self.stopping.is_set():
                self.step(self.timing.heartbeat_s / 4)
        finally:
            self.shutdown()
        return 0

    def step(self, wait_s: float) -> None:
        """Take what the threads reported, collect finished jobs, decide, act."""
        assert self.decider is not None
        items: list[tuple[Any, ...]] = []
        try:
            items.append(self.inbox.get(timeout=wait_s))
            while True:
                items.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        for item in items:
            self.feed(item)
        now = time.monotonic()
        for entry in [e for e in self.pending if e[0].done()]:
            self.pending.remove(entry)
            self.execute(entry[1](entry[0], now))
        self.execute(self.decider.tick(now))

    def feed(self, item: tuple[Any, ...]) -> None:
        decider = self.decider
        assert decider is not None
        if item[0] == "node":
            decider.node_event(item[1], item[2])
        elif item[0] == "pod":
            decider.pod_event(item[1], item[2])
        elif item[0] == "beat":
            beat: Beat = item[1]
            decider.heartbeat(beat.host, beat.epoch, beat.stage, beat.received)
        elif item[0] == "error":
            self.events.emit("api.error", source=item[1], reason=item[2])

    def execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Event):
                self.events.emit(action.kind, **action.fields)
                route = self.routes.get(action.fields.get("epoch", 0))
                if action.kind == "plan.deployed" and self.workload and route is not None:
                    self.workload.activate(route)
            elif isinstance(action, Replan):
                self._submit(lambda a=action: self._plan(a), self._planned(action))
            elif isinstance(action, Deploy):
                try:
                    self._deploy(action)
                except Exception as exc:  # noqa: BLE001 - e.g. a plan the settings refuse
                    assert self.decider is not None
                    self.log.exception("cannot deploy epoch %d", action.epoch)
                    self.execute(self.decider.deploy_failed(
                        action.epoch, f"{type(exc).__name__}: {exc}"[:500], time.monotonic()))
            elif isinstance(action, ForceDelete):
                self._submit(lambda a=action: self.backend.force_delete_pods_on(set(a.nodes)),
                             self._reported("pods.force_deleted", nodes=sorted(action.nodes)))
            elif isinstance(action, Prune):
                self._admit(keep_from=action.epoch - 1)    # what prune_epochs keeps
                self._submit(lambda a=action: self.backend.prune_epochs(a.epoch),
                             self._reported("epochs.pruned", epoch=action.epoch))

    def _submit(self, job: Callable[[], Any],
                then: Callable[[Future[Any], float], list[Action]]) -> None:
        # one job thread: API calls happen in the order the decisions were taken
        self.pending.append((self.jobs.submit(job), then))

    def _plan(self, action: Replan) -> Prepared:
        assert self.version is not None
        if action.kind == "initial":
            request = initial_request(self.version, action.live, action.reason, self.given)
        else:
            request = PlanRequest(action.kind, action.reason, self.version, action.live,
                                  action.base)
        return self.planner.prepare(request)

    def _planned(self, action: Replan) -> Callable[[Future[Any], float], list[Action]]:
        def then(future: Future[Any], now: float) -> list[Action]:
            assert self.decider is not None
            try:
                prepared = future.result()
            except InfeasibleError as exc:
                return self.decider.plan_failed(action.kind, str(exc), now, infeasible=True)
            except Exception as exc:  # noqa: BLE001 - a failed split, a bug: retried later
                self.log.exception("planning failed")
                return self.decider.plan_failed(action.kind, f"{type(exc).__name__}: {exc}",
                                                now, infeasible=False)
            self.prepared = prepared
            return self.decider.planned(action.kind, prepared.plan, now)
        return then

    def _deploy(self, action: Deploy) -> None:
        prepared = self.prepared
        assert prepared is not None and prepared.plan is action.plan
        plan, epoch = action.plan, action.epoch
        models, directory = stage_models(prepared)
        settings = epoch_settings(self.settings, epoch, len(plan.stages), self.keys)
        self.model_server.register(models, directory)
        head = Head(self.stage0_address(settings, plan.stages[0].node),
                    settings.curve_keys["stage-0"].public.decode()
                    if settings.curve_keys else None)
        self.routes[epoch] = Route(epoch, settings.model_version, [head],
                                   list(models[0].inputs))
        if settings.curve_keys is not None:
            # before the pods exist: the new last stage connects to the sink once it is up
            public = {name: pair.public.decode() for name, pair in settings.curve_keys.items()}
            self.sink_keys[epoch] = k8s.sender_keys(plan, None, public)
            self._admit(keep_from=min(self.sink_keys))
        self.events.emit("plan.computed", epoch=epoch, **prepared.summary(),
                         plan=plan.to_json())

        def then(future: Future[Any], now: float) -> list[Action]:
            assert self.decider is not None
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - the API refused or was unreachable
                return self.decider.deploy_failed(epoch, f"{type(exc).__name__}: {exc}"[:500],
                                                  now)
            for index, (stage, model) in enumerate(zip(plan.stages, models)):
                self.events.emit("deploy.sent", epoch=epoch, stage=index, host=stage.node,
                                 port=settings.data_port(), sha256=model.sha256)
            return self.decider.deployed(epoch, now)

        self._submit(lambda: self.backend.deploy_epoch(plan, models, settings), then)

    def _admit(self, keep_from: int) -> None:
        """The sink admits the last stages of the epochs from `keep_from` on (the embedded
        controller's rule, testbed.control.auth.senders, over each epoch's keys)."""
        self.sink_keys = {e: keys for e, keys in self.sink_keys.items() if e >= keep_from}
        if self.workload is not None:
            self.workload.admit({key for keys in self.sink_keys.values() for key in keys})

    def _reported(self, kind: str, **fields: Any,
                  ) -> Callable[[Future[Any], float], list[Action]]:
        def then(future: Future[Any], _now: float) -> list[Action]:
            try:
                names = future.result()
            except Exception as exc:  # noqa: BLE001 - reported; the next decision retries
                return [Event("api.error", {"source": kind, "reason":
                                            f"{type(exc).__name__}: {exc}"[:500]})]
            return [Event(kind, {**fields, "objects": names})] if names else []
        return then

    def shutdown(self) -> None:
        self.stopping.set()
        self.events.emit("controller.stopped", backend="k3s")
        if self.workload is not None:
            self.workload.stop()
        if self.receiver is not None:
            self.receiver.stop()
        self.jobs.shutdown(wait=False, cancel_futures=True)
        self.model_server.stop()


# -- command line -----------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m testbed.k8s.loop --backend k3s",
        description="The k3s backend's control loop (testbed/k8s/loop.py).")
    p.add_argument("--backend", choices=("k3s",), required=True)
    p.add_argument("--namespace", required=True, help="must match the inputs' settings")
    p.add_argument("--models", required=True, type=Path,
                   help="work directory: the model, the split stages, events.jsonl")
    p.add_argument("--inputs", required=True, type=Path,
                   help="settings.json, instance.json, controller.json[, plan.json] "
                        "(the inputs ConfigMap, testbed.k8s.manifests.ControllerInputs)")
    p.add_argument("--model", type=Path,
                   help="the model file (default: MODELS/<model_file of controller.json>)")
    p.add_argument("--events", type=Path, help="default MODELS/events.jsonl")
    p.add_argument("--keypair", type=Path,
                   help="the controller's CurveZMQ secret key (Z85 text; its Secret, mounted "
                        "by testbed.k8s.manifests); default: a keypair of its own")
    # overrides of the inputs' control settings (controller.json), for runs by hand
    p.add_argument("--suspect-after-missed", type=int)
    p.add_argument("--rejoin-hold-s", type=float)
    p.add_argument("--rejoin-margin", type=float)
    p.add_argument("--deploy-timeout-s", type=float)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        settings, inputs = k8s.load_controller_inputs(args.inputs)
        if settings.namespace != args.namespace:
            raise ValueError(f"--namespace {args.namespace} but the inputs are for "
                             f"{settings.namespace}")
        overrides = {name: value for name, value in (
            ("suspect_after_missed", args.suspect_after_missed),
            ("rejoin_hold_s", args.rejoin_hold_s), ("rejoin_margin", args.rejoin_margin),
            ("deploy_timeout_s", args.deploy_timeout_s)) if value is not None}
        timing = ControlSettings.from_json({**inputs.control, **overrides}, "controller.json")
        if settings.heartbeat_ms is not None:
            # the stages beat at the settings' interval: the loop must expect the same
            timing = timing.replace(heartbeat_ms=settings.heartbeat_ms)
        keys = KeyPair.from_secret(args.keypair.read_text().strip()) if args.keypair else None
    except (OSError, ValueError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("controller[k3s]")
    try:
        controller = K3sController(settings, inputs, args.models,
                                   args.model or args.models / inputs.model_file, timing, log,
                                   args.events, keys=keys)
    except (ValueError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except config.ConfigException as exc:
        print(f"error: no Kubernetes API to talk to (in-cluster or kubeconfig): {exc}",
              file=sys.stderr)
        return 1
    except (OSError, zmq.ZMQError) as exc:
        print(f"error: cannot listen (model server or heartbeat port): {exc}", file=sys.stderr)
        return 1

    def on_signal(_signum: int, _frame: Any) -> None:
        controller.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return controller.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
