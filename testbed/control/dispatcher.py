"""The dispatcher: load generator + sink, running inside the controller process.

Division of labour: the controller decides *where* frames go (it calls `switch` when an epoch
becomes active); the dispatcher decides *what* is sent and *whether it came back right*:

- inputs come from a fixed, seeded pool; the full model's outputs for the pool are computed
  once (onnxruntime, one thread) per model version, so every result is checked
  (`np.allclose`, atol 1e-4, rtol 1e-3) against the reference of the version that served it;
- closed loop (keep `concurrency` requests outstanding) or open loop (`rate` per second);
- every input is kept until its result is back: requests are replayed on timeout (at least
  `timeout_s`, stretched to 3x the slowest recent attempt so a slow pipeline is not flooded)
  and on a new epoch (at-least-once processing), and the sink de-duplicates by request id
  (exactly-once results; extra results are counted as `duplicates`, never delivered twice);
  a result is accepted from whichever live epoch answers first and checked against the
  reference of the model version named in its header; results of retired epochs (a node cut
  off and back, still finishing old work) are dropped and counted as `stale_results`;
- at the end: stop issuing, drain in-flight requests up to a drain timeout, then everything
  unanswered is `lost`; one row per request goes to requests.csv.

The dispatcher owns two sockets: a PUSH to stage 0 of the active epoch (replaced on `switch`)
and the sink PULL (bound once). It never blocks: the controller's loop polls its sockets and
calls `on_sink`, `pump` and `status`.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from stage_image.security import KeyPair, apply_data_client, apply_data_server
from stage_image.wire import DTYPES, FrameError, decode_tensors, encode_tensors

ATOL, RTOL = 1e-4, 1e-3
REQUEST_COLUMNS = ["rid", "input", "epoch", "version", "sent", "done", "latency_ms",
                   "attempts", "status", "mismatched"]
Emit = Callable[..., None]      # emit(type, **fields): appends to events.jsonl


# -- workload ---------------------------------------------------------------------------------

@dataclass
class Workload:
    mode: str = "closed"          # closed | open
    concurrency: int = 4          # closed loop: requests outstanding
    rate: float = 10.0            # open loop: requests per second
    arrival: str = "uniform"      # open loop: uniform | poisson
    duration_s: float = 30.0      # issuing time (warm-up included)
    warmup_s: float = 0.0         # informational: the driver measures after it
    seed: int = 1
    pool_size: int = 8
    timeout_s: float = 5.0        # replay a request unanswered this long (at least)
    drain_timeout_s: float = 10.0
    input_dims: dict[str, int] = field(default_factory=dict)   # symbolic dim -> size

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Workload:
        """Build from JSON, refusing unknown fields and impossible values (ValueError)."""
        if not isinstance(data, dict):
            raise ValueError("workload must be an object")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown workload fields {unknown}")
        w = cls(**data)
        if w.mode not in ("closed", "open"):
            raise ValueError(f"workload.mode must be closed or open, got {w.mode!r}")
        if w.arrival not in ("uniform", "poisson"):
            raise ValueError(f"workload.arrival must be uniform or poisson, got {w.arrival!r}")
        for name in ("concurrency", "pool_size"):
            value = getattr(w, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"workload.{name} must be a positive integer")
        for name in ("rate", "duration_s", "timeout_s"):
            value = getattr(w, name)
            if not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ValueError(f"workload.{name} must be a positive number")
        for name in ("warmup_s", "drain_timeout_s"):
            value = getattr(w, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"workload.{name} must be a non-negative number")
        return w

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# -- input pool and references ----------------------------------------------------------------

@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str                      # numpy dtype name
    shape: tuple[int | str | None, ...]


ORT_TO_NUMPY = {"tensor(float)": "float32", "tensor(float16)": "float16",
                "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8",
                "tensor(bool)": "bool"}
InputGenerator = Callable[[np.random.Generator, list[InputSpec]], dict[str, np.ndarray]]


def session(model: str | Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def input_specs(model: str | Path) -> list[InputSpec]:
    specs = []
    for i in session(model).get_inputs():
        if i.type not in ORT_TO_NUMPY:
            raise ValueError(f"model input {i.name} has type {i.type}, which cannot be sent")
        specs.append(InputSpec(i.name, ORT_TO_NUMPY[i.type], tuple(i.shape)))
    return specs


def vocab_sizes(model: str | Path) -> dict[str, int]:
    """Range of every integer input used as Gather indices into an initializer (an embedding
    table), followed through Reshape/Cast/Unsqueeze/Squeeze (`partitioner.inputs`): token
    ids must stay below the table's size along the gathered axis."""
    import onnx

    from partitioner.inputs import vocab_sizes as graph_vocab_sizes

    return graph_vocab_sizes(onnx.load(str(model), load_external_data=False))


