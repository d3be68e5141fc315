"""The per-host agent (the kubelet's role):

    python -m stage_image.agent --host NAME --controller tcp://IP:18000 --data-dir DIR --ip IP

It connects a DEALER (identity = host name) to the controller's ROUTER, says `hello`, and sends
a `heartbeat` every interval listing every worker it holds: its data port, model, state,
whether it is a standby, and the routes (epoch, stage) it has confirmed. The controller
reconciles against that list, so a lost message is repaired by the next beat. The agent does
what the controller says and decides nothing itself:

- `deploy` (epoch, stage, port, model, next): the worker on that port serves the epoch as
  that stage. When none runs there, make sure the stage model is in
  `DATA_DIR/models/<sha256>.onnx` (fetched from the controller in 1 MiB chunks over the
  control connection if missing), check its SHA-256 right before every start (a mismatch
  deletes it and fetches it again), write the worker's config and start
  `python -m stage_image.worker CONFIG.json` (same interpreter). When one runs there with the
  same model, it only gains the route (a line on its stdin): no restart, no reload.
- `prepare` (port, model): the same without a route: a warm standby, loaded and idle.
- `stop` (epoch): withdraw that epoch's routes (-1: stop everything); a worker left with no
  route that is not a standby is stopped (SIGTERM, SIGKILL after a grace period).
- `release` (port): stop that worker whatever it serves.

Worker state changes (`ready` per route, `exited`, `failed`) are reported at once: the worker's
stdout is a pipe in the same poll loop as the control socket, so its `ready`/`routed` lines
and its exit (EOF) wake the agent immediately. Disk errors (ENOSPC, EROFS, ...) on the cache
or on a worker's files are reported as `failed` with the reason; the agent itself never dies
of one. Before writing a model it evicts cached models no worker holds (those of retired
epochs) while the disk lacks room. Each start is a new incarnation (a random id in `hello` and
every heartbeat), so the controller tells a restart from a late message; partial downloads of an
earlier start are deleted. Hashing runs in a thread so heartbeats keep flowing while a large
model is checked on a slow CPU share.

CurveZMQ (`--curve-server-key`, off by default): the control connection is encrypted with a
fresh keypair of ours and the controller's public key; each worker gets the keypair the
controller generated for it (in `deploy`/`prepare`) and each route the next hop's public key.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from stage_image.launcher import LaunchedWorker, Launcher
from stage_image.security import KeyPair, apply_client, load_keypair
from stage_image.wire import CHUNK_BYTES, FrameError, decode_control, encode_control

PACKAGE_ROOT = Path(__file__).resolve().parent.parent   # so `-m stage_image.worker` imports
STOP_GRACE_S = 3.0


def parse_load(line: str) -> tuple[int, float] | None:
    """`load FRAMES MS` from a worker's stdout (None if it is not one)."""
    parts = line.split()
    try:
        frames, mean_ms = int(parts[1]), float(parts[2])
    except (IndexError, ValueError):
        return None
    if len(parts) != 3 or frames < 0 or not 0.0 <= mean_ms < 1e7:
        return None
    return frames, mean_ms


# Paced standby chunks (--standby-share) may take more of the link than the share where the
# host's frames leave it idle: the frames' use plus this headroom for their bursts stays free,
# and chunks never take more than LINK_SHARE_MAX of the time (a frame waits behind at most
# one chunk either way).
LINK_HEADROOM = 0.2
LINK_SHARE_MAX = 0.5
LINK_SAMPLE_S = 1.0


def standby_link_share(floor: float, link_bytes_per_s: float,
                       frame_bytes_per_s: float) -> float:
    """The share of the link paced standby chunks may take: what the frames leave
    spare less LINK_HEADROOM, at least `floor` (--standby-share) and at most LINK_SHARE_MAX;
    `floor` when the link's rate is unknown."""
    if link_bytes_per_s <= 0:
        return floor
    spare = 1.0 - frame_bytes_per_s / link_bytes_per_s - LINK_HEADROOM
    return max(floor, min(LINK_SHARE_MAX, spare))


def chunk_pause_s(round_trip_s: float, chunk_bytes: int, share: float,
                  link_bytes_per_s: float) -> float:
    """The pause after a paced chunk before the next ask, so that chunks take `share` of the
    link: of its bytes where its rate is known (a round trip stretched by the frames crossing
    the same link would, paced by time, leave the chunks a fraction of their share: b1 on
    two-switch-6, 70% busy with frames, got 3 of the 10 Mbit/s a tenth is), else of its
    time."""
    if link_bytes_per_s <= 0:
        return round_trip_s * (1 / share - 1)
    return max(0.0, chunk_bytes / (share * link_bytes_per_s) - round_trip_s)


def received_bytes(path: str = "/proc/net/dev") -> int | None:
    """Bytes this network namespace's interfaces have received, loopback aside (None when
    unreadable). /proc/net/dev is per namespace: a Mininet host's or a container's own."""
    try:
        lines = Path(path).read_text().splitlines()[2:]
    except OSError:
        return None
    total = 0
    for line in lines:
        name, _, counters = line.partition(":")
        fields = counters.split()
        if name.strip() != "lo" and fields and fields[0].isdigit():
            total += int(fields[0])
    return total


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * CHUNK_BYTES):
            digest.update(block)      # releases the GIL on large blocks
    return digest.hexdigest()


