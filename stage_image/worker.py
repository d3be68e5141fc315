"""One pipeline stage: `python -m stage_image.worker CONFIG.json`.

The worker is deliberately dumb: it loads one stage model into onnxruntime (one intra-op
thread, one inter-op thread, sequential execution: spinning thread pools collapse under CPU
limits), binds a PULL socket, and for every frame: validate, run, forward to the next hop of
the frame's epoch. Placement, epochs and model files are decided by the controller and handled
by the agent, which wrote CONFIG.json and watches this process.

Routes. A worker serves its one model for any number of epochs at once: a route maps an epoch
to (stage index, next address), and a frame is forwarded along the route of its own epoch
(one PUSH socket per distinct next address). A frame of an epoch without a route is dropped, so
a worker never serves a retired epoch. Routes let a re-plan keep a stage where it is: the
running process gains the new epoch's route and loses the old one, with no restart and no
model reload. A worker with no route (a warm standby) just holds its model ready.

Protocol with the agent: once the session is loaded and the socket bound (with the routes of
CONFIG.json in force), the worker prints the line `ready` on stdout (a pipe the agent polls);
logs go to stderr. With `commands` on, the agent changes routes by writing JSON lines to
stdin, each confirmed on stdout once in force:
  {"op": "route", "epoch": E, "stage": S, "next": ADDRESS[, "public": KEY]}  ->  `routed E`
  {"op": "unroute", "epoch": E}                             ->  `unrouted E`
End of file on stdin means the agent is gone: the worker exits.

Robustness rules: a bad frame (malformed header, wrong tensors, wrong epoch or version, an
onnxruntime error on its contents) is dropped with a rate-limited log line and counted; the
worker never dies of one. Queues stay bounded (small ZeroMQ high-water marks, and a blocked
downstream blocks us instead of buffering); a frame blocked on a hop whose route is withdrawn
meanwhile is dropped. SIGTERM ends the loop and exits 0. A next hop that refuses our handshake
is dialled again (`REDIAL_S`): a re-plan sends the new routes to all stages at once, so the
upstream may dial before the next stage's Gate admits it, and libzmq never retries a
connection whose handshake was refused (it would stay dead, frames blocked forever).

CONFIG.json fields (written by stage_image.agent, or testbed.k8s.manifests for a pod):
  host, version, model (path), bind (tcp://IP:PORT), inputs, outputs (tensor names,
  stages.json order); the first route as epoch, stage, next (optional: a standby has none);
  more routes as routes {"EPOCH": {"stage", "next", "public"}}; with CurveZMQ the worker's
  curve_secret and each route's public (next_public for the first route) and upstream (the
  keys that may send to it, enforced with upstream_gate; upstream for the first route);
  data_auth "curve" (default: every frame encrypted) or "token" (the embedded agent's
  workers: PLAIN with a password derived from the keys, admitted by the upstream_gate,
  frames in the clear; see stage_image.security); under Kubernetes curve_secret and
  next_public come from the files named by $EDGEPIPE_CURVE_DIR and curve-public.json beside
  the config); and optionally commands (read route changes from stdin, default false), hwm
  (default 4), stats_every_s (5.0),
  max_bytes (default 256 MiB), linger_ms (0), parent_pid (the agent: the worker dies with
  it), nice (added to the worker's niceness).
  With commands on (an agent reads stdout), every LOAD_EVERY_S it prints `load FRAMES MS`:
  frames computed in that second and their mean onnxruntime wall time, which the agent puts
  in its heartbeat (the controller's straggler check).
  Under Kubernetes only (no agent in a pod): heartbeat (the controller's address) and
  heartbeat_ms (default 200): a thread sends `stage_heartbeat` (host, epoch, stage, seq) there
  every interval, CURVE-encrypted to the controller's public key when keys are mounted.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import zmq

from stage_image.security import (
    DATA_AUTH,
    Gate,
    KeyPair,
    apply_client,
    apply_data_client,
    apply_data_server,
    start_gates,
)
from stage_image.wire import (
    DEFAULT_MAX_BYTES,
    FrameError,
    Limits,
    decode_tensors,
    encode_control,
    encode_tensors,
)

ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
    "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}


@dataclass(frozen=True)
class Route:
    """Where frames of one epoch go after this stage (and, with CurveZMQ, the next hop's
    public key)."""

    stage: int
    next: str
    public: str | None = None
    upstream: tuple[str, ...] = ()    # CurveZMQ: the public keys that may send us frames


@dataclass
class WorkerConfig:
    host: str
    version: int
    model: str
    bind: str
    inputs: list[str]
    outputs: list[str]
    epoch: int | None = None
    stage: int = 0
    next: str | None = None
    routes: dict[str, dict[str, Any]] = field(default_factory=dict)
    next_public: str | None = None
    upstream: list[str] = field(default_factory=list)   # the first route's (see Route)
    curve_secret: str | None = None
    upstream_gate: bool = False
    data_auth: str = "curve"
    commands: bool = False
    hwm: int = 4
    stats_every_s: float = 5.0
    max_bytes: int = DEFAULT_MAX_BYTES
    linger_ms: int = 0
    parent_pid: int | None = None
    nice: int = 0
    heartbeat: str | None = None
    heartbeat_ms: float = 200.0
    heartbeat_public: str | None = None

    @classmethod
    def load(cls, path: str | Path) -> WorkerConfig:
        data = json.loads(Path(path).read_text())
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown worker config fields {sorted(unknown)}")
        cfg = cls(**data)
        if (cfg.epoch is None) != (cfg.next is None):
            raise ValueError("epoch and next come together (or neither, for a standby)")
        if cfg.heartbeat is not None and (cfg.epoch is None or not cfg.heartbeat_ms > 0):
            raise ValueError("a heartbeat needs the epoch it reports and heartbeat_ms > 0")
        if cfg.data_auth not in DATA_AUTH:
            raise ValueError(f"data_auth must be one of {DATA_AUTH}, got {cfg.data_auth!r}")
        if cfg.data_auth == "token" and not (cfg.curve_secret and cfg.upstream_gate):
            # PLAIN without a Gate admits anyone
            raise ValueError("data_auth token needs curve_secret and upstream_gate")
        return cfg

    def initial_routes(self) -> dict[int, Route]:
        routes = {int(epoch): Route(int(r["stage"]), str(r["next"]), r.get("public"),
                                    tuple(r.get("upstream") or ()))
                  for epoch, r in self.routes.items()}
        if self.epoch is not None and self.next is not None:
            routes[self.epoch] = Route(self.stage, self.next, self.next_public,
                                       tuple(self.upstream))
        return routes

    def load_pod_keys(self, curve_dir: Path, config_dir: Path) -> None:
        """CurveZMQ under Kubernetes (testbed.k8s.manifests): the pod's own secret key is mounted in
        `curve_dir/own.secret`, every endpoint's public key in the config map's
        `curve-public.json` ({"stage-0": ..., "controller": ...}); the next hop is the next
        stage, or the controller's sink after the last one."""
        self.curve_secret = (curve_dir / "own.secret").read_text().strip()
        publics = json.loads((config_dir / "curve-public.json").read_text())
        self.next_public = publics.get(f"stage-{self.stage + 1}", publics["controller"])
        self.heartbeat_public = publics["controller"]