def input_dims(model: str | Path, input_shapes: dict[str, tuple[int, ...]],
               field_name: str = "model.input_shapes") -> dict[str, int]:
    """`Workload.input_dims` (symbolic dimension -> size) for stated input shapes, by the
    partitioner's rules (batch 1 by default; another symbolic dimension without a value is
    an InputError), so requests have the shapes the plan was priced at."""
    import onnx

    from partitioner.inputs import resolve_shapes

    graph_only = onnx.load(str(model), load_external_data=False)
    return resolve_shapes(graph_only, input_shapes, field_name).dims


def default_generator(vocab: dict[str, int]) -> InputGenerator:
    """Normal floats; attention masks as ones with a seeded tail of zeros; token type ids as
    zeros; other integers as ids below the embedding size (2 when unknown, always valid)."""

    def generate(rng: np.random.Generator, specs: list[InputSpec]) -> dict[str, np.ndarray]:
        out = {}
        for spec in specs:
            shape = tuple(d for d in spec.shape)   # resolved to ints by make_pool
            dtype = np.dtype(spec.dtype)
            lower = spec.name.lower()
            if dtype.kind == "f":
                out[spec.name] = rng.standard_normal(shape).astype(dtype)
            elif "mask" in lower:
                mask = np.ones(shape, dtype)
                if mask.ndim and shape[-1] > 1:
                    tail = int(rng.integers(0, shape[-1] // 2 + 1))
                    if tail:
                        mask[..., shape[-1] - tail:] = 0
                out[spec.name] = mask
            elif dtype.kind == "b":
                out[spec.name] = rng.random(shape) < 0.5
            elif "type" in lower or "segment" in lower:
                out[spec.name] = np.zeros(shape, dtype)
            elif dtype == np.uint8:
                out[spec.name] = rng.integers(0, 256, shape).astype(dtype)
            else:
                out[spec.name] = rng.integers(0, vocab.get(spec.name, 2), shape).astype(dtype)
        return out

    return generate


def make_pool(specs: list[InputSpec], size: int, seed: int, dims: dict[str, int],
              generator: InputGenerator) -> list[dict[str, np.ndarray]]:
    """`size` seeded inputs. Symbolic dims take their value from `dims` (default 1)."""
    resolved = [InputSpec(s.name, s.dtype,
                          tuple(d if isinstance(d, int) and d >= 0 else dims.get(str(d), 1)
                                for d in s.shape)) for s in specs]
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(size):
        sample = generator(rng, resolved)
        for spec in resolved:
            array = sample[spec.name]
            if array.dtype.name != spec.dtype or array.dtype.name not in DTYPES:
                raise ValueError(f"generated {spec.name} as {array.dtype}, need {spec.dtype}")
            sample[spec.name] = array.copy(order="C")
        pool.append(sample)
    return pool


def seeded_pool(model: str | Path, workload: Workload) -> list[dict[str, np.ndarray]]:
    """The workload's input pool for a model: the same inputs for the same seed and model,
    whichever controller (embedded or k3s) builds it."""
    return make_pool(input_specs(model), workload.pool_size, workload.seed,
                     workload.input_dims, default_generator(vocab_sizes(model)))


def compute_references(model: str | Path,
                       pool: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The full model's outputs for every pool input (computed once, one thread)."""
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    feeds = [i.name for i in sess.get_inputs()]
    return [dict(zip(names, sess.run(names, {n: x[n] for n in feeds}), strict=True))
            for x in pool]


def matches(result: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> bool:
    for name, ref in reference.items():
        got = result.get(name)
        if got is None or got.shape != ref.shape:
            return False
        if ref.dtype.kind in "fc":
            if not np.allclose(got, ref, atol=ATOL, rtol=RTOL):
                return False
        elif not np.array_equal(got, ref):
            return False
    return True


# -- requests ---------------------------------------------------------------------------------

@dataclass
class Request:
    rid: int
    index: int                    # into the input pool
    sent: float                   # unix time of issue (first send)
    sent_mono: float
    epoch: int = 0                # of the last send, then of the result that answered it
    version: int = 0
    attempts: int = 0
    last_send: float = 0.0        # monotonic, of the last send attempt
    queued: bool = False          # waiting in the outbox
    done: float | None = None     # unix time the first result arrived
    latency_ms: float | None = None
    status: str = "pending"       # pending | completed | lost
    mismatched: bool = False

    def row(self) -> list[Any]:
        return [self.rid, self.index, self.epoch, self.version, f"{self.sent:.6f}",
                "" if self.done is None else f"{self.done:.6f}",
                "" if self.latency_ms is None else f"{self.latency_ms:.3f}",
                self.attempts, self.status, int(self.mismatched)]


@dataclass
class Head:
    """Stage 0 of one pipeline of the active epoch (and its CurveZMQ public key)."""

    address: str
    public: str | None = None


@dataclass
class Route:
    """Where requests go now: the stage 0 of every pipeline of the active epoch (one, or
    several side by side when the plan replicates the pipeline; ZeroMQ's PUSH deals requests
    to them in turn)."""

    epoch: int
    version: int
    heads: list[Head]
    inputs: list[str]


class Dispatcher:
    def __init__(self, ctx: zmq.Context, sink_bind: str, emit: Emit, log: logging.Logger,
                 hwm: int = 16, keys: KeyPair | None = None,
                 zap_domain: str | None = None, data_auth: str = "curve") -> None:
        self.ctx, self.emit, self.log, self.hwm = ctx, emit, log, hwm
        self.keys = keys            # CurveZMQ: the sink's server keys, the push's client keys
        # with keys, "curve" encrypts both hops, "token" authenticates them (security.py)
        self.data_auth = data_auth
        self.sink = ctx.socket(zmq.PULL)
        self.sink.setsockopt(zmq.LINGER, 0)
        self.sink.setsockopt(zmq.RCVHWM, 1000)
        if keys is not None:
            if data_auth == "token" and zap_domain is None:
                raise ValueError("data_auth token needs the sink's ZAP Gate (zap_domain)")
            apply_data_server(self.sink, keys, data_auth)
            if zap_domain is not None:
                # the controller's ZAP Gate for this domain admits live last stages only
                self.sink.zap_domain = zap_domain.encode()
        self.sink.bind(sink_bind)
        self.sink_address = sink_bind
        self.push: zmq.Socket | None = None
        self.route: Route | None = None
        self.pool: list[dict[str, np.ndarray]] = []
        self.references: dict[int, list[dict[str, np.ndarray]]] = {}
        self.workload: Workload | None = None
        self.state = "idle"           # idle | running | draining | done
        self.requests: list[Request] = []
        self.pending: dict[int, Request] = {}
        self.outbox: deque[Request] = deque()
        self.rng = np.random.default_rng(0)
        self.started_mono = self.started = 0.0
        self.next_arrival = 0.0
        self.drain_deadline = 0.0
        self.completed = self.lost = self.mismatched = self.duplicates = 0
        self.by_version: dict[int, int] = {}        # completions per serving model version
        self.replays = self.bad_results = self.unknown_results = self.stale_results = 0
        self.retired: set[int] = set()      # epochs whose results are no longer accepted
        self.recent: deque[tuple[float, float]] = deque()      # (done monotonic, latency ms)
        # (done monotonic, seconds) of the attempt that answered, from the frame's `sent`:
        # end-to-end latency includes earlier timeouts and would feed back into the timeout
        self.attempts_recent: deque[tuple[float, float]] = deque()
        self._timeouts_pending = 0
        self._next_scan = 0.0
        self._timeouts_reported = 0.0
        self._last_bad_log = 0.0

    # -- set-up --------------------------------------------------------------------------------

    def set_pool(self, pool: list[dict[str, np.ndarray]]) -> None:
        self.pool = pool

    def add_version(self, version: int, references: list[dict[str, np.ndarray]]) -> None:
        if len(references) != len(self.pool):
            raise ValueError("one reference per pool input is needed")
        self.references[version] = references

    def switch(self, route: Route, replay: bool = True) -> int:
        """Send to a new stage 0 from now on. With `replay` (the old pipeline is broken),
        every unanswered request is sent again at once; without (a healthy hand-over: a
        re-plan for a returned node, a new model version), requests already in the old
        pipeline are left to finish there, and only what it has not answered when the
        controller retires it is replayed (`replay_epochs`). Either way a result is accepted
        from whichever epoch answers first and checked against the reference of the model
        version that produced it; later copies count as duplicates and are not delivered."""
        if route.version not in self.references:
            raise ValueError(f"no references for version {route.version}")
        if self.push is not None:
            self.push.close(0)
        push = self.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, self.hwm)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.IMMEDIATE, 1)   # nothing queues before stage 0 is connected
        if not route.heads:
            raise ValueError("a route needs at least one stage 0")
        for head in route.heads:
            if self.keys is not None:
                # the server key applies to the connects after it: one per head
                if head.public is None:
                    raise ValueError("CurveZMQ is on: stage 0's public key is missing")
                apply_data_client(push, self.keys, head.public, self.data_auth)
            push.connect(head.address)
        self.push, self.route = push, route
        if not replay:
            return 0
        return self.replay_epochs(None, "epoch")

    def replay_epochs(self, epochs: set[int] | None, reason: str) -> int:
        """Queue for sending (on the current route) every unanswered request last sent on one
        of `epochs` (None: all of them). Returns how many were replays (sent before)."""
        queued = {r.rid for r in self.outbox}
        replayed = 0
        for request in sorted(self.pending.values(), key=lambda r: r.rid):
            if request.rid in queued or (epochs is not None and request.epoch not in epochs):
                continue
            request.queued = True
            self.outbox.append(request)
            replayed += request.attempts > 0
        if replayed:
            self.emit("requests.replayed", reason=reason,
                      epoch=self.route.epoch if self.route else None, count=replayed)
        return replayed

    def retire(self, epoch: int) -> None:
        """Accept no more results of `epoch` (its requests are replayed elsewhere)."""
        self.retired.add(epoch)

    def in_flight_on(self, epoch: int) -> int:
        """Requests sent on `epoch` and not answered yet."""
        return sum(1 for r in self.pending.values()
                   if r.epoch == epoch and not r.queued and r.attempts)

    # -- workload lifecycle --------------------------------------------------------------------

    def start(self, workload: Workload) -> None:
        if self.state != "idle":
            raise RuntimeError(f"workload already {self.state}")
        if self.route is None or not self.pool:
            raise RuntimeError("no active epoch yet")
        self.workload = workload
        self.rng = np.random.default_rng(workload.seed)
        self.started, self.started_mono = time.time(), time.monotonic()
        self.next_arrival = self.started_mono
        self.state = "running"
        self.emit("workload.started", **workload.to_json(), epoch=self.route.epoch)
        self.log.info("workload started: %s", workload.to_json())

    def stop_issuing(self, now: float, drain: bool = True) -> None:
        if self.state != "running":
            return
        assert self.workload is not None
        self.state = "draining"
        self.drain_deadline = now + (self.workload.drain_timeout_s if drain else 0.0)
        self.emit("workload.stopped", sent=len(self.requests), in_flight=len(self.pending))

    def finish(self) -> None:
        """Everything still unanswered is lost."""
        if self.state in ("idle", "done"):
            return
        for request in self.pending.values():
            request.status = "lost"
        self.lost += len(self.pending)
        self.pending.clear()
        self.outbox.clear()
        self.state = "done"
        self.emit("workload.done", **self.counts())
        self.log.info("workload done: %s", self.counts())

    # -- the loop's work -----------------------------------------------------------------------

    def pump(self, now: float) -> None:
        """Issue due requests, queue timed-out ones for replay, send what can be sent."""
        w = self.workload
        if self.state == "running" and w is not None:
            if now - self.started_mono >= w.duration_s:
                self.stop_issuing(now)
            elif w.mode == "closed":
                while len(self.pending) < w.concurrency:
                    self._issue(now)
            else:
                while self.next_arrival <= now:
                    self._issue(now)
                    gap = (1.0 / w.rate if w.arrival == "uniform"
                           else float(self.rng.exponential(1.0 / w.rate)))
                    self.next_arrival += gap
        if self.state == "draining" and (not self.pending or now >= self.drain_deadline):
            self.finish()
            return
        if self.state in ("running", "draining") and w is not None and now >= self._next_scan:
            self._next_scan = now + 0.05     # a scan of everything pending, 20 times a second
            timeout = self.timeout_s(now)
            for request in self.pending.values():
                if not request.queued and now - request.last_send > timeout:
                    request.queued = True
                    self.outbox.append(request)
                    self._timeouts_pending += 1
            if self._timeouts_pending and now - self._timeouts_reported >= 1.0:
                # aggregated: a dead pipeline times out every request, one event per second
                self.emit("requests.replayed", reason="timeout",
                          epoch=self.route.epoch if self.route else None,
                          count=self._timeouts_pending)
                self._timeouts_pending, self._timeouts_reported = 0, now
        self._send_outbox(now)

    def timeout_s(self, now: float) -> float:
        """The configured timeout, stretched to 3x the slowest recent latency: a slow but
        healthy pipeline (big model, small CPU share) must not be flooded with replays. A dead
        one stops completing, its recent window empties, and the configured value returns.
        Replays on a new epoch do not wait for this at all."""
        assert self.workload is not None
        while self.attempts_recent and self.attempts_recent[0][0] < now - 5.0:
            self.attempts_recent.popleft()
        slowest = max((s for _, s in self.attempts_recent), default=0.0)
        return max(self.workload.timeout_s, 3.0 * slowest)

    def _issue(self, now: float) -> None:
        assert self.workload is not None
        rid = len(self.requests)
        request = Request(rid, int(self.rng.integers(len(self.pool))), time.time(), now,
                          queued=True)
        self.requests.append(request)
        self.pending[rid] = request
        self.outbox.append(request)

    def _send_outbox(self, now: float) -> None:
        route, push = self.route, self.push
        if route is None or push is None:
            return
        while self.outbox:
            request = self.outbox[0]
            if request.status != "pending":
                self.outbox.popleft()
                continue
            inputs = self.pool[request.index]
            frames = encode_tensors(request.rid, route.epoch, route.version, time.time(),
                                    [(n, inputs[n]) for n in route.inputs])
            try:
                push.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return                      # stage 0 busy or not connected: try later
            self.outbox.popleft()
            request.queued = False
            self.replays += request.attempts > 0      # replays = sends beyond the first
            request.attempts += 1
            request.last_send = now
            request.epoch, request.version = route.epoch, route.version

    def wants_pollout(self) -> bool:
        return bool(self.outbox) and self.push is not None

    def next_wakeup(self, now: float) -> float:
        """Seconds until `pump` has something to do (the loop's poll timeout)."""
        w = self.workload
        if self.state == "running" and w is not None and w.mode == "open":
            return max(0.0, self.next_arrival - now)
        return 0.05

    def on_sink(self, budget: int = 256) -> None:
        for _ in range(budget):
            try:
                frames = self.sink.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_result(frames)

    def _on_result(self, frames: list[zmq.Frame]) -> None:
        now_mono, now = time.monotonic(), time.time()
        try:
            frame = decode_tensors(frames)
        except FrameError as exc:
            self.bad_results += 1
            if now_mono - self._last_bad_log > 1.0:
                self.log.warning("bad result frame dropped: %s", exc)
                self._last_bad_log = now_mono
            return
        if not 0 <= frame.rid < len(self.requests):
            self.unknown_results += 1
            return
        if frame.epoch in self.retired:
            # a node cut off and back delivers what it computed for an epoch that is over:
            # its requests were replayed on the new epoch, which answers them
            self.stale_results += 1
            return
        request = self.requests[frame.rid]
        if request.status != "pending":
            self.duplicates += 1            # at-least-once processing, exactly-once results
            return
        request.done = now
        request.latency_ms = (now_mono - request.sent_mono) * 1000.0
        request.epoch, request.version = frame.epoch, frame.version
        request.status = "completed"
        references = self.references.get(frame.version)
        request.mismatched = references is None or not matches(frame.tensors,
                                                               references[request.index])
        del self.pending[frame.rid]
        self.completed += 1
        self.by_version[frame.version] = self.by_version.get(frame.version, 0) + 1
        self.mismatched += request.mismatched
        self.recent.append((now_mono, request.latency_ms))
        self.attempts_recent.append((now_mono, max(0.0, now - frame.sent)))
        while self.recent and self.recent[0][0] < now_mono - 5.0:
            self.recent.popleft()

    # -- reporting -----------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return {"sent": len(self.requests), "completed": self.completed, "lost": self.lost,
                "mismatched": self.mismatched, "duplicates": self.duplicates,
                "in_flight": len(self.pending), "replays": self.replays,
                "bad_results": self.bad_results, "stale_results": self.stale_results}

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        while self.recent and self.recent[0][0] < now - 5.0:
            self.recent.popleft()
        last_second = sum(1 for t, _ in self.recent if t >= now - 1.0)
        latencies = sorted(lat for _, lat in self.recent)
        p99 = latencies[max(0, math.ceil(0.99 * len(latencies)) - 1)] if latencies else 0.0
        return {**self.counts(), "workload_state": self.state,
                "completed_by_version": {str(v): n for v, n in sorted(self.by_version.items())},
                "throughput_1s": float(last_second), "p99_ms_recent": round(p99, 3),
                "started_at": self.started or None,
                "workload": self.workload.to_json() if self.workload else None}

    def write_csv(self, path: Path) -> None:
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(REQUEST_COLUMNS)
            for request in self.requests:
                writer.writerow(request.row())
        tmp.replace(path)

    def close(self) -> None:
        if self.push is not None:
            self.push.close(0)
        self.sink.close(0)
