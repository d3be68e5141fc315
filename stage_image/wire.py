"""The bytes on the wire, and nothing else: data frames and control messages.

A data frame is a ZeroMQ multipart message `[header, buf_0, ..., buf_{n-1}]`; the header is
UTF-8 JSON (at most 16 KiB) naming each tensor's name, dtype, shape and byte length, the
buffers are the raw C-contiguous tensor bytes, sent zero-copy and read back with
`np.frombuffer` on the received frames. A control message is `[json_header]` or
`[json_header, blob]`, validated against a per-type set of fields.

Everything received is distrusted: `decode_tensors` and `decode_control` check every field and
raise `FrameError` (never anything else) on a malformed message, so a worker or the controller
can drop it with a log line and carry on. Nothing is pickled or evaluated, ever. The encoders
validate too, so a bug shows up at the sender rather than as a silent drop downstream.

Contract: docs/architecture.md ("Data plane", "Control plane").
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# dtype name -> item size. numpy itself is imported only by the data-frame functions: the
# agent uses just the control messages, and on a 128 MiB host numpy's ~18 MiB matter.
DTYPES: dict[str, int] = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "uint8": 1,
                          "bool": 1}
MAX_HEADER_BYTES = 16 * 1024           # data frame header (architecture.md)
MAX_CONTROL_HEADER_BYTES = 64 * 1024   # a deploy of a wide multi-tensor cut names many tensors
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # total tensor bytes of one frame
CHUNK_BYTES = 1024 * 1024              # model files travel in 1 MiB chunks
MAX_NAME = 256
_INT64_MAX = 2**63 - 1

# States a worker can be in, as reported by its agent. `fetching` and `starting` come before
# `ready`; `exited` (asked to stop, or exit 0) and `failed` (anything else) are final.
WORKER_STATES = ("fetching", "starting", "ready", "exited", "failed")


@functools.cache
def _numpy_dtypes() -> tuple[dict[str, np.dtype], dict[np.dtype, str]]:
    """name -> numpy dtype and back, for the wire's dtypes in native byte order. Per frame,
    a dict lookup: numpy's `dtype.name` is computed in Python (14 us a call, measured) and
    `np.dtype(name)` parses its argument (0.9 us)."""
    import numpy as np

    by_name = {name: np.dtype(name) for name in DTYPES}
    return by_name, {dtype: name for name, dtype in by_name.items()}


class FrameError(ValueError):
    """A received message is malformed; the message says what is wrong with it."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what a receiver accepts (a header claiming 10^12 floats is refused before any
    allocation)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_tensors: int = 64
    max_dims: int = 16
    max_header_bytes: int = MAX_HEADER_BYTES


DEFAULT_LIMITS = Limits()


@dataclass
class TensorFrame:
    """A decoded data frame. Arrays are views on the received buffers (no copy)."""

    rid: int
    epoch: int
    version: int
    sent: float
    tensors: dict[str, np.ndarray]


@dataclass
class ControlMessage:
    type: str
    fields: dict[str, Any]
    blob: memoryview | None = None

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


# ---------------------------------------------------------------------------------------------
# helpers shared by both kinds of message

def _as_buffer(frame: Any) -> memoryview:
    """A flat byte view of a received part: zmq.Frame (copy=False), bytes or a memoryview."""
    buf = getattr(frame, "buffer", None)   # zmq.Frame exposes its bytes without a copy
    if buf is None:
        try:
            buf = memoryview(frame)
        except TypeError as exc:
            raise FrameError(f"a message part is not a buffer: {type(frame).__name__}") from exc
    if buf.ndim != 1 or buf.itemsize != 1:
        buf = buf.cast("B")
    return buf


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise FrameError(f"duplicate key {key!r} in header")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise FrameError(f"{name} is not allowed in a header")


def _parse_header(part: Any, limit: int) -> dict[str, Any]:
    raw = _as_buffer(part)
    if raw.nbytes > limit:
        raise FrameError(f"header is {raw.nbytes} bytes, the limit is {limit}")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FrameError("header is not UTF-8") from exc
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates,
                         parse_constant=_reject_constant)
    except FrameError:
        raise
    except (ValueError, RecursionError) as exc:
        raise FrameError(f"header is not JSON: {str(exc)[:80]}") from exc
    if not isinstance(obj, dict):
        raise FrameError("header must be a JSON object")
    return obj


