"""The k3s controller's workload: the load generator + sink (testbed.control.dispatcher.Dispatcher)
and the driver's command port, hosted in the controller's pod next to the control loop.

Division of labour: the control loop (testbed.k8s.loop.K3sController) decides epochs and tells
this module, through `activate`, when an epoch is ready (its `plan.deployed`); nothing here
decides placement. One thread owns every ZeroMQ socket of the workload (ZeroMQ sockets are not
thread-safe): the dispatcher's sink (PULL, bound once, where the last stage of every epoch
sends; with CurveZMQ only the keys the loop `admit`s get in), its PUSH to the active epoch's
stage 0, and the command port (REP). The dispatcher's rules are the embedded controller's: a
seeded input pool, the full model's outputs as references, every result checked, at-least-once
processing and exactly-once results. On a new epoch every unanswered request is replayed at
once and the old epoch is retired: in k3s every epoch replaces every stage pod (the epoch is in
the pod template), so the old pipeline is torn down whatever the reason for the new one.

Commands (JSON over REQ/REP, every reply has "ok"). With CurveZMQ the port is a CURVE server
with the controller's keypair that admits only the driver's public key (ZAP allow-list):
the stages know the controller's public key too, and must not command it.
  {"cmd": "status"}
  {"cmd": "put_model", "offset": N, "total": BYTES} + one binary part of at most
      MODEL_CHUNK bytes: the model, in order; the last chunk checks the SHA-256 that
      controller.json names and moves the file into place (what the loop waits for)
  {"cmd": "start_workload"}: the workload of the inputs (workload.json)
  {"cmd": "stop"}: stop issuing; everything unanswered is lost; requests.csv is written
  {"cmd": "fetch", "file": "requests.csv" | "events.jsonl", "offset": N}: up to
      FETCH_CHUNK bytes of that file from N, base64 in "data", with "eof"
Every frame is checked (size, JSON object, exact fields and types); a bad one gets an error
reply and changes nothing. Nothing received is evaluated or unpickled.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq

from stage_image.security import Gate, KeyPair, apply_server, start_authenticator, start_gates
from testbed.control import commands
from testbed.control.dispatcher import (
    Dispatcher,
    Route,
    Workload,
    compute_references,
    seeded_pool,
)

MODEL_CHUNK = 1 << 20              # bytes of model per put_model request
MAX_MODEL_BYTES = 4 << 30
FETCH_CHUNK = 512 * 1024           # bytes of a results file per fetch reply
MAX_COMMAND_BYTES = MODEL_CHUNK + 4096
PART_NAME = ".model.part"          # the model being uploaded, beside its final name

Emit = Callable[..., None]


def build_references(model: Path, workload: Workload) -> tuple[list[Any], list[Any]]:
    """The seeded input pool and the full model's outputs for it (as the embedded
    controller's bootstrap: the same pool for the same seed and model)."""
    pool = seeded_pool(model, workload)
    return pool, compute_references(model, pool)