class Throttled:
    """Log a recurring problem at most once per `interval` per key, counting the rest: a flood
    of garbage must not turn into a flood of log lines (or of disk writes on a tmpfs)."""

    def __init__(self, log: logging.Logger, interval: float = 1.0) -> None:
        self.log, self.interval = log, interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        extra = self._suppressed.pop(key, 0)
        self._last[key] = now
        self.log.warning("%s%s", message, f" ({extra} similar suppressed)" if extra else "")


@dataclass
class Counters:
    """Per-frame timing and outcome counters; a window is logged and reset periodically."""

    frames: int = 0
    ok: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    compute_s: float = 0.0
    compute_max_s: float = 0.0
    send_wait_s: float = 0.0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def line(self, seconds: float) -> str:
        ok = max(self.ok, 1)
        dropped = " ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        return (f"stats window={seconds:.1f}s frames={self.frames} ok={self.ok} "
                f"rate={self.ok / max(seconds, 1e-9):.1f}/s "
                f"compute_ms_mean={1000 * self.compute_s / ok:.2f} "
                f"compute_ms_max={1000 * self.compute_max_s:.2f} "
                f"send_wait_ms_mean={1000 * self.send_wait_s / ok:.2f} "
                f"computing={100 * self.compute_s / max(seconds, 1e-9):.0f}% "
                f"send_blocked={100 * self.send_wait_s / max(seconds, 1e-9):.0f}% "
                f"dropped: {dropped}")


