"""stage_image.wire: round trips, and every malformed message refused with FrameError (and
never anything else, so a worker can always drop it and carry on)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from stage_image.wire import (
    CHUNK_BYTES,
    FrameError,
    Limits,
    decode_control,
    decode_tensors,
    encode_control,
    encode_tensors,
)

SHA = "ab" * 32


def as_received(frames: list) -> list[bytes]:
    """What a receiver sees: every part as bytes."""
    return [bytes(f) if not isinstance(f, np.ndarray) else f.tobytes() for f in frames]


def header(**overrides) -> dict:
    base = {"kind": "tensor", "rid": 1, "epoch": 2, "version": 1, "sent": 1.5,
            "tensors": [{"name": "x", "dtype": "float32", "shape": [2, 3], "nbytes": 24}]}
    base.update(overrides)
    return base


def frames_of(hdr: dict, *buffers: bytes) -> list[bytes]:
    return [json.dumps(hdr).encode(), *buffers]


# -- round trips ------------------------------------------------------------------------------

def test_round_trip_every_dtype_multi_tensor_and_zero_size():
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((2, 3)).astype(np.float32),
        "f16": rng.standard_normal((4,)).astype(np.float16),
        "i64": rng.integers(-5, 5, (1, 7)).astype(np.int64),
        "i32": rng.integers(-5, 5, (3,)).astype(np.int32),
        "u8": rng.integers(0, 255, (2, 2, 2)).astype(np.uint8),
        "mask": np.array([[True, False, True]]),
        "empty": np.zeros((0, 5), np.float32),
        "scalar": np.array(3.0, np.float32),
        "strided": np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],   # non-contiguous
    }
    frames = encode_tensors(7, 3, 2, 123.25, tensors)
    got = decode_tensors(as_received(frames))
    assert (got.rid, got.epoch, got.version, got.sent) == (7, 3, 2, 123.25)
    assert list(got.tensors) == list(tensors)
    for name, array in tensors.items():
        assert got.tensors[name].dtype == array.dtype
        assert got.tensors[name].shape == array.shape
        np.testing.assert_array_equal(got.tensors[name], array)


def test_round_trip_through_zeromq_zero_copy():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://wire-test")
        b.connect("inproc://wire-test")
        big = np.arange(100_000, dtype=np.float32).reshape(100, 1000)
        a.send_multipart(encode_tensors(1, 1, 1, 0.0, {"big": big, "tiny": np.ones(3, np.int64)}),
                         copy=False)
        got = decode_tensors(b.recv_multipart(copy=False))
        np.testing.assert_array_equal(got.tensors["big"], big)
        np.testing.assert_array_equal(got.tensors["tiny"], np.ones(3, np.int64))
    finally:
        a.close(0)
        b.close(0)


def test_encode_refuses_what_cannot_be_sent():
    with pytest.raises(FrameError, match="float64"):
        encode_tensors(1, 1, 1, 0.0, {"x": np.zeros(3)})
    with pytest.raises(FrameError, match="twice"):
        encode_tensors(1, 1, 1, 0.0, [("x", np.zeros(1, np.float32)),
                                      ("x", np.zeros(1, np.float32))])
    with pytest.raises(FrameError, match="limit"):
        encode_tensors(1, 1, 1, 0.0, {"x": np.zeros(100, np.float32)}, Limits(max_bytes=100))
    with pytest.raises(FrameError):
        encode_tensors(-1, 1, 1, 0.0, {"x": np.zeros(1, np.float32)})


# -- malformed data frames --------------------------------------------------------------------

GOOD_BUFFER = np.zeros((2, 3), np.float32).tobytes()


def test_valid_frame_decodes():
    assert decode_tensors(frames_of(header(), GOOD_BUFFER)).tensors["x"].shape == (2, 3)


@pytest.mark.parametrize("parts", [
    [],
    [b"not json", GOOD_BUFFER],
    [b"\xff\xfe\x00", GOOD_BUFFER],
    [b"[1, 2, 3]", GOOD_BUFFER],
    [b"42"],
    [b'{"kind": "tensor", "kind": "tensor"}'],
    [b" " * (17 * 1024)],
    [b'{"a":' * 5000 + b"1" + b"}" * 5000],
], ids=["empty", "not-json", "not-utf8", "array", "number", "dup-key", "huge-header",
        "deep-nesting"])
def test_garbage_headers_are_refused(parts):
    with pytest.raises(FrameError):
        decode_tensors(parts)


def _tensor(**overrides) -> dict:
    t = {"name": "x", "dtype": "float32", "shape": [2, 3], "nbytes": 24}
    t.update(overrides)
    return t


@pytest.mark.parametrize("hdr", [
    header(kind="tensors"),
    header(rid=-1),
    header(rid=True),
    header(rid=1.0),
    header(rid="1"),
    header(epoch=2**70),
    header(version=None),
    header(sent="now"),
    header(extra=1),
    {k: v for k, v in header().items() if k != "sent"},
    header(tensors={"x": 1}),
    header(tensors=[_tensor(dtype="float64")]),
    header(tensors=[_tensor(dtype="object")]),
    header(tensors=[_tensor(dtype=5)]),
    header(tensors=[_tensor(shape=[-2, -3])]),
    header(tensors=[_tensor(shape="2x3")]),
    header(tensors=[_tensor(shape=[2.0, 3])]),
    header(tensors=[_tensor(shape=[1] * 17 + [6], nbytes=24)]),
    header(tensors=[_tensor(shape=[2**40, 2**40], nbytes=24)]),
    header(tensors=[_tensor(nbytes=25)]),
    header(tensors=[_tensor(name="")]),
    header(tensors=[_tensor(name=7)]),
    header(tensors=[_tensor(extra=True)]),
    header(tensors=["x"]),
    header(tensors=[]),
    header(tensors=[_tensor(), _tensor()]),
], ids=lambda h: json.dumps(h)[:60])
def test_malformed_headers_are_refused(hdr):
    with pytest.raises(FrameError):
        decode_tensors(frames_of(hdr, GOOD_BUFFER))


def test_nan_and_infinity_are_refused():
    raw = json.dumps(header()).replace("1.5", "NaN").encode()
    with pytest.raises(FrameError):
        decode_tensors([raw, GOOD_BUFFER])
    raw = json.dumps(header()).replace("1.5", "Infinity").encode()
    with pytest.raises(FrameError):
        decode_tensors([raw, GOOD_BUFFER])


def test_wrong_buffer_sizes_and_counts_are_refused():
    with pytest.raises(FrameError, match="buffer has"):
        decode_tensors(frames_of(header(), GOOD_BUFFER[:-1]))
    with pytest.raises(FrameError, match="buffer has"):
        decode_tensors(frames_of(header(), GOOD_BUFFER + b"\0"))
    with pytest.raises(FrameError, match="buffers"):
        decode_tensors(frames_of(header()))
    with pytest.raises(FrameError, match="buffers"):
        decode_tensors(frames_of(header(), GOOD_BUFFER, GOOD_BUFFER))
    two = header(tensors=[_tensor(), _tensor(name="y")])
    with pytest.raises(FrameError, match="buffers"):
        decode_tensors(frames_of(two, GOOD_BUFFER))


def test_size_limit_applies_to_the_total():
    hdr = header(tensors=[_tensor(), _tensor(name="y")])
    frames = frames_of(hdr, GOOD_BUFFER, GOOD_BUFFER)
    decode_tensors(frames, Limits(max_bytes=48))
    with pytest.raises(FrameError, match="more than"):
        decode_tensors(frames, Limits(max_bytes=40))


def test_bool_buffers_must_hold_0_or_1():
    hdr = header(tensors=[_tensor(name="m", dtype="bool", shape=[3], nbytes=3)])
    decode_tensors(frames_of(hdr, b"\x00\x01\x01"))
    with pytest.raises(FrameError, match="bool"):
        decode_tensors(frames_of(hdr, b"\x00\x02\x01"))


def test_zero_size_tensor_with_empty_buffer():
    hdr = header(tensors=[_tensor(shape=[0, 4], nbytes=0)])
    assert decode_tensors(frames_of(hdr, b"")).tensors["x"].shape == (0, 4)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.binary(max_size=64), max_size=3))
def test_fuzz_random_bytes_only_raise_frame_error(head, buffers):
    try:
        decode_tensors([head, *buffers])
    except FrameError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6),
                                                                      children, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["kind", "rid", "epoch", "version", "sent", "tensors"]), json_values,
       st.sampled_from(["name", "dtype", "shape", "nbytes"]), json_values)
def test_fuzz_mutated_fields_only_raise_frame_error(key, value, tkey, tvalue):
    hdr = header()
    hdr[key] = value
    if isinstance(hdr.get("tensors"), list) and hdr["tensors"] and isinstance(
            hdr["tensors"][0], dict):
        hdr["tensors"][0][tkey] = tvalue
    try:
        got = decode_tensors(frames_of(hdr, GOOD_BUFFER))
    except FrameError:
        return
    # anything accepted must be self-consistent (under whatever name it was given: a
    # mutated name such as '0' is a valid one)
    (tensor,) = got.tensors.values()
    assert tensor.nbytes == len(GOOD_BUFFER)


# -- control messages -------------------------------------------------------------------------

CONTROL_EXAMPLES = [
    ("hello", None, {"host": "edge1", "pid": 12, "ip": "10.0.0.2"}),
    ("heartbeat", None, {"host": "edge1", "seq": 3,
                         "workers": [{"port": 20001, "sha256": SHA, "state": "ready",
                                      "standby": False, "routes": [[1, 0], [2, 0]],
                                      "load": [12, 63.5]},
                                     {"port": 20002, "sha256": SHA, "state": "starting",
                                      "standby": True, "routes": [], "load": None}]}),
    ("fetch", None, {"sha256": SHA, "offset": CHUNK_BYTES}),
    ("worker", None, {"port": 20001, "epoch": 1, "stage": 0, "state": "failed",
                      "detail": "ENOSPC", "reason": "disk"}),
    ("worker", None, {"port": 20001, "epoch": 0, "stage": 0, "state": "exited",
                      "detail": "standby released", "reason": "stopped"}),
    ("prepare", None, {"version": 2, "sha256": SHA, "size": 10, "port": 20002,
                       "inputs": ["x"], "outputs": ["y"]}),
    ("release", None, {"port": 20002}),
    ("deploy", None, {"epoch": 1, "stage": 0, "version": 1, "sha256": SHA, "size": 10,
                      "port": 20001, "next": "tcp://10.0.0.3:20001", "inputs": ["x"],
                      "outputs": ["h", "x"]}),
    ("stop", None, {"epoch": -1}),
    ("chunk", b"abc", {"sha256": SHA, "offset": 0, "total": 3}),
    ("chunk", None, {"sha256": SHA, "offset": 0, "total": 0, "error": "unknown sha256"}),
]


@pytest.mark.parametrize("kind,blob,fields", CONTROL_EXAMPLES, ids=lambda x: str(x)[:20])
def test_control_round_trip(kind, blob, fields):
    msg = decode_control(as_received(encode_control(kind, blob, **fields)))
    assert msg.type == kind
    assert msg.fields == fields
    assert (bytes(msg.blob) if msg.blob is not None else None) == blob


@pytest.mark.parametrize("obj,blob", [
    ({"type": "reboot"}, None),
    ({"host": "edge1"}, None),
    ({"type": "hello", "host": "edge1"}, None),
    ({"type": "hello", "host": "edge1", "pid": 1, "evil": 1}, None),
    ({"type": "hello", "host": "bad host!", "pid": 1}, None),
    ({"type": "hello", "host": "edge1", "pid": -1}, None),
    ({"type": "fetch", "sha256": "xyz", "offset": 0}, None),
    ({"type": "fetch", "sha256": SHA.upper(), "offset": 0}, None),
    ({"type": "stop", "epoch": -2}, None),
    ({"type": "stop", "epoch": 1}, b"blob"),
    ({"type": "chunk", "sha256": SHA, "offset": 0, "total": 3}, None),
    ({"type": "chunk", "sha256": SHA, "offset": 2, "total": 3}, b"abc"),
    ({"type": "chunk", "sha256": SHA, "offset": 0, "total": 2 * CHUNK_BYTES},
     b"\0" * (CHUNK_BYTES + 1)),
    ({"type": "worker", "port": 1, "epoch": 1, "stage": 0, "state": "dancing", "detail": ""},
     None),
    ({"type": "worker", "port": 1, "epoch": 1, "stage": 0, "state": "ready", "detail": "",
      "reason": "why not"}, None),
    ({"type": "worker", "epoch": 1, "stage": 0, "state": "ready", "detail": ""}, None),
    ({"type": "heartbeat", "host": "e", "seq": 1, "workers": [{"epoch": 1}]}, None),
    ({"type": "heartbeat", "host": "e", "seq": 1, "workers": [
        {"port": 1, "sha256": SHA, "state": "ready", "standby": 0, "routes": [],
         "load": None}]}, None),
    ({"type": "heartbeat", "host": "e", "seq": 1, "workers": [
        {"port": 1, "sha256": SHA, "state": "ready", "standby": False, "routes": [[0, 0]],
         "load": None}]}, None),
    ({"type": "heartbeat", "host": "e", "seq": 1, "workers": [          # no load
        {"port": 1, "sha256": SHA, "state": "ready", "standby": False, "routes": []}]}, None),
    ({"type": "heartbeat", "host": "e", "seq": 1, "workers": [
        {"port": 1, "sha256": SHA, "state": "ready", "standby": False, "routes": [],
         "load": [3, float("nan")]}]}, None),
    ({"type": "heartbeat", "host": "e", "seq": 1, "workers": [
        {"port": 1, "sha256": SHA, "state": "ready", "standby": False, "routes": [],
         "load": [-1, 5.0]}]}, None),
    ({"type": "deploy", "epoch": 0, "stage": 0, "version": 1, "sha256": SHA, "size": 1,
      "port": 7000, "next": "tcp://a:1", "inputs": ["x"], "outputs": ["y"]}, None),
    ({"type": "release", "port": 0}, None),
    ({"type": "prepare", "version": 1, "sha256": SHA, "size": 1, "port": 7000,
      "inputs": ["x"], "outputs": ["y"], "epoch": 3}, None),
    ({"type": "heartbeat", "host": "e", "seq": 1, "workers": "all"}, None),
    ({"type": "deploy", "epoch": 1, "stage": 0, "version": 1, "sha256": SHA, "size": 1,
      "port": 70000, "next": "tcp://a:1", "inputs": ["x"], "outputs": ["y"]}, None),
    ({"type": "deploy", "epoch": 1, "stage": 0, "version": 1, "sha256": SHA, "size": 1,
      "port": 7000, "next": "http://a:1", "inputs": ["x"], "outputs": ["y"]}, None),
    ({"type": "deploy", "epoch": 1, "stage": 0, "version": 1, "sha256": SHA, "size": 1,
      "port": 7000, "next": "tcp://a:1", "inputs": [], "outputs": ["y"]}, None),
], ids=lambda x: json.dumps(x)[:50] if isinstance(x, dict) else str(x)[:10])
def test_malformed_control_messages_are_refused(obj, blob):
    parts = [json.dumps(obj).encode()] + ([blob] if blob is not None else [])
    with pytest.raises(FrameError):
        decode_control(parts)


def test_control_message_part_counts():
    with pytest.raises(FrameError):
        decode_control([])
    with pytest.raises(FrameError):
        decode_control([b'{"type":"stop","epoch":1}', b"a", b"b"])
    with pytest.raises(FrameError):
        encode_control("stop", epoch="all")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.one_of(st.none(), st.binary(max_size=16)))
def test_fuzz_control_only_raises_frame_error(head, blob):
    try:
        decode_control([head] if blob is None else [head, blob])
    except FrameError:
        pass