class WorkloadHost:
    """The controller pod's dispatcher and command port (module docstring). `start()` binds
    and starts the thread; `bootstrap(model)` once the model is in place; `activate(route)`
    when an epoch is ready; `stop()` at the end. `view()` is the control loop's state for
    status replies (called from this thread: it must be cheap and thread-safe)."""

    def __init__(self, workload: Workload, work_dir: Path, model: Path, model_sha256: str,
                 events_path: Path, emit: Emit, log: logging.Logger,
                 view: Callable[[], dict[str, Any]], sink_bind: str, command_bind: str,
                 keys: KeyPair | None = None, driver_public: str | None = None) -> None:
        if keys is not None and driver_public is None:
            raise ValueError("CurveZMQ is on: the command port needs the driver's public key")
        self.workload, self.work_dir, self.model = workload, work_dir, model
        self.model_sha256, self.events_path = model_sha256, events_path
        self.emit, self.log, self.view = emit, log, view
        self.ctx = zmq.Context()
        # With CurveZMQ the sink admits only the last stages of the epochs whose pods may run
        # (`admit`, from the control loop: their keys change with every epoch).
        self.sink_gate = Gate()
        self.sink_zap = (start_gates(self.ctx, {"sink": self.sink_gate})
                         if keys is not None else None)
        self.dispatcher = Dispatcher(self.ctx, sink_bind, emit, log, keys=keys,
                                     zap_domain="sink")
        # Its own context: ZAP is per context, and this port's allow-list (the driver) is
        # fixed for the run and covers every domain of its context.
        self.command_ctx = zmq.Context()
        self.auth = (start_authenticator(self.command_ctx, [driver_public])
                     if keys is not None and driver_public is not None else None)
        self.rep = self.command_ctx.socket(zmq.REP)
        self.rep.setsockopt(zmq.LINGER, 0)
        self.rep.setsockopt(zmq.MAXMSGSIZE, MAX_COMMAND_BYTES)
        if keys is not None:
            apply_server(self.rep, keys)
        self.rep.bind(command_bind)
        self.command_address = self.rep.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sink_address = self.dispatcher.sink.getsockopt_string(zmq.LAST_ENDPOINT)
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="references")
        self.bootstrapping: Future[Any] | None = None
        self.failure: str | None = None
        self.waiting_route: Route | None = None     # ready before the references were
        self.active: list[int] = []                 # epochs switched to, in order
        self.csv_written = False
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="workload", daemon=True)

    # -- called from the control loop's thread ---------------------------------------------

    def start(self) -> WorkloadHost:
        self.thread.start()
        return self

    def bootstrap(self) -> None:
        self.inbox.put(("bootstrap", None))

    def activate(self, route: Route) -> None:
        self.inbox.put(("route", route))

    def admit(self, senders: Iterable[str]) -> None:
        """The sink's allow-list from now on (public keys; only with CurveZMQ). Safe from
        any thread: the Gate swaps in a new frozenset, which the ZAP thread reads."""
        self.sink_gate.set(senders)

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(10)
        else:
            self._close()

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.dispatcher.sink, zmq.POLLIN)
        poller.register(self.rep, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                push = self.dispatcher.push if self.dispatcher.wants_pollout() else None
                if push is not None:
                    poller.register(push, zmq.POLLOUT)
                wait = min(0.05, self.dispatcher.next_wakeup(time.monotonic()))
                ready = dict(poller.poll(math.ceil(wait * 1000)))
                if push is not None:
                    poller.unregister(push)
                if self.dispatcher.sink in ready:
                    self.dispatcher.on_sink()
                if self.rep in ready:
                    self._serve_one()
                self._take_inbox()
                now = time.monotonic()
                self.dispatcher.pump(now)
                if self.dispatcher.state == "done" and not self.csv_written:
                    # before any status says "done": the driver fetches it right after
                    self._write_csv()
        finally:
            self._close()

    def _take_inbox(self) -> None:
        while True:
            try:
                kind, value = self.inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "bootstrap" and self.bootstrapping is None:
                self.bootstrapping = self.jobs.submit(build_references, self.model,
                                                      self.workload)
            elif kind == "route":
                self.waiting_route = value
        job = self.bootstrapping
        if job is not None and job.done() and not self.dispatcher.pool and not self.failure:
            try:
                pool, references = job.result()
            except Exception as exc:  # noqa: BLE001 - a model onnxruntime cannot run
                self.failure = f"references: {type(exc).__name__}: {exc}"[:500]
                self.emit("workload.failed", reason=self.failure)
                return
            self.dispatcher.set_pool(pool)
            self.emit("references.ready", inputs=len(pool))
        if self.waiting_route is not None and self.dispatcher.pool:
            self._switch(self.waiting_route)
            self.waiting_route = None

    def _switch(self, route: Route) -> None:
        if route.version not in self.dispatcher.references:
            assert self.bootstrapping is not None
            self.dispatcher.add_version(route.version, self.bootstrapping.result()[1])
        replayed = self.dispatcher.switch(route, replay=True)
        for epoch in self.active:
            self.dispatcher.retire(epoch)
        self.active.append(route.epoch)
        self.emit("dispatcher.switched", epoch=route.epoch, version=route.version,
                  heads=[h.address for h in route.heads], replayed=replayed)

    def _write_csv(self) -> None:
        try:
            self.dispatcher.write_csv(self.work_dir / "requests.csv")
        except OSError as exc:
            self.log.error("cannot write requests.csv: %s", exc)
        self.csv_written = True

    def _close(self) -> None:
        self.jobs.shutdown(wait=False, cancel_futures=True)
        self.dispatcher.close()
        self.rep.close(0)
        if self.auth is not None:
            self.auth.stop()
        if self.sink_zap is not None:
            self.sink_zap.stop()
        self.ctx.term()
        self.command_ctx.term()

    # -- commands ------------------------------------------------------------------------------

    def _serve_one(self) -> None:
        try:
            frames = self.rep.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            cmd, data = commands.parse(frames, "k3s")
            reply = self.on_command(cmd, data)
        except (ValueError, RuntimeError, OSError) as exc:
            reply = {"ok": False, "error": str(exc)[:500]}
        self.rep.send(json.dumps(reply, default=str).encode())

    def on_command(self, cmd: dict[str, Any], data: bytes | None) -> dict[str, Any]:
        name = cmd["cmd"]
        if name == "status":
            return self.status()
        if name == "put_model":
            assert data is not None
            return self.put_model(cmd["offset"], cmd["total"], data)
        if name == "start_workload":
            if self.state() != "ready":
                raise RuntimeError(f"not ready to start a workload (state {self.state()})")
            self.dispatcher.start(self.workload)
            return {"ok": True, "state": self.state()}
        if name == "stop":
            self.dispatcher.stop_issuing(time.monotonic(), drain=False)
            self.dispatcher.finish()
            if self.dispatcher.requests and not self.csv_written:
                self._write_csv()
            return {"ok": True, **self.dispatcher.counts()}
        return self.fetch(cmd["file"], cmd["offset"])

    def state(self) -> str:
        if self.failure:
            return "failed"
        if self.dispatcher.state != "idle":
            return self.dispatcher.state            # running | draining | done
        if self.dispatcher.route is not None:
            return "ready"
        if not self.model.exists():
            return "waiting_model"
        return str(self.view().get("state") or "starting")

    def status(self) -> dict[str, Any]:
        view = self.view()
        return {**view, "ok": True, "state": self.state(), "reason": self.failure,
                **self.dispatcher.status(),
                "route_epoch": self.dispatcher.route.epoch if self.dispatcher.route else None}

    def put_model(self, offset: int, total: int, data: bytes) -> dict[str, Any]:
        if self.model.exists():
            raise RuntimeError("the model is in place already")
        if not 0 < total <= MAX_MODEL_BYTES or len(data) > MODEL_CHUNK or not data \
                or offset + len(data) > total:
            raise ValueError(f"a chunk of {len(data)} bytes at {offset} does not fit a model "
                             f"of {total} bytes (chunks of 1..{MODEL_CHUNK} bytes, models up "
                             f"to {MAX_MODEL_BYTES})")
        part = self.model.parent / PART_NAME
        have = part.stat().st_size if part.exists() else 0
        if offset not in (0, have):
            raise ValueError(f"expected the chunk at {have}, got {offset}")
        with open(part, "r+b" if offset else "wb") as out:
            out.seek(offset)
            out.write(data)
            out.truncate()
        if offset + len(data) < total:
            return {"ok": True, "received": offset + len(data)}
        digest = hashlib.sha256()
        with open(part, "rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != self.model_sha256:
            part.unlink()
            raise ValueError(f"the model's SHA-256 is {digest.hexdigest()[:12]}..., "
                             f"controller.json says {self.model_sha256[:12]}...")
        os.replace(part, self.model)
        self.emit("model.received", bytes=total, sha256=self.model_sha256)
        return {"ok": True, "received": total, "complete": True}

    def fetch(self, name: str, offset: int) -> dict[str, Any]:
        # fixed names only: nothing from the network becomes a path
        path = {"requests.csv": self.work_dir / "requests.csv",
                "events.jsonl": self.events_path}.get(name)
        if path is None:
            raise ValueError(f"cannot fetch {name!r} (requests.csv, events.jsonl)")
        if not path.exists():
            raise RuntimeError(f"{name} does not exist (yet)")
        with open(path, "rb") as stream:
            stream.seek(offset)
            chunk = stream.read(FETCH_CHUNK)
            eof = not stream.read(1)
        return {"ok": True, "data": base64.b64encode(chunk).decode(),
                "next": offset + len(chunk), "eof": eof}
