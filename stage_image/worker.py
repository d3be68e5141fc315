"""One pipeline stage: `python -m stage_image.worker CONFIG.json`.

The worker is deliberately dumb: it loads one stage model into onnxruntime (one intra-op
thread, one inter-op thread, sequential execution: spinning thread pools collapse under CPU
limits), binds a PULL socket, connects a PUSH socket to the next stage (or the sink), and for
every frame: validate, run, forward. Placement, epochs and model files are decided by the
controller and handled by the agent, which wrote CONFIG.json and watches this process.

Robustness rules: a bad frame (malformed header, wrong tensors, wrong epoch or version, an
onnxruntime error on its contents) is dropped with a rate-limited log line and counted; the
worker never dies of one. Queues stay bounded (small ZeroMQ high-water marks, and a blocked
downstream blocks us instead of buffering). SIGTERM ends the loop and exits 0.

Protocol with the agent: once the session is loaded and the socket bound, the worker prints
the single line `ready` on stdout (a pipe the agent polls); logs go to stderr.

CONFIG.json fields (written by stage_image.agent):
  host, epoch, stage, version, model (path), bind (tcp://IP:PORT), next (address),
  inputs, outputs (tensor names, stages.json order), and optionally
  hwm (default 4), stats_every_s (default 5.0), max_bytes (default 256 MiB), linger_ms (0),
  parent_pid (the agent: the worker dies with it), nice (added to the worker's niceness).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort
import zmq

from stage_image.wire import DEFAULT_MAX_BYTES, FrameError, Limits, decode_tensors, encode_tensors

ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
    "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}


@dataclass
class WorkerConfig:
    host: str
    epoch: int
    stage: int
    version: int
    model: str
    bind: str
    next: str
    inputs: list[str]
    outputs: list[str]
    hwm: int = 4
    stats_every_s: float = 5.0
    max_bytes: int = DEFAULT_MAX_BYTES
    linger_ms: int = 0
    parent_pid: int | None = None
    nice: int = 0

    @classmethod
    def load(cls, path: str | Path) -> WorkerConfig:
        data = json.loads(Path(path).read_text())
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown worker config fields {sorted(unknown)}")
        return cls(**data)


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
        self.feed_dtypes = {n: ORT_TYPES.get(i.type) for n, i in session_inputs.items()}
        self.expected = set(cfg.inputs)
        self.log.info("session loaded in %.2fs: %s feeds=%s computes=%s passes=%s",
                      time.monotonic() - started, cfg.model, self.feeds, self.computed,
                      [o for o in cfg.outputs if o in cfg.inputs])

        self.ctx = zmq.Context(1)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, cfg.hwm)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.bind(cfg.bind)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, cfg.hwm)
        self.push.setsockopt(zmq.LINGER, cfg.linger_ms)
        # queue only to a live connection: frames for a dead next hop stay here (and block
        # us) rather than piling up in a pipe that may never drain
        self.push.setsockopt(zmq.IMMEDIATE, 1)
        self.push.connect(cfg.next)
        self.window = Counters()
        self.total = Counters()

    def close(self) -> None:
        self.pull.close(0)
        self.push.close(self.cfg.linger_ms)
        self.ctx.term()

    # -- one frame -----------------------------------------------------------------------------

    def handle(self, frames: list[zmq.Frame]) -> list[Any] | None:
        """Outgoing frames for a received message, or None when it is dropped."""
        cfg = self.cfg
        try:
            frame = decode_tensors(frames, self.limits)
        except FrameError as exc:
            return self._drop("bad_frame", f"bad frame dropped: {exc}")
        if frame.epoch != cfg.epoch:
            return self._drop("stale_epoch", f"frame rid={frame.rid} of epoch {frame.epoch} "
                              f"dropped (this worker serves epoch {cfg.epoch})")
        if frame.version != cfg.version:
            return self._drop("wrong_version", f"frame rid={frame.rid} of version "
                              f"{frame.version} dropped (this worker serves {cfg.version})")
        if set(frame.tensors) != self.expected:
            return self._drop("wrong_tensors", f"frame rid={frame.rid} carries "
                              f"{sorted(frame.tensors)}, stage expects {sorted(self.expected)}")
        for name in self.feeds:
            want = self.feed_dtypes[name]
            if want is not None and frame.tensors[name].dtype.name != want:
                return self._drop("wrong_dtype", f"frame rid={frame.rid}: {name} is "
                                  f"{frame.tensors[name].dtype.name}, stage expects {want}")
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
        produced = dict(zip(self.computed, results, strict=True))
        out = [(name, produced[name] if name in produced else frame.tensors[name])
               for name in cfg.outputs]
        try:
            return encode_tensors(frame.rid, frame.epoch, frame.version, frame.sent, out,
                                  self.limits)
        except FrameError as exc:
            return self._drop("encode_error", f"frame rid={frame.rid}: cannot send result: "
                              f"{exc}")

    def _drop(self, reason: str, message: str) -> None:
        self.window.drop(reason)
        self.throttled.warning(reason, message)
        return None

    def send(self, frames: list[Any]) -> bool:
        """Send, waiting (bounded queue = backpressure) but staying responsive to SIGTERM."""
        started = time.perf_counter()
        try:
            while not self.stopping:
                try:
                    self.push.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                    return True
                except zmq.Again:
                    self.push.poll(200, zmq.POLLOUT)
            return False
        finally:
            self.window.send_wait_s += time.perf_counter() - started

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        print("ready", flush=True)
        self.log.info("ready: epoch %d stage %d version %d, PULL %s -> PUSH %s",
                      self.cfg.epoch, self.cfg.stage, self.cfg.version, self.cfg.bind,
                      self.cfg.next)
        window_start = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            if now - window_start >= self.cfg.stats_every_s:
                self._flush_stats(now - window_start)
                window_start = now
            try:
                # receive first, poll only when idle: one system call less per frame
                frames = self.pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.pull.poll(200, zmq.POLLIN)
                continue
            self.window.frames += 1
            out = self.handle(frames)
            if out is not None and self.send(out):
                self.window.ok += 1
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
    except (OSError, ValueError, TypeError) as exc:
        print(f"worker: bad config {argv[0]}: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format=f"%(asctime)s worker[{cfg.host} e{cfg.epoch}/s{cfg.stage}] "
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