def _int(value: Any, what: str, lo: int = 0, hi: int = _INT64_MAX) -> int:
    # bool is an int subclass in Python; True is not a valid epoch
    if isinstance(value, bool) or not isinstance(value, int):
        raise FrameError(f"{what} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise FrameError(f"{what} = {value} is outside [{lo}, {hi}]")
    return value


def _float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FrameError(f"{what} must be a finite number")
    return float(value)


def _str(value: Any, what: str, max_len: int = MAX_NAME) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        raise FrameError(f"{what} must be a non-empty string of at most {max_len} characters")
    return value


def _exact_keys(obj: dict[str, Any], expected: set[str], what: str) -> None:
    keys = set(obj)
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        raise FrameError(f"{what}: missing {missing}, unknown {extra}")


# ---------------------------------------------------------------------------------------------
# data frames

_FRAME_KEYS = {"kind", "rid", "epoch", "version", "sent", "tensors"}
_TENSOR_KEYS = {"name", "dtype", "shape", "nbytes"}


def encode_tensors(rid: int, epoch: int, version: int, sent: float,
                   tensors: Mapping[str, np.ndarray] | Sequence[tuple[str, np.ndarray]],
                   limits: Limits = DEFAULT_LIMITS) -> list[Any]:
    """Frames for `socket.send_multipart(frames, copy=False)`: the header, then each array
    itself (C-contiguous), so ZeroMQ sends from the array's memory without a copy."""
    import numpy as np

    # (`hasattr`, not isinstance(Mapping): an ABC check costs a microsecond per frame)
    items = list(tensors.items()) if hasattr(tensors, "items") else list(tensors)
    if len(items) > limits.max_tensors:
        raise FrameError(f"{len(items)} tensors, the limit is {limits.max_tensors}")
    dtype_names = _numpy_dtypes()[1]
    metas, buffers, names, total = [], [], set(), 0
    for name, array in items:
        _str(name, "tensor name")
        if name in names:
            raise FrameError(f"tensor name {name!r} appears twice")
        names.add(name)
        array = np.asarray(array)
        if not array.flags.c_contiguous:     # (ascontiguousarray would turn 0-d into 1-d)
            array = array.copy(order="C")
        # native byte order only: the receiver reads the bytes as its own
        dtype_name = dtype_names.get(array.dtype)
        if dtype_name is None:
            raise FrameError(f"tensor {name!r}: dtype {array.dtype} cannot be sent")
        total += array.nbytes
        metas.append({"name": name, "dtype": dtype_name,
                      "shape": list(array.shape), "nbytes": int(array.nbytes)})
        buffers.append(array)
    if total > limits.max_bytes:
        raise FrameError(f"frame carries {total} bytes, the limit is {limits.max_bytes}")
    header = {"kind": "tensor", "rid": _int(rid, "rid"), "epoch": _int(epoch, "epoch"),
              "version": _int(version, "version"), "sent": _float(sent, "sent"),
              "tensors": metas}
    raw = json.dumps(header, separators=(",", ":")).encode()
    if len(raw) > limits.max_header_bytes:
        raise FrameError(f"header is {len(raw)} bytes, the limit is {limits.max_header_bytes}")
    return [raw, *buffers]


def decode_tensors(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> TensorFrame:
    """Validate a received data frame and view its buffers as arrays (no copy).

    Checks: header size, UTF-8 JSON object with exactly the known fields, known dtype,
    non-negative shape whose element count times itemsize equals `nbytes` equals the buffer
    length, as many buffers as tensors, unique names, total bytes under the limit, and bool
    buffers holding only 0 and 1. Raises FrameError, and nothing else, on any violation."""
    import numpy as np

    if not frames:
        raise FrameError("empty message")
    header = _parse_header(frames[0], limits.max_header_bytes)
    _exact_keys(header, _FRAME_KEYS, "data frame header")
    if header["kind"] != "tensor":
        raise FrameError(f"kind must be 'tensor', got {header['kind']!r}")
    rid = _int(header["rid"], "rid")
    epoch = _int(header["epoch"], "epoch")
    version = _int(header["version"], "version")
    sent = _float(header["sent"], "sent")
    metas = header["tensors"]
    if not isinstance(metas, list):
        raise FrameError("tensors must be a list")
    if len(metas) > limits.max_tensors:
        raise FrameError(f"{len(metas)} tensors, the limit is {limits.max_tensors}")
    if len(metas) != len(frames) - 1:
        raise FrameError(f"header describes {len(metas)} tensors, message has "
                         f"{len(frames) - 1} buffers")
    numpy_dtypes = _numpy_dtypes()[0]
    tensors: dict[str, np.ndarray] = {}
    total = 0
    for i, meta in enumerate(metas):
        what = f"tensor {i}"
        if not isinstance(meta, dict):
            raise FrameError(f"{what} must be an object")
        _exact_keys(meta, _TENSOR_KEYS, what)
        name = _str(meta["name"], f"{what} name")
        if name in tensors:
            raise FrameError(f"tensor name {name!r} appears twice")
        dtype_name = meta["dtype"]
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise FrameError(f"{what}: unknown dtype {str(dtype_name)[:32]!r}")
        dtype = numpy_dtypes[dtype_name]
        shape = meta["shape"]
        if not isinstance(shape, list) or len(shape) > limits.max_dims:
            raise FrameError(f"{what}: shape must be a list of at most {limits.max_dims} dims")
        count = 1
        for dim in shape:
            # each dim is bounded first, so the product stays a small Python int
            count *= _int(dim, f"{what} dim", 0, limits.max_bytes)
        expected = count * dtype.itemsize
        if expected > limits.max_bytes:
            raise FrameError(f"{what}: shape {shape} needs {expected} bytes, the limit is "
                             f"{limits.max_bytes}")
        nbytes = _int(meta["nbytes"], f"{what} nbytes", 0, limits.max_bytes)
        if nbytes != expected:
            raise FrameError(f"{what}: nbytes {nbytes} does not match shape {shape} of "
                             f"{dtype_name} ({expected} bytes)")
        buf = _as_buffer(frames[i + 1])
        if buf.nbytes != nbytes:
            raise FrameError(f"{what}: buffer has {buf.nbytes} bytes, header says {nbytes}")
        total += nbytes
        if total > limits.max_bytes:
            raise FrameError(f"frame carries more than {limits.max_bytes} bytes")
        if dtype_name == "bool" and nbytes and int(np.frombuffer(buf, np.uint8).max()) > 1:
            raise FrameError(f"{what}: bool buffer holds values other than 0 and 1")
        array = np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)
        if not array.flags.aligned:
            # tiny ZeroMQ messages live inline and may be unaligned; copying them is cheap
            array = array.copy()
        tensors[name] = array
    return TensorFrame(rid, epoch, version, sent, tensors)


# ---------------------------------------------------------------------------------------------
# control messages

Check = Callable[[Any, str], Any]

_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_SHA_RE = re.compile(r"[0-9a-f]{64}\Z")
_ADDRESS_RE = re.compile(r"(tcp://[A-Za-z0-9_.:\[\]-]{1,200}:\d{1,5}|ipc://[^\x00]{1,200})\Z")


def _check_host(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _HOST_RE.match(value):
        raise FrameError(f"{what} must be a host name")
    return value


_INCARNATION_RE = re.compile(r"[0-9a-f]{16}\Z")


def _check_incarnation(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _INCARNATION_RE.match(value):
        raise FrameError(f"{what} must be 16 hex digits")
    return value


def _check_sha(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _SHA_RE.match(value):
        raise FrameError(f"{what} must be a lowercase hex SHA-256")
    return value


def _check_address(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _ADDRESS_RE.match(value):
        raise FrameError(f"{what} must be a tcp:// or ipc:// address")
    return value


def _check_names(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not 0 < len(value) <= DEFAULT_LIMITS.max_tensors:
        raise FrameError(f"{what} must be a non-empty list of tensor names")
    names = [_str(v, f"{what} entry") for v in value]
    if len(set(names)) != len(names):
        raise FrameError(f"{what} names a tensor twice")
    return names


def _check_state(value: Any, what: str) -> str:
    if value not in WORKER_STATES:
        raise FrameError(f"{what} must be one of {', '.join(WORKER_STATES)}")
    return value


# Machine-readable causes of a worker report (the detail is for people).
WORKER_REASONS = ("started", "stopped", "exit", "start_timeout", "corrupt_model", "disk",
                  "fetch", "conflict")


def _check_reason(value: Any, what: str) -> str:
    if value not in WORKER_REASONS:
        raise FrameError(f"{what} must be one of {', '.join(WORKER_REASONS)}")
    return value


_WORKER_ENTRY_KEYS = {"port", "sha256", "state", "standby", "routes", "load"}


def _check_load(value: Any, what: str) -> list[Any] | None:
    """[frames, mean compute ms] of the worker's last second, or null before the first."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise FrameError(f"{what} must be [frames, mean compute ms] or null")
    _int(value[0], f"{what} frames", 0, 1_000_000)
    if not 0 <= _float(value[1], f"{what} mean compute ms") < 1e7:
        raise FrameError(f"{what} mean compute ms must be in [0, 1e7)")
    return value


def _check_routes(value: Any, what: str) -> list[list[int]]:
    if not isinstance(value, list) or len(value) > 1024:
        raise FrameError(f"{what} must be a list of [epoch, stage]")
    for pair in value:
        if not isinstance(pair, list) or len(pair) != 2:
            raise FrameError(f"{what} entries must be [epoch, stage]")
        _int(pair[0], f"{what} epoch", 1)
        _int(pair[1], f"{what} stage", 0, 1024)
    return value


def _check_workers(value: Any, what: str) -> list[dict[str, Any]]:
    """A heartbeat's workers: one entry per worker process (by its data port), with the
    routes (epoch, stage) it has confirmed. Standby workers have a model loaded and no
    route yet."""
    if not isinstance(value, list) or len(value) > 1024:
        raise FrameError(f"{what} must be a list")
    for entry in value:
        if not isinstance(entry, dict):
            raise FrameError(f"{what} entries must be objects")
        _exact_keys(entry, _WORKER_ENTRY_KEYS, f"{what} entry")
        _int(entry["port"], "port", 1, 65535)
        _check_sha(entry["sha256"], "sha256")
        _check_state(entry["state"], "state")
        if not isinstance(entry["standby"], bool):
            raise FrameError("standby must be true or false")
        _check_routes(entry["routes"], "routes")
        _check_load(entry["load"], "load")
    return value


MAX_STAGED = 64        # models staged on one host's disk: one per contingency plan's stage


def _check_staged(value: Any, what: str) -> list[dict[str, Any]]:
    """A `stage` message's models: each a sha256 and its size, no sha256 twice."""
    if not isinstance(value, list) or len(value) > MAX_STAGED:
        raise FrameError(f"{what} must be a list of at most {MAX_STAGED} models")
    seen = set()
    for entry in value:
        if not isinstance(entry, dict):
            raise FrameError(f"{what} entries must be objects")
        _exact_keys(entry, {"sha256", "size"}, f"{what} entry")
        sha = _check_sha(entry["sha256"], f"{what} sha256")
        _int(entry["size"], f"{what} size")
        if sha in seen:
            raise FrameError(f"{what}: model {sha[:12]} listed twice")
        seen.add(sha)
    return value


def _nonneg(value: Any, what: str) -> int:
    return _int(value, what)


_Z85_RE = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}\Z")


# Senders a worker may admit on one route: the stages before it (one per pipeline feeding it)
# or the dispatcher; more than a plan can have is a bad message.
MAX_UPSTREAM = 64


def _check_curve(value: Any, what: str) -> dict[str, Any]:
    """CurveZMQ keys for a worker: its own secret key and, for a route, the next hop's
    public key and the public keys of its upstream, the only senders it admits (Z85 text, 40
    characters each; only ever sent over an encrypted channel)."""
    if not isinstance(value, dict) or not set(value) <= {"secret", "next_public", "upstream"} \
            or "secret" not in value:
        raise FrameError(f"{what} must be {{secret[, next_public][, upstream]}}")
    for key, text in value.items():
        if key == "upstream":
            if not isinstance(text, list) or len(text) > MAX_UPSTREAM or not all(
                    isinstance(k, str) and _Z85_RE.match(k) for k in text):
                raise FrameError(f"{what}.upstream must be a list of 40-character Z85 keys")
        elif not isinstance(text, str) or not _Z85_RE.match(text):
            raise FrameError(f"{what}.{key} must be a 40-character Z85 key")
    return value


def _positive(value: Any, what: str) -> int:
    return _int(value, what, 1)


def _epoch_or_all(value: Any, what: str) -> int:
    return _int(value, what, -1)


def _stage(value: Any, what: str) -> int:
    return _int(value, what, 0, 1024)


def _port(value: Any, what: str) -> int:
    return _int(value, what, 1, 65535)


def _detail(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) > 4096:
        raise FrameError(f"{what} must be a string of at most 4096 characters")
    return value


# type -> field -> (check, required). Optional fields beyond the architecture table are
# marked; they are additions, never changes, so older peers still parse what they need.
#
# Workers are identified by (host, data port): one process serves one stage model and may
# serve it for several epochs at once (a route per epoch), so a re-plan that keeps a stage
# where it is re-uses the running process instead of starting another. `deploy` asks for a
# route (starting the worker when none runs on that port), `prepare` for a warm standby (the
# model loaded, no route), `stop` withdraws an epoch's routes (a worker left with none and not
# a standby exits), `release` ends the worker on a port whatever it serves. `stage` (an
# addition) lists the models to keep on the host's disk with no worker started: the new
# stages of contingency plans whose standbys found no memory there (the whole list each time,
# replacing the one before).
_CONTROL: dict[str, dict[str, tuple[Check, bool]]] = {
    "hello": {"host": (_check_host, True), "pid": (_nonneg, True),
              "ip": (lambda v, w: _str(v, w, 64), False),          # addition: data-plane IP
              "incarnation": (_check_incarnation, False)},   # addition: one per agent start
    "heartbeat": {"host": (_check_host, True), "seq": (_nonneg, True),
                  "workers": (_check_workers, True),
                  "incarnation": (_check_incarnation, False)},
    "fetch": {"sha256": (_check_sha, True), "offset": (_nonneg, True)},
    # epoch 0 (never deployed) reports on a worker that holds no route: a standby
    "worker": {"port": (_port, True), "epoch": (_nonneg, True), "stage": (_stage, True),
               "state": (_check_state, True), "detail": (_detail, True),
               "reason": (_check_reason, False)},     # machine-readable cause
    "deploy": {"epoch": (_positive, True), "stage": (_stage, True), "version": (_nonneg, True),
               "sha256": (_check_sha, True), "size": (_nonneg, True), "port": (_port, True),
               "next": (_check_address, True), "inputs": (_check_names, True),
               "outputs": (_check_names, True),
               "curve": (_check_curve, False)},          # addition: CurveZMQ on
    "prepare": {"version": (_nonneg, True), "sha256": (_check_sha, True),
                "size": (_nonneg, True), "port": (_port, True),
                "inputs": (_check_names, True), "outputs": (_check_names, True),
                "curve": (_check_curve, False)},
    "stop": {"epoch": (_epoch_or_all, True)},
    "release": {"port": (_port, True)},
    "stage": {"models": (_check_staged, True)},
    "chunk": {"sha256": (_check_sha, True), "offset": (_nonneg, True),
              "total": (_nonneg, True),
              "error": (_detail, False)},                        # addition: unknown sha256
    # k3s backend: a stage pod's worker -> the controller (there is no agent in a pod).
    "stage_heartbeat": {"host": (_check_host, True), "epoch": (_positive, True),
                        "stage": (_stage, True), "seq": (_nonneg, True)},
}
# A stage heartbeat is a few dozen bytes; the receiver refuses anything larger before parsing.
MAX_STAGE_HEARTBEAT_BYTES = 512
CONTROL_TYPES = tuple(_CONTROL)


def _validate_control(obj: dict[str, Any], has_blob: bool,
                      blob_len: int) -> tuple[str, dict[str, Any]]:
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in _CONTROL:
        raise FrameError(f"unknown control message type {str(kind)[:32]!r}")
    schema = _CONTROL[kind]
    fields = {k: v for k, v in obj.items() if k != "type"}
    unknown = sorted(set(fields) - set(schema))
    if unknown:
        raise FrameError(f"{kind}: unknown fields {unknown}")
    for name, (check, required) in schema.items():
        if name in fields:
            fields[name] = check(fields[name], f"{kind}.{name}")
        elif required:
            raise FrameError(f"{kind}: missing field {name!r}")
    if kind == "chunk":
        if "error" not in fields:
            if not has_blob:
                raise FrameError("chunk without its data")
            if blob_len > CHUNK_BYTES or fields["offset"] + blob_len > fields["total"]:
                raise FrameError("chunk data does not fit its offset and total")
    elif has_blob:
        raise FrameError(f"{kind} carries no data part")
    return kind, fields


def encode_control(kind: str, blob: bytes | memoryview | None = None,
                   **fields: Any) -> list[Any]:
    """Frames of a control message; validated like a received one."""
    obj = {"type": kind, **fields}
    _validate_control(obj, blob is not None, len(blob) if blob is not None else 0)
    raw = json.dumps(obj, separators=(",", ":")).encode()
    if len(raw) > MAX_CONTROL_HEADER_BYTES:
        raise FrameError(f"control header is {len(raw)} bytes")
    return [raw] if blob is None else [raw, blob]


def decode_control(frames: Sequence[Any]) -> ControlMessage:
    """Validate a received control message (without any ROUTER identity part)."""
    if not 1 <= len(frames) <= 2:
        raise FrameError(f"control message has {len(frames)} parts, expected 1 or 2")
    obj = _parse_header(frames[0], MAX_CONTROL_HEADER_BYTES)
    blob = _as_buffer(frames[1]) if len(frames) == 2 else None
    kind, fields = _validate_control(obj, blob is not None, blob.nbytes if blob else 0)
    return ControlMessage(kind, fields, blob)