def die_with_parent(parent_pid: int) -> None:
    """A worker must not outlive its agent: a crashed node's agent takes its workers with it,
    and nothing of ours survives a kill -9 of the agent (PR_SET_PDEATHSIG, Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)     # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:    # the agent died before prctl took effect
        os._exit(1)


LOAD_EVERY_S = 1.0


class Heartbeat:
    """Under Kubernetes the pod has no agent: the worker itself tells the controller it is
    alive. A thread of its own, so a long inference (seconds on a small CPU share) or a
    blocked downstream never delays a beat. Beats are dropped, never queued, while the
    controller is unreachable: a stale beat delivered late would vouch for a dead node."""

    def __init__(self, ctx: zmq.Context, cfg: WorkerConfig, keys: KeyPair | None) -> None:
        assert cfg.heartbeat is not None and cfg.epoch is not None
        self.interval = cfg.heartbeat_ms / 1000.0
        self.fields = {"host": cfg.host, "epoch": cfg.epoch, "stage": cfg.stage}
        self.stop_event = threading.Event()
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, 1)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        # ZMTP heartbeats: a connection cut silently (partition) is dropped and re-dialled
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        if keys is not None:
            if cfg.heartbeat_public is None:
                raise ValueError("CurveZMQ is on: the heartbeat needs the controller's "
                                 "public key")
            apply_client(self.sock, keys, cfg.heartbeat_public)
        self.sock.connect(cfg.heartbeat)
        # the socket is created here and then used by the thread alone (ZeroMQ sockets are
        # not thread-safe; handing one over before first use is allowed)
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        seq = 0
        while True:
            seq += 1
            try:
                self.sock.send_multipart(encode_control("stage_heartbeat", seq=seq,
                                                        **self.fields), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass            # no connection yet, or the last beat is still queued
            if self.stop_event.wait(self.interval):
                break
        self.sock.close(0)

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join()
        else:
            self.sock.close(0)


def make_session(model: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no idle spinning: a spinning thread burns the host's CPU share for nothing
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


# libzmq's events for a refused or broken handshake (the connection is then dropped for good)
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
REDIAL_S = 0.1      # at most one new dial of a refusing next hop this often


class NextHop:
    """The PUSH to one next address, dialled again when its handshake is refused (module
    docstring). Only secured hops can be refused, so only they carry a monitor."""

    def __init__(self, ctx: zmq.Context, address: str, hwm: int, linger_ms: int,
                 secure: Any = None) -> None:
        self.address = address
        self.push = ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, hwm)
        self.push.setsockopt(zmq.LINGER, linger_ms)
        # queue only to a live connection: frames for a dead next hop stay here (and
        # block us) rather than piling up in a pipe that may never drain
        self.push.setsockopt(zmq.IMMEDIATE, 1)
        self.monitor: zmq.Socket | None = None
        if secure is not None:
            secure(self.push)
            self.monitor = self.push.get_monitor_socket(HANDSHAKE_FAILED)
        self.refused = False
        self.dialled = time.monotonic()
        self.redials = 0
        self.push.connect(address)

    def poll_timeout_ms(self) -> int:
        return 50 if self.refused else 200

    def check(self, now: float) -> bool:
        """Take the monitor's events; dial again if refused and `REDIAL_S` has passed (True
        when it did)."""
        if self.monitor is None:
            return False
        while self.monitor.poll(0):
            self.monitor.recv_multipart()
            self.refused = True
        if self.refused and now - self.dialled >= REDIAL_S:
            try:
                self.push.disconnect(self.address)
            except zmq.ZMQError:
                pass            # already dropped by libzmq: nothing to undo
            self.push.connect(self.address)
            self.refused, self.dialled = False, now
            self.redials += 1
            return True
        return False

    def close(self, linger_ms: int) -> None:
        if self.monitor is not None:
            self.push.disable_monitor()
            self.monitor.close(0)
        self.push.close(linger_ms)


class Worker:
    def __init__(self, cfg: WorkerConfig, log: logging.Logger) -> None:
        self.cfg, self.log = cfg, log
        self.throttled = Throttled(log)
        self.limits = Limits(max_bytes=cfg.max_bytes)
        self.stopping = False
        started = time.monotonic()
        self.session = make_session(cfg.model)
        session_inputs = {i.name: i for i in self.session.get_inputs()}
        session_outputs = {o.name for o in self.session.get_outputs()}
        missing = sorted(set(session_inputs) - set(cfg.inputs))
        if missing:
            raise ValueError(f"the stage model needs inputs {missing} that the stage does not "
                             f"receive")
        # an output that is also an input is passed through unchanged (multi-tensor cuts)
        self.computed = [o for o in cfg.outputs if o not in cfg.inputs]
        absent = sorted(set(self.computed) - session_outputs)
        if absent:
            raise ValueError(f"the stage model does not produce outputs {absent}")
        self.feeds = list(session_inputs)
        # numpy dtypes, compared per frame (numpy's `dtype.name` costs 14 us a call)
        self.feed_dtypes = {n: np.dtype(ORT_TYPES[i.type]) if i.type in ORT_TYPES else None
                            for n, i in session_inputs.items()}
        self.expected = set(cfg.inputs)
        self.log.info("session loaded in %.2fs: %s feeds=%s computes=%s passes=%s",
                      time.monotonic() - started, cfg.model, self.feeds, self.computed,
                      [o for o in cfg.outputs if o in cfg.inputs])

        self.ctx = zmq.Context(1)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, cfg.hwm)
        self.pull.setsockopt(zmq.LINGER, 0)
        # CurveZMQ: encrypted, and senders must know our public key; with upstream_gate (the
        # embedded agent's workers, k3s stage pods) only the keys the routes name as upstream
        # get in: the Gate's allow-list follows the routes (a re-plan changes who sends to us)
        self.keys = KeyPair.from_secret(cfg.curve_secret) if cfg.curve_secret else None
        self.gate: Gate | None = None
        self.zap = None
        routes = cfg.initial_routes()
        if self.keys is not None:
            apply_data_server(self.pull, self.keys, cfg.data_auth)
            if cfg.upstream_gate:
                self.gate = Gate(own=self.keys if cfg.data_auth == "token" else None)
                self.zap = start_gates(self.ctx, {"upstream": self.gate})
                self.pull.zap_domain = b"upstream"
        self.pull.bind(cfg.bind)
        self.routes: dict[int, Route] = {}
        self.hops: dict[str, NextHop] = {}            # next address -> its PUSH
        for epoch, route in routes.items():
            self.add_route(epoch, route)
        self.stdin_fd: int | None = None
        self.stdin_buffer = b""
        if cfg.commands:
            self.stdin_fd = sys.stdin.fileno()
            os.set_blocking(self.stdin_fd, False)
        self.heartbeat = (Heartbeat(self.ctx, cfg, self.keys)
                          if cfg.heartbeat is not None else None)
        self.window = Counters()
        self.total = Counters()
        self.load = Counters()          # the current LOAD_EVERY_S window, for the agent

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.pull.close(0)
        for hop in self.hops.values():
            hop.close(self.cfg.linger_ms)
        if self.zap is not None:
            self.zap.stop()
        self.ctx.term()

    # -- routes --------------------------------------------------------------------------------

    def add_route(self, epoch: int, route: Route) -> None:
        old = self.routes.get(epoch)
        self.routes[epoch] = route
        self._open_gate()
        if self.keys is not None and route.public is None:
            raise ValueError(f"CurveZMQ is on: the route of epoch {epoch} lacks the public "
                             f"key of {route.next}")
        if route.next not in self.hops:
            keys, public, mode = self.keys, route.public, self.cfg.data_auth
            secure = (None if keys is None or public is None else
                      lambda push: apply_data_client(push, keys, public, mode))
            self.hops[route.next] = NextHop(self.ctx, route.next, self.cfg.hwm,
                                            self.cfg.linger_ms, secure)
        if old is not None and old.next != route.next:
            self._close_unused(old.next)
        self.log.info("route: epoch %d as stage %d -> %s", epoch, route.stage, route.next)

    def _open_gate(self) -> None:
        """Admit the upstream of every route we serve (frames of an old epoch still
        arrive while it drains; they are dropped by epoch, not refused here)."""
        if self.gate is not None:
            self.gate.set({key for route in self.routes.values() for key in route.upstream})

    def remove_route(self, epoch: int) -> None:
        old = self.routes.pop(epoch, None)
        self._open_gate()
        if old is not None:
            self._close_unused(old.next)
            self.log.info("route of epoch %d withdrawn", epoch)

    def _close_unused(self, address: str) -> None:
        if all(r.next != address for r in self.routes.values()):
            # frames still queued there belong to withdrawn epochs: dropping them is right
            self.hops.pop(address).close(0)

    def read_commands(self) -> None:
        """Apply the route changes the agent wrote to stdin, confirming each on stdout."""
        assert self.stdin_fd is not None
        try:
            data = os.read(self.stdin_fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self.log.warning("stdin closed: the agent is gone; exiting")
            self.stopping = True
            return
        self.stdin_buffer += data
        *lines, self.stdin_buffer = self.stdin_buffer.split(b"\n")
        for line in lines:
            try:
                cmd = json.loads(line)
                op, epoch = cmd["op"], int(cmd["epoch"])
                if op == "route":
                    self.add_route(epoch, Route(int(cmd["stage"]), str(cmd["next"]),
                                                cmd.get("public"),
                                                tuple(cmd.get("upstream") or ())))
                    print(f"routed {epoch}", flush=True)
                elif op == "unroute":
                    self.remove_route(epoch)
                    print(f"unrouted {epoch}", flush=True)
                else:
                    raise ValueError(f"unknown op {op!r}")
            except (ValueError, KeyError, TypeError, zmq.ZMQError) as exc:
                self.log.warning("bad command from the agent ignored: %s (%r)", exc,
                                 line[:200])

    # -- one frame -----------------------------------------------------------------------------

    def handle(self, frames: list[zmq.Frame]) -> tuple[int, list[Any]] | None:
        """(epoch, outgoing frames) for a received message, or None when it is dropped."""
        cfg = self.cfg
        try:
            frame = decode_tensors(frames, self.limits)
        except FrameError as exc:
            return self._drop("bad_frame", f"bad frame dropped: {exc}")
        if frame.epoch not in self.routes:
            return self._drop("stale_epoch", f"frame rid={frame.rid} of epoch {frame.epoch} "
                              f"dropped (this worker serves epochs {sorted(self.routes)})")
        if frame.version != cfg.version:
            return self._drop("wrong_version", f"frame rid={frame.rid} of version "
                              f"{frame.version} dropped (this worker serves {cfg.version})")
        if set(frame.tensors) != self.expected:
            return self._drop("wrong_tensors", f"frame rid={frame.rid} carries "
                              f"{sorted(frame.tensors)}, stage expects {sorted(self.expected)}")
        for name in self.feeds:
            want = self.feed_dtypes[name]
            if want is not None and frame.tensors[name].dtype != want:
                return self._drop("wrong_dtype", f"frame rid={frame.rid}: {name} is "
                                  f"{frame.tensors[name].dtype}, stage expects {want}")
        started = time.perf_counter()
        try:
            results = self.session.run(self.computed,
                                       {n: frame.tensors[n] for n in self.feeds})
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types on bad input
            return self._drop("run_error", f"frame rid={frame.rid}: onnxruntime refused it: "
                              f"{str(exc).splitlines()[0][:200]}")
        elapsed = time.perf_counter() - started
        self.window.compute_s += elapsed
        self.window.compute_max_s = max(self.window.compute_max_s, elapsed)
        self.load.frames += 1
        self.load.compute_s += elapsed
        produced = dict(zip(self.computed, results, strict=True))
        out = [(name, produced[name] if name in produced else frame.tensors[name])
               for name in cfg.outputs]
        try:
            return frame.epoch, encode_tensors(frame.rid, frame.epoch, frame.version,
                                               frame.sent, out, self.limits)
        except FrameError as exc:
            return self._drop("encode_error", f"frame rid={frame.rid}: cannot send result: "
                              f"{exc}")

    def _drop(self, reason: str, message: str) -> None:
        self.window.drop(reason)
        self.throttled.warning(reason, message)
        return None

    def send(self, epoch: int, frames: list[Any]) -> bool:
        """Send along the epoch's route, waiting (bounded queue = backpressure) but staying
        responsive to SIGTERM and to route changes: a frame whose route is withdrawn or moved
        while it waits is dropped (its epoch is over; the dispatcher replays it)."""
        route = self.routes[epoch]
        hop = self.hops[route.next]
        try:
            # the common case, with room downstream: no poller, no clock reads
            hop.push.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            pass
        started = time.perf_counter()
        poller = zmq.Poller()
        poller.register(hop.push, zmq.POLLOUT)
        if hop.monitor is not None:
            poller.register(hop.monitor, zmq.POLLIN)
        if self.stdin_fd is not None:
            poller.register(self.stdin_fd, zmq.POLLIN)
        try:
            while not self.stopping:
                if hop.check(time.monotonic()):
                    self.throttled.warning("redial", f"next hop {hop.address} refused our "
                                           f"handshake: dialled again ({hop.redials} so far)")
                ready = dict(poller.poll(hop.poll_timeout_ms()))
                if self.stdin_fd is not None and self.stdin_fd in ready:
                    self.read_commands()
                if self.routes.get(epoch) != route:
                    self._drop("route_withdrawn", f"a frame of epoch {epoch} dropped: its "
                               f"route changed while it waited")
                    return False
                try:
                    hop.push.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                    return True
                except zmq.Again:
                    continue
            return False
        finally:
            self.window.send_wait_s += time.perf_counter() - started

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        print("ready", flush=True)
        # beats start once the model is loaded and the socket bound: a beat of this epoch
        # tells the controller that this stage serves
        if self.heartbeat is not None:
            self.heartbeat.start()
            self.log.info("heartbeat to %s every %.0f ms", self.cfg.heartbeat,
                          self.cfg.heartbeat_ms)
        self.log.info("ready: version %d, PULL %s, routes %s", self.cfg.version,
                      self.cfg.bind, {e: (r.stage, r.next) for e, r in self.routes.items()})
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        if self.stdin_fd is not None:
            poller.register(self.stdin_fd, zmq.POLLIN)
        window_start = load_start = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            if now - window_start >= self.cfg.stats_every_s:
                self._flush_stats(now - window_start)
                window_start = now
            if self.stdin_fd is not None and now - load_start >= LOAD_EVERY_S:
                frames = self.load.frames
                mean_ms = 1000 * self.load.compute_s / frames if frames else 0.0
                print(f"load {frames} {mean_ms:.3f}", flush=True)
                self.load, load_start = Counters(), now
            # Under load a frame is usually waiting: take it without a poll (a zmq_poll per
            # frame was the largest cost of this loop outside onnxruntime). Only an empty
            # queue sleeps in poll, which also wakes for the agent's commands.
            try:
                frames = self.pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                ready = dict(poller.poll(200))
                if self.stdin_fd is not None and self.stdin_fd in ready:
                    self.read_commands()
                continue
            self.window.frames += 1
            out = self.handle(frames)
            if out is not None and self.send(*out):
                self.window.ok += 1
            if self.stdin_fd is not None:
                # a busy worker still takes route changes at once: one read(2) that
                # finds nothing costs far less than a poll
                self.read_commands()
        self._flush_stats(time.monotonic() - window_start)
        t = self.total
        self.log.info("exiting: frames=%d ok=%d dropped=%s", t.frames, t.ok, t.dropped or {})

    def _flush_stats(self, seconds: float) -> None:
        w = self.window
        if w.frames:
            self.log.info("%s", w.line(seconds))
        self.total.frames += w.frames
        self.total.ok += w.ok
        for reason, count in w.dropped.items():
            self.total.dropped[reason] = self.total.dropped.get(reason, 0) + count
        self.window = Counters()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m stage_image.worker CONFIG.json", file=sys.stderr)
        return 2
    try:
        cfg = WorkerConfig.load(argv[0])
        curve_dir = os.environ.get("EDGEPIPE_CURVE_DIR")
        if curve_dir:
            cfg.load_pod_keys(Path(curve_dir), Path(argv[0]).parent)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        print(f"worker: bad config {argv[0]}: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format=f"%(asctime)s worker[{cfg.host} {cfg.bind.rsplit(':', 1)[-1]}] "
               f"%(levelname)s %(message)s")
    log = logging.getLogger("worker")
    if cfg.parent_pid is not None:
        die_with_parent(cfg.parent_pid)
    if cfg.nice:
        os.nice(cfg.nice)
    try:
        worker = Worker(cfg, log)
    except Exception as exc:  # noqa: BLE001 - any start-up failure is reported the same way
        log.error("cannot start: %s", exc)
        return 1

    def on_signal(signum: int, _frame: Any) -> None:
        worker.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        worker.run()
    finally:
        worker.close()
    # skip the interpreter's teardown: freeing a large onnxruntime session on a small CPU
    # share takes seconds, and a stopped worker's port and memory are wanted back at once
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