def choose_evictions(cached: list[tuple[str, int, float]], keep: set[str], free: int,
                     need: int, last: frozenset[str] = frozenset()) -> list[str]:
    """Which cached models (sha256, bytes, mtime) to delete so that `need` bytes fit in
    `free`: never one in `keep`, oldest first, those in `last` (staged for a fault that may
    never come) only after every other, none when it fits already."""
    victims = []
    for sha, size, _mtime in sorted(cached, key=lambda c: (c[0] in last, c[2])):
        if free >= need:
            break
        if sha not in keep:
            victims.append(sha)
            free += size
    return victims


def describe_os_error(exc: OSError, what: str) -> str:
    name = errno.errorcode.get(exc.errno or 0, "OSError")
    return f"{name}: {exc.strerror or exc} ({what})"


@dataclass
class WorkerRecord:
    """One worker process, by its data port: its model, the routes the controller wants it
    to serve, and which of them the worker has confirmed."""

    port: int
    version: int
    sha256: str
    size: int
    inputs: list[str]
    outputs: list[str]
    standby: bool = False
    # epoch -> (stage, next address, next hop's CurveZMQ public key or None, the public keys
    # the worker accepts frames from: its upstream)
    routes: dict[int, tuple[int, str, str | None, tuple[str, ...]]] = field(
        default_factory=dict)
    curve_secret: str | None = None
    confirmed: set[int] = field(default_factory=set)
    in_config: set[int] = field(default_factory=set)     # routes given at start
    state: str = "fetching"
    proc: subprocess.Popen[bytes] | LaunchedWorker | None = None
    stdout_fd: int | None = None
    stdout_buffer: bytes = b""
    deadline: float = 0.0             # start timeout, then kill deadline once stopping
    stopping: bool = False
    log_path: Path | None = None
    load: tuple[int, float] | None = None    # the worker's last `load FRAMES MS` line
    cpu_group: Path | None = None     # where Agent.place_workers last put the process
    model_ready: bool = False         # a standby whose model is here, waiting for the launcher

    @property
    def alive(self) -> bool:
        return self.state in ("fetching", "starting", "ready") and not self.stopping

    def label(self) -> str:
        return f"port {self.port}" + (f" e{sorted(self.routes)}" if self.routes else
                                      " (standby)")


@dataclass
class Fetch:
    """A model being fetched: chunks are requested a few at a time (pipelining hides the
    round trip on slow links) and written at their offsets."""

    sha256: str
    part: Path
    fd: int
    total: int | None = None
    received: set[int] = field(default_factory=set)
    requested: dict[int, float] = field(default_factory=dict)   # offset -> when asked
    last_activity: float = 0.0
    attempts: int = 1

    def remaining(self) -> int:
        """Bytes still to come (0 while the size is unknown: its first chunk is asked)."""
        return 0 if self.total is None else max(0, self.total - len(self.received) * CHUNK_BYTES)


class Agent:
    def __init__(self, args: argparse.Namespace, log: logging.Logger) -> None:
        self.args, self.log = args, log
        self.host: str = args.host
        self.data_dir = Path(args.data_dir)
        self.models_dir = self.data_dir / "models"
        self.log_dir = Path(args.log_dir) if args.log_dir else self.data_dir / "logs"
        self.heartbeat_s = args.heartbeat_ms / 1000.0
        self.workers: dict[int, WorkerRecord] = {}       # by data port
        self.fetches: dict[str, Fetch] = {}
        self.staged: dict[str, int] = {}    # sha256 -> bytes: models kept on disk, no worker
        self.standby_chunk_due = 0.0       # the next standby chunk's earliest ask
        self.link_share = args.standby_share    # paced chunks' share now (standby_link_share)
        self.link_share_logged = self.link_share
        self.chunk_bytes = 0                    # model bytes received so far
        self.frame_bytes_per_s: float | None = None    # what else arrives, smoothed
        self.link_sample: tuple[float, int, int] | None = None   # (when, received, chunks)
        self.verifying: dict[str, tuple[Future[str], Path, str]] = {}
        self.hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self.attempts: dict[str, int] = {}   # fetch attempts per model
        self.stopping = False
        self.seq = 0
        # a new id each start: the controller tells a restarted agent from a late message of
        # the one before it (a pid can repeat: a container's agent often gets the same one)
        self.incarnation = secrets.token_hex(8)
        # workers fork from a process that imported onnxruntime once (stage_image.launcher)
        self.launcher = Launcher(args.python, self.worker_env(), self.log_dir / "launcher.log")
        self.ctx = zmq.Context(1)
        self.sock = self.ctx.socket(zmq.DEALER)
        if not args.curve_keypair:
            # without a key of our own the name is our identity; with one, the controller
            # knows us by the key and routes to our connection (testbed.control.auth)
            self.sock.setsockopt(zmq.ROUTING_ID, self.host.encode())
        self.sock.setsockopt(zmq.LINGER, 500)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        # ZMTP heartbeats: a connection silently cut (partition) is dropped and re-dialled
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        if args.curve_server_key:
            # CurveZMQ: the control channel is encrypted (the workers' secret keys travel on
            # it); the controller's public key comes from the driver, and so does our own
            # keypair (--curve-keypair: the key the controller knows this host by;
            # without it a fresh one, for a controller that admits any key)
            server = args.curve_server_key
            if os.path.isfile(server):
                server = Path(server).read_text().strip()
            own = load_keypair(args.curve_keypair) if args.curve_keypair else KeyPair.generate()
            apply_client(self.sock, own, server)
        self.sock.connect(args.controller)
        self._last_send_warning = 0.0

    # -- messages to the controller ------------------------------------------------------------

    def send(self, kind: str, **fields: Any) -> None:
        try:
            self.sock.send_multipart(encode_control(kind, **fields), flags=zmq.NOBLOCK)
        except zmq.Again:
            # the controller is unreachable and the queue is full: heartbeats repair state
            now = time.monotonic()
            if now - self._last_send_warning > 5:
                self.log.warning("controller unreachable; dropping %s", kind)
                self._last_send_warning = now

    def report(self, rec: WorkerRecord, state: str, detail: str = "",
               reason: str | None = None, epochs: list[int] | None = None) -> None:
        """Tell the controller about a worker: for the given epochs, else for every route it
        is meant to serve (epoch 0 when it has none: a standby)."""
        if state in ("exited", "failed"):
            rec.state = state
        log = self.log.warning if state == "failed" else self.log.info
        log("worker %s %s%s", rec.label(), state, f": {detail}" if detail else "")
        extra = {"reason": reason} if reason else {}
        targets = epochs if epochs is not None else sorted(rec.routes) or [0]
        for epoch in targets:
            stage = rec.routes[epoch][0] if epoch in rec.routes else 0
            self.send("worker", port=rec.port, epoch=epoch, stage=stage, state=state,
                      detail=detail[:4000], **extra)

    def heartbeat(self) -> None:
        self.seq += 1
        self.send("heartbeat", host=self.host, seq=self.seq, incarnation=self.incarnation,
                  workers=[{"port": r.port, "sha256": r.sha256, "state": r.state,
                            "standby": r.standby,
                            "load": list(r.load) if r.load is not None else None,
                            "routes": [[e, r.routes[e][0]] for e in sorted(r.confirmed)
                                       if e in r.routes]}
                           for r in self.workers.values()])

    # -- control messages ----------------------------------------------------------------------

    def on_message(self, frames: list[zmq.Frame]) -> None:
        try:
            msg = decode_control(frames)
        except FrameError as exc:
            self.log.warning("bad control message dropped: %s", exc)
            return
        if msg.type in ("deploy", "prepare"):
            self.on_deploy(msg.fields)
        elif msg.type == "stop":
            self.on_stop(msg["epoch"])
        elif msg.type == "release":
            rec = self.workers.get(msg["port"])
            if rec is not None:
                rec.standby = False
                rec.routes.clear()
                self.terminate(rec)
        elif msg.type == "chunk":
            self.on_chunk(msg.fields, msg.blob)
        elif msg.type == "stage":
            self.on_stage(msg["models"])
        else:
            self.log.warning("unexpected control message %s dropped", msg.type)

    def on_deploy(self, f: dict[str, Any]) -> None:
        """`deploy` (a route) or `prepare` (a standby, no `epoch`) for the worker on a port.
        Level-triggered: repeating one changes nothing."""
        port, epoch = f["port"], f.get("epoch")
        curve = f.get("curve") or {}
        route = ((f["stage"], f["next"], curve.get("next_public"),
                  tuple(curve.get("upstream") or ())) if epoch is not None else None)
        rec = self.workers.get(port)
        if rec is not None and rec.proc is None and rec.state in ("exited", "failed"):
            del self.workers[port]          # a dead worker's port: start afresh
            rec = None
        if rec is None:
            rec = WorkerRecord(port, f["version"], f["sha256"], f["size"], f["inputs"],
                               f["outputs"], standby=route is None,
                               curve_secret=curve.get("secret"))
            if route is not None:
                rec.routes[epoch] = route
            self.workers[port] = rec
            self.log.info("new worker %s: v%d model %s (%d bytes)", rec.label(), rec.version,
                          rec.sha256[:12], rec.size)
            self.ensure_model(rec.sha256)
            return
        if rec.sha256 != f["sha256"] or rec.version != f["version"] or not rec.alive:
            # the controller's view is behind (the port is still busy); it retries later
            self.send("worker", port=port, epoch=epoch or 0, stage=f.get("stage", 0),
                      state="failed", reason="conflict",
                      detail=f"port {port} is still held by model {rec.sha256[:12]} "
                             f"v{rec.version} ({rec.state}{', stopping' if rec.stopping else ''})")
            return
        if route is None:
            rec.standby = True
            self.place_workers()
            return
        if rec.routes.get(epoch) == route:
            if epoch in rec.confirmed:      # the controller missed our report: say it again
                self.report(rec, "ready", reason="started", epochs=[epoch])
            return
        rec.routes[epoch] = route
        rec.confirmed.discard(epoch)
        rec.standby = False                 # it serves now; the controller asks again if not
        self.place_workers()
        if rec.proc is not None:
            self.command(rec, {"op": "route", "epoch": epoch, "stage": route[0],
                               "next": route[1], "public": route[2],
                               "upstream": list(route[3])})

    def on_stage(self, models: list[dict[str, Any]]) -> None:
        """Keep these models on disk (fetched now, paced like a standby's beside serving
        workers), so that the plan for a fault whose standbys found no memory here needs a
        model load but no transfer. Models no longer listed are ordinary cache again."""
        staged = {m["sha256"]: m["size"] for m in models}
        if staged == self.staged:
            return
        self.staged = staged
        absent = [sha for sha in staged if not self.model_path(sha).exists()
                  and sha not in self.fetches]
        self.log.info("staged on disk: %d models (%d bytes), %d to fetch", len(staged),
                      sum(staged.values()), len(absent))
        for sha in absent:
            self.start_fetch(sha)

    def on_stop(self, epoch: int) -> None:
        for rec in list(self.workers.values()):
            if epoch == -1:
                rec.routes.clear()
                rec.standby = False
            elif epoch in rec.routes:
                del rec.routes[epoch]
                rec.confirmed.discard(epoch)
                if rec.proc is not None and not rec.stopping:
                    self.command(rec, {"op": "unroute", "epoch": epoch})
            if not rec.routes and not rec.standby:
                self.terminate(rec)
        self.log.info("stop epoch %s", "all" if epoch == -1 else epoch)

    def terminate(self, rec: WorkerRecord) -> None:
        """SIGTERM a running worker (SIGKILL after the grace period); forget one that never
        started."""
        if rec.proc is not None and rec.proc.poll() is None:
            if not rec.stopping:
                rec.stopping = True
                rec.deadline = time.monotonic() + STOP_GRACE_S
                rec.proc.send_signal(signal.SIGTERM)
        elif self.workers.get(rec.port) is rec:
            del self.workers[rec.port]

    def command(self, rec: WorkerRecord, cmd: dict[str, Any]) -> None:
        """A route change on the worker's stdin (a pipe: small writes never block)."""
        assert rec.proc is not None and rec.proc.stdin is not None
        try:
            os.write(rec.proc.stdin.fileno(), (json.dumps(cmd) + "\n").encode())
        except OSError as exc:
            # the worker is dying: its exit is noticed and reported by check_exit
            self.log.warning("cannot reach worker %s: %s", rec.label(), exc)

    # -- model cache ---------------------------------------------------------------------------

    def model_path(self, sha: str) -> Path:
        return self.models_dir / f"{sha}.onnx"

    def ensure_model(self, sha: str) -> None:
        """Start a verification of the cached copy, or a fetch; workers start when it passes."""
        if sha in self.verifying or sha in self.fetches:
            return
        path = self.model_path(sha)
        if path.exists():
            self.verify(sha, path, "cached")
        else:
            self.start_fetch(sha)

    def verify(self, sha: str, path: Path, what: str) -> None:
        self.verifying[sha] = (self.hasher.submit(sha256_file, path), path, what)

    def on_verified(self, sha: str, future: Future[str], path: Path, what: str) -> None:
        waiting = [r for r in self.workers.values()
                   if r.sha256 == sha and r.state == "fetching" and not r.stopping]
        try:
            actual = future.result()
        except OSError as exc:
            actual = f"unreadable ({describe_os_error(exc, str(path))})"
        if actual == sha:
            if what == "fetched":
                try:
                    os.replace(path, self.model_path(sha))
                except OSError as exc:
                    self.fail_waiting(sha, describe_os_error(exc, "caching the model"), "disk")
                    return
            for rec in waiting:
                self.start_when_forkable(rec)
            return
        self.log.warning("%s model %s failed its SHA-256 check (got %s); deleting it", what,
                         sha[:12], actual[:64])
        self._unlink(path)
        if what == "cached":
            for rec in waiting:
                # reported so the corruption shows in the controller's events
                self.report(rec, "fetching", f"cached model {sha[:12]} failed its SHA-256 "
                            f"check; deleted, fetching again", "corrupt_model")
            self.start_fetch(sha)
        elif self.attempts.get(sha, 1) < 3:
            self.start_fetch(sha, attempts=self.attempts.get(sha, 1) + 1)
        else:
            self.fail_waiting(sha, f"model {sha[:12]} fetched 3 times, SHA-256 never matched",
                             "fetch")

    def clean_stale_files(self) -> None:
        """A new incarnation: partial downloads of the one before it are garbage (whole
        cached models are kept; they are verified before use and evicted when space runs
        short)."""
        for part in self.models_dir.glob("*.part"):
            self.log.info("deleting %s, left by an earlier start", part.name)
            self._unlink(part)

    def make_room(self, sha: str) -> None:
        """Before writing a model: evict cached models no worker holds (active or standby:
        the models of retired epochs) while the disk has less free than the model needs,
        oldest first."""
        need = max([r.size for r in self.workers.values() if r.sha256 == sha]
                   + [self.staged.get(sha, 0)])
        try:
            stat = os.statvfs(self.models_dir)
            cached = [(p.stem, p.stat().st_size, p.stat().st_mtime)
                      for p in self.models_dir.glob("*.onnx")]
        except OSError as exc:
            self.log.warning("cannot look at the model cache: %s", exc)
            return
        keep = {r.sha256 for r in self.workers.values() if r.alive} | set(self.verifying)
        for victim in choose_evictions(cached, keep, stat.f_bavail * stat.f_frsize, need,
                                       frozenset(self.staged) - {sha}):
            self.log.info("evicting cached model %s (no worker holds it) for %s", victim[:12],
                          sha[:12])
            self._unlink(self.model_path(victim))

    def start_fetch(self, sha: str, attempts: int = 1) -> None:
        part = self.models_dir / f"{sha}.part"
        try:
            self.models_dir.mkdir(parents=True, exist_ok=True)
            self.make_room(sha)
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            self.fail_waiting(sha, describe_os_error(exc, "creating the model cache"), "disk")
            return
        self.attempts[sha] = attempts
        fetch = Fetch(sha, part, fd, last_activity=time.monotonic(), attempts=attempts)
        self.fetches[sha] = fetch
        fetch.requested[0] = time.monotonic()
        self.send("fetch", sha256=sha, offset=0)
        self.log.info("fetching model %s (attempt %d)", sha[:12], attempts)

    def on_chunk(self, f: dict[str, Any], blob: memoryview | None) -> None:
        sha = f["sha256"]
        fetch = self.fetches.get(sha)
        if fetch is None:
            return                      # a late duplicate of a finished fetch
        if "error" in f:
            self.abort_fetch(fetch, f"controller cannot serve model {sha[:12]}: {f['error']}",
                             "fetch")
            return
        offset, total = f["offset"], f["total"]
        if fetch.total is None:
            fetch.total = total
        if total != fetch.total or offset % CHUNK_BYTES or blob is None:
            self.log.warning("inconsistent chunk of %s dropped", sha[:12])
            return
        now = fetch.last_activity = time.monotonic()
        asked = fetch.requested.pop(offset, None)
        self.chunk_bytes += len(blob)
        if asked is not None and self.paced(sha):
            self.standby_chunk_due = now + chunk_pause_s(
                now - asked, len(blob), self.link_share, (self.args.link_mbps or 0) * 1e6 / 8)
        if offset not in fetch.received:
            try:
                os.pwrite(fetch.fd, blob, offset)
            except OSError as exc:
                self.abort_fetch(fetch, describe_os_error(exc, f"writing model {sha[:12]}"),
                                 "disk")
                return
            fetch.received.add(offset)
        self.request_more(fetch)
        needed = max(1, -(-total // CHUNK_BYTES))
        if len(fetch.received) >= needed:
            try:
                os.close(fetch.fd)
            except OSError as exc:
                self.abort_fetch(fetch, describe_os_error(exc, f"writing model {sha[:12]}"),
                                 "disk")
                return
            del self.fetches[sha]
            self.log.info("model %s fetched (%d bytes)", sha[:12], total)
            self.verify(sha, fetch.part, "fetched")

    def urgent(self, sha: str) -> bool:
        """Does a worker that is to serve wait for this model (not only standbys)?"""
        return any(r.sha256 == sha and not r.standby for r in self.workers.values())

    def paced(self, sha: str) -> bool:
        """Is this model held to --standby-share of the link: wanted by standbys (or staged)
        only, on a host that serves, with a share below the whole?"""
        return self.args.standby_share < 1 and not self.urgent(sha) and self.serves()

    def measure_link(self, now: float) -> None:
        """Once a second: what the host's link carries besides model chunks (the frames),
        and so the share of its time paced chunks may take (`standby_link_share`; the fixed
        --standby-share without --link-mbps or where /proc/net/dev cannot be read)."""
        if self.args.link_mbps is None:
            return
        if self.link_sample is not None and now - self.link_sample[0] < LINK_SAMPLE_S:
            return
        received = received_bytes()
        if received is None:
            return
        if self.link_sample is not None:
            then, before, chunks_before = self.link_sample
            frames = max(0, received - before - (self.chunk_bytes - chunks_before))
            rate = frames / (now - then)
            # smoothed: one second's burst of frames should not swing the pacing
            smoothed = rate if self.frame_bytes_per_s is None else \
                0.5 * self.frame_bytes_per_s + 0.5 * rate
            self.frame_bytes_per_s = smoothed
            share = standby_link_share(self.args.standby_share,
                                       self.args.link_mbps * 1e6 / 8, smoothed)
            if abs(share - self.link_share_logged) >= 0.1:
                used = smoothed * 8 / (self.args.link_mbps * 1e6)
                self.log.info("paced standby chunks: %.2f of the link (frames use %.0f%% of "
                              "%g Mbit/s)", share, 100 * used, self.args.link_mbps)
                self.link_share_logged = share
            self.link_share = share
        self.link_sample = (now, received, self.chunk_bytes)

    def request_more(self, fetch: Fetch) -> None:
        """Ask for the next chunks: a window of them, or for a paced model (standbys' only,
        beside a serving worker) one chunk at a time for the whole host, each ask after a
        pause that keeps such chunks to `link_share` of the link (`chunk_pause_s`;
        --standby-share, more where the frames leave the link idle: `measure_link`; a frame
        then waits behind at most one chunk)."""
        if fetch.total is None:
            return
        now = time.monotonic()
        window = self.args.fetch_window
        if self.paced(fetch.sha256):
            if now < self.standby_chunk_due or any(
                    f.requested for f in self.fetches.values() if self.paced(f.sha256)):
                return
            window = 1
        offset = 0
        while len(fetch.requested) < window and offset < fetch.total:
            if offset not in fetch.received and offset not in fetch.requested:
                fetch.requested[offset] = now
                # an ask is activity: a paced model's next ask may come long after its last
                # chunk, and must not be taken for a stall and asked again at once
                fetch.last_activity = now
                self.send("fetch", sha256=fetch.sha256, offset=offset)
            offset += CHUNK_BYTES

    def abort_fetch(self, fetch: Fetch, detail: str, reason: str) -> None:
        try:
            os.close(fetch.fd)
        except OSError:
            pass
        self._unlink(fetch.part)       # a partial file on a full disk only makes it worse
        self.fetches.pop(fetch.sha256, None)
        if fetch.sha256 in self.staged:
            self.log.warning("staged model %s not kept: %s", fetch.sha256[:12], detail)
        self.fail_waiting(fetch.sha256, detail, reason)

    def fail_waiting(self, sha: str, detail: str, reason: str) -> None:
        for rec in list(self.workers.values()):
            if rec.sha256 == sha and rec.state == "fetching":
                self.report(rec, "failed", detail, reason)

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            self.log.warning("cannot delete %s: %s", path, exc)

    # -- workers -------------------------------------------------------------------------------

    def worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
        env["OMP_NUM_THREADS"] = "1"
        env["OPENBLAS_NUM_THREADS"] = "1"   # no BLAS threads in the launcher a worker forks from
        return env

    def write_worker_config(self, rec: WorkerRecord, name: str, parent_pid: int) -> Path:
        """The worker's config file (OSError if it cannot be written)."""
        config = {
            "host": self.host, "version": rec.version,
            "model": str(self.model_path(rec.sha256)),
            "bind": f"tcp://{self.args.ip}:{rec.port}",
            "inputs": rec.inputs, "outputs": rec.outputs,
            "routes": {str(e): {"stage": stage, "next": nxt, "public": public,
                                "upstream": list(upstream)}
                       for e, (stage, nxt, public, upstream) in rec.routes.items()},
            "curve_secret": rec.curve_secret,
            # with keys, the worker admits only its routes' upstream, authenticated by
            # token rather than encrypted (stage_image.security: the threat is forged peers)
            "upstream_gate": rec.curve_secret is not None,
            "data_auth": "token" if rec.curve_secret is not None else "curve",
            "commands": True,
            # the worker ties its life to its parent's (PR_SET_PDEATHSIG; the launcher's dies
            # with ours): nothing outlives a kill -9 of the agent
            "parent_pid": parent_pid,
            # inside the host's CPU share the agent must win: a heartbeat delayed behind a
            # busy worker would make the controller suspect a healthy node
            "nice": 5,
        }
        self.log_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.log_dir / f"{name}.json"
        # it holds the worker's CurveZMQ secret key: owner only (the log directory may be in
        # a results directory others read)
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(config, indent=1))
        return config_path

    def start_when_forkable(self, rec: WorkerRecord) -> None:
        """Start the worker now, or, a standby while the launcher is still importing, once it
        can fork it (check_deadlines): the controller prices a host's further workers as
        forked ones (partitioner.profile.FORKED_WORKER_BYTES), and a standby started alone
        would take a whole runtime of the room its host keeps for the serving stage."""
        if rec.standby and not self.launcher.usable() and self.launcher.alive():
            rec.model_ready = True
            return
        rec.model_ready = False
        self.start_worker(rec)

    def start_worker(self, rec: WorkerRecord) -> None:
        name = f"worker_{rec.port}_{rec.sha256[:8]}"
        launcher = self.launcher if self.launcher.usable() else None
        try:
            config_path = self.write_worker_config(
                rec, name, launcher.pid if launcher and launcher.pid else os.getpid())
            rec.log_path = self.log_dir / f"{name}.log"
            log_file = open(rec.log_path, "ab")
        except OSError as exc:
            self.report(rec, "failed", describe_os_error(exc, "writing the worker's files"),
                        "disk")
            return
        try:
            with log_file:
                if launcher is not None:
                    try:
                        rec.proc = launcher.spawn(config_path, self.log_dir, log_file)
                    except OSError as exc:      # started the slow way below
                        self.log.warning("%s; starting worker %s as a process of its own",
                                         exc, rec.label())
                        self.write_worker_config(rec, name, os.getpid())
                if rec.proc is None:
                    rec.proc = subprocess.Popen(
                        [self.args.python, "-m", "stage_image.worker", str(config_path)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                        env=self.worker_env(), cwd=str(self.log_dir), close_fds=True)
        except OSError as exc:
            self.report(rec, "failed", describe_os_error(exc, "starting the worker"), "exit")
            return
        self.place_workers()
        assert rec.proc.stdout is not None
        rec.stdout_fd = rec.proc.stdout.fileno()
        os.set_blocking(rec.stdout_fd, False)
        rec.in_config = set(rec.routes)
        rec.state = "starting"
        rec.deadline = time.monotonic() + self.args.start_timeout_s
        self.log.info("worker %s started, pid %d%s, log %s", rec.label(), rec.proc.pid,
                      " (forked by the launcher)" if isinstance(rec.proc, LaunchedWorker)
                      else "", rec.log_path)

    def start_launcher(self) -> None:
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.launcher.start()
        except OSError as exc:      # workers then start as processes of their own: slower
            self.log.warning("cannot start the worker launcher: %s", exc)

    def limit_standbys(self) -> None:
        """Cap the standby CPU group at --standby-share of the host's quota (a slow-node
        fault that changes the host's quota keeps the ratio: testbed.emulation.hosts)."""
        group = self.args.standby_cpu_cgroup
        if group is None:
            return
        try:
            quota = int((group.parent / "cpu.cfs_quota_us").read_text())
            if quota > 0:
                cap = max(1000, int(quota * self.args.standby_share))
                (group / "cpu.cfs_quota_us").write_text(f"{cap}\n")
                self.log.info("standbys beside a serving worker: %g of the CPU quota (%d of "
                              "%d us) and of the link", self.args.standby_share, cap, quota)
        except (OSError, ValueError) as exc:    # standbys then load uncapped: slower serving
            self.log.warning("cannot cap standbys' CPU in %s: %s", group, exc)

    def serves(self) -> bool:
        """Does a worker of this host serve a route (so background work must make way)?"""
        return any(r.routes and r.alive for r in self.workers.values())

    def place_workers(self) -> None:
        """Keep each worker's process in the CPU group of its role (level-triggered): a
        standby beside a serving worker loads in the standby group (a capped share of the
        host), every other worker in the host's own. Without such a group all share the
        host's."""
        group = self.args.standby_cpu_cgroup
        if group is None:
            return
        serves = self.serves()
        for rec in self.workers.values():
            target = group if rec.standby and serves else group.parent
            if rec.proc is None or rec.proc.poll() is not None or rec.cpu_group == target:
                continue
            rec.cpu_group = target
            try:
                (target / "cgroup.procs").write_text(f"{rec.proc.pid}\n")
            except OSError as exc:   # it runs on where it is: slower or greedier, not wrong
                self.log.warning("cannot move worker %s to %s: %s", rec.label(), target, exc)

    def on_stdout(self, rec: WorkerRecord) -> None:
        assert rec.proc is not None and rec.proc.stdout is not None
        try:
            data = os.read(rec.stdout_fd, 4096) if rec.stdout_fd is not None else b""
        except BlockingIOError:
            return
        if data:
            rec.stdout_buffer += data
            *lines, rec.stdout_buffer = rec.stdout_buffer.split(b"\n")
            for line in lines:
                self.on_worker_line(rec, line.decode("utf-8", "replace").strip())
            return
        rec.proc.stdout.close()         # EOF: the worker is exiting; reap it now
        rec.stdout_fd = None
        try:
            rec.proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass                        # the periodic check will reap it
        self.check_exit(rec)

    def on_worker_line(self, rec: WorkerRecord, line: str) -> None:
        """`ready` (loaded, the config's routes in force) or `routed E` (a route added)."""
        if rec.stopping:
            return
        if line == "ready" and rec.state == "starting":
            rec.state = "ready"
            rec.confirmed |= rec.in_config & set(rec.routes)
            self.report(rec, "ready", reason="started",
                        epochs=sorted(rec.confirmed) if rec.routes else [0])
        elif line.startswith("load "):
            rec.load = parse_load(line)
        elif line.startswith("routed "):
            epoch = int(line.split()[1])
            if epoch in rec.routes and epoch not in rec.confirmed:
                rec.confirmed.add(epoch)
                self.report(rec, "ready", reason="started", epochs=[epoch])

    def check_exit(self, rec: WorkerRecord) -> None:
        assert rec.proc is not None
        code = rec.proc.poll()
        if code is None:
            return
        if rec.stdout_fd is not None and rec.proc.stdout is not None:
            rec.proc.stdout.close()
            rec.stdout_fd = None
        if rec.proc.stdin is not None:
            rec.proc.stdin.close()
        if rec.stopping:
            if rec.state != "failed":
                self.report(rec, "exited", f"stopped (exit code {code})", "stopped",
                            epochs=[0])
            if self.workers.get(rec.port) is rec:
                del self.workers[rec.port]
        elif rec.state == "failed":
            pass                        # already reported (start timeout)
        elif code == 0:
            self.report(rec, "exited", "exited on its own with code 0", "exit")
        else:
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            self.report(rec, "failed", f"{how}; {self.log_tail(rec)}", "exit")
        rec.proc = None
        rec.confirmed.clear()

    def log_tail(self, rec: WorkerRecord, lines: int = 3) -> str:
        try:
            assert rec.log_path is not None
            text = rec.log_path.read_bytes()[-4000:].decode("utf-8", "replace")
        except (OSError, AssertionError):
            return "no log"
        return " | ".join(text.strip().splitlines()[-lines:])

    def check_deadlines(self, now: float) -> None:
        for rec in list(self.workers.values()):
            if rec.model_ready and rec.state == "fetching" and not rec.stopping:
                self.start_when_forkable(rec)      # the launcher is ready, or gone
            if rec.proc is not None:
                self.check_exit(rec)
            if rec.proc is None:
                continue
            if rec.stopping and now > rec.deadline:
                rec.proc.kill()
            elif rec.state == "starting" and not rec.stopping and now > rec.deadline:
                self.log.warning("worker %s not ready after %.0fs; killing it", rec.label(),
                                 self.args.start_timeout_s)
                self.report(rec, "failed", "not ready in time; " + self.log_tail(rec),
                            "start_timeout")
                rec.proc.kill()         # reaped by check_exit, which keeps the failure
        # smallest first: paced standby models come one at a time, and the shortest first
        # has the most standbys loaded at every moment (each covers a loss)
        for sha, fetch in sorted(self.fetches.items(), key=lambda item: item[1].remaining()):
            waited_for = sha in self.staged or any(r.sha256 == sha and r.state == "fetching"
                                                   for r in self.workers.values())
            if not fetch.requested:                 # a standby's model between paced chunks
                if waited_for:
                    self.request_more(fetch)
                else:
                    self.abort_fetch(fetch, "no longer needed", "fetch")
            elif now - fetch.last_activity > self.args.fetch_timeout_s:
                if not waited_for:
                    self.abort_fetch(fetch, "no longer needed", "fetch")
                    continue
                self.log.warning("fetch of %s stalled; asking again", sha[:12])
                fetch.last_activity = now
                fetch.requested.clear()
                if fetch.total is None:
                    fetch.requested[0] = now
                    self.send("fetch", sha256=sha, offset=0)
                else:
                    self.request_more(fetch)
        for sha, (future, path, what) in list(self.verifying.items()):
            if future.done():
                del self.verifying[sha]
                self.on_verified(sha, future, path, what)
        self.place_workers()

    # -- main loop -----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.models_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # not fatal: reported per deploy when the cache is actually needed
            self.log.warning("cannot create %s: %s", self.models_dir, exc)
        self.clean_stale_files()
        self.start_launcher()
        self.limit_standbys()
        self.send("hello", host=self.host, pid=os.getpid(), ip=self.args.ip,
                  incarnation=self.incarnation)
        self.log.info("started: controller %s, data %s, heartbeat %.0f ms", self.args.controller,
                      self.data_dir, 1000 * self.heartbeat_s)
        next_beat = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            if now >= next_beat:
                self.heartbeat()
                next_beat = now + self.heartbeat_s
            poller = zmq.Poller()
            poller.register(self.sock, zmq.POLLIN)
            by_fd = {}
            for rec in self.workers.values():
                if rec.stdout_fd is not None:
                    poller.register(rec.stdout_fd, zmq.POLLIN)
                    by_fd[rec.stdout_fd] = rec
            timeout = max(0.0, min(next_beat - time.monotonic(), 0.1))
            for what, _ in poller.poll(int(timeout * 1000) + 1):
                if what is self.sock:
                    while True:
                        try:
                            self.on_message(self.sock.recv_multipart(zmq.NOBLOCK, copy=False))
                        except zmq.Again:
                            break
                elif what in by_fd:
                    self.on_stdout(by_fd[what])
            now = time.monotonic()
            self.check_deadlines(now)
            self.measure_link(now)
        self.shutdown()

    def shutdown(self) -> None:
        self.on_stop(-1)
        deadline = time.monotonic() + STOP_GRACE_S
        while any(r.proc is not None for r in self.workers.values()):
            now = time.monotonic()
            for rec in list(self.workers.values()):
                if rec.proc is not None:
                    if now > deadline:
                        rec.proc.kill()
                    self.check_exit(rec)
            time.sleep(0.02)
        self.launcher.stop()
        self.hasher.shutdown(wait=False, cancel_futures=True)
        self.sock.close()
        self.ctx.term()
        self.log.info("stopped")


def curve_args(server_public: str, keypair: str | Path) -> list[str]:
    """The agent's CurveZMQ arguments, as whoever starts it passes them: `--opt=VALUE`, since
    a Z85 key may begin with '-' (1 key in 85), which argparse takes for an option."""
    return [f"--curve-server-key={server_public}", f"--curve-keypair={keypair}"]


def share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1], got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stage_image.agent", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", required=True, help="this host's name (as in the topology)")
    p.add_argument("--controller", required=True, help="tcp://IP:PORT of the controller")
    p.add_argument("--data-dir", required=True, help="host-private data directory")
    p.add_argument("--ip", required=True, help="IP address workers bind on")
    p.add_argument("--log-dir", help="worker logs and configs (default DATA_DIR/logs)")
    p.add_argument("--heartbeat-ms", type=float, default=200.0, help="default 200")
    p.add_argument("--fetch-window", type=int, default=4, help="chunks in flight (default 4)")
    p.add_argument("--fetch-timeout-s", type=float, default=10.0,
                   help="re-ask for chunks after this long without one (default 10)")
    p.add_argument("--start-timeout-s", type=float, default=120.0,
                   help="a worker not ready after this long fails (default 120)")
    p.add_argument("--python", default=sys.executable, help="interpreter for workers")
    p.add_argument("--standby-cpu-cgroup", type=Path,
                   help="a cpu cgroup directory under this host's own: standby workers run "
                   "in it while another worker serves, capped at --standby-share of the "
                   "host's quota (testbed.emulation.hosts)")
    p.add_argument("--standby-share", type=share, default=1.0,
                   help="while a worker of this host serves, standbys' models take at most "
                   "this share of the link's time and their workers of the CPU quota "
                   "(default 1: no limit; the testbed passes the scenario's "
                   "control.standby_share)")
    p.add_argument("--link-mbps", type=float,
                   help="the line rate of this host's link: paced standby chunks then take "
                   "a share of its bytes, more than --standby-share where the frames leave "
                   "it idle (measured from /proc/net/dev; default: unknown, the fixed share "
                   "of its time)")
    p.add_argument("--curve-server-key", help="CurveZMQ on: the controller's public key (Z85 "
                   "text, or a file holding it)")
    p.add_argument("--curve-keypair", help="CurveZMQ: this host's keypair file "
                   "(stage_image.security; the controller admits this host by its key)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s agent[{args.host}] %(levelname)s %(message)s")
    agent = Agent(args, logging.getLogger("agent"))

    def on_signal(signum: int, _frame: Any) -> None:
        agent.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
