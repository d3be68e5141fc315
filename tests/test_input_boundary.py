"""The input boundary (issue 15), fuzzed: malformed and extreme scenario, topology and planner
instance files go through the real command lines (run_scenario.py --check, `partitioner
solve`) in-process; every one must end in exit 0 (still valid) or exit 2 with an `error:` line
naming the file, never an exception. Hypothesis generates byte-level damage (non-UTF-8 bytes,
control characters, truncation), extreme numbers in every bounded field, deep nesting and
arbitrary JSON; fixed cases pin the probes of the issue."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partitioner.__main__ import main as partitioner_main
from testbed.experiment.driver import main as run_main

TOPOLOGY = """name: fuzz
defaults:
  host: {cpu: 0.1, memory: 256MiB, disk: 64MiB}
  link: {bandwidth: 100Mbit, delay: 0ms, loss: 0%}
hosts:
  dispatcher: {role: dispatcher, cpu: 0.5}
  edge1: {}
  edge2: {cpu: 0.05, memory: 128MiB}
switches: [s1]
links:
  - {endpoints: [dispatcher, s1], bandwidth: 1Gbit}
  - {endpoints: [edge1, s1]}
  - {endpoints: [edge2, s1], bandwidth: 20Mbit, delay: 5ms}
"""
SCENARIO = """name: fuzz
topology: topo.yaml
model: {zoo: resnet18}
workload: {mode: closed, concurrency: 4, duration: 30s, warmup: 5s, seed: 1}
steps:
  - {at: 10s, action: node.crash, target: edge1}
  - {at: 12s, action: link.bandwidth, target: [edge2, s1], params: {bandwidth: 10Mbit}}
slo: {lost: 0, mismatched: 0, recover_within: 5s}
"""
INSTANCE = {"segments": [{"compute_ms": 12.5, "memory_bytes": 1000000, "output_bytes": 401408},
                         {"compute_ms": 3.0, "memory_bytes": 500000, "output_bytes": 4000}],
            "input_bytes": 602112,
            "nodes": [{"name": "edge1", "speed": 1.0, "memory_bytes": 268435456},
                      {"name": "edge2", "speed": 0.5, "memory_bytes": 268435456}],
            "source": "dispatcher",
            "bandwidth_mbps": [["dispatcher", "edge1", 100.0], ["edge1", "edge2", 50.0],
                               ["dispatcher", "edge2", 20.0]]}
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def _run(call, argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = call(argv)
    return code, err.getvalue()


def check_files(scenario: bytes, topology: bytes) -> tuple[int, str, Path]:
    """run_scenario.py --check on the two files (in a folder removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="tr-fuzz-") as name:
        folder = Path(name)
        (folder / "topo.yaml").write_bytes(topology)
        path = folder / "scenario.yaml"
        path.write_bytes(scenario)
        code, err = _run(run_main, [str(path), "--check"])
    return code, err, folder


def assert_clean(code: int, err: str, folder: Path) -> None:
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err, err
    if code == 2:
        assert "error:" in err and str(folder) in err, err


def solve(data: object | str) -> tuple[int, str, Path]:
    """`partitioner solve` on the instance (in a folder removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="tr-fuzz-") as name:
        path = Path(name) / "instance.json"
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        code, err = _run(partitioner_main, ["solve", str(path), "--time-limit", "0.5"])
    return code, err, path.parent


def test_the_valid_files_pass():
    code, err, _ = check_files(SCENARIO.encode(), TOPOLOGY.encode())
    assert code == 0, err
    assert solve(INSTANCE)[0] == 0


def _damage(text: bytes, data: st.DataObject) -> bytes:
    """One to three byte-level edits: insert, replace or cut, with bytes that are often not
    UTF-8 or are control characters."""
    raw = bytearray(text)
    odd = st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\x07", b"\x1b", b"\t", b"{", b"[",
                           b":", b"'", b'"', b"&a", b"*a", b"!!python/object:os.system",
                           b"\n  ", b"-", b"1e999", b"nan"])
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw)))
        what = data.draw(st.sampled_from(["insert", "replace", "cut"]))
        piece = data.draw(odd)
        if what == "insert":
            raw[at:at] = piece
        elif what == "replace":
            raw[at:at + len(piece)] = piece
        else:
            raw = raw[:at]
    return bytes(raw)


@FUZZ
@given(st.data())
def test_damaged_scenarios_are_refused_cleanly(data):
    assert_clean(*check_files(_damage(SCENARIO.encode(), data), TOPOLOGY.encode()))


@FUZZ
@given(st.data())
def test_damaged_topologies_are_refused_cleanly(data):
    assert_clean(*check_files(SCENARIO.encode(), _damage(TOPOLOGY.encode(), data)))


_EXTREME = st.one_of(
    st.integers(-10**30, 10**30).map(str),
    st.sampled_from(["1e300", "-1", "0", ".inf", "-.inf", ".nan", "1e-300", "100000000",
                     "true", "null", "[]", "{}", "''", "1bit", "1Tbit", "1000000TiB",
                     "1e300Mbit", "99999999h", "0ms", "0.0001Kbit", "500m", "1000000"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
_SCENARIO_FIELDS = ["concurrency: 4", "duration: 30s", "warmup: 5s", "seed: 1",
                    "bandwidth: 10Mbit", "recover_within: 5s", "at: 10s", "at: 12s"]
_TOPOLOGY_FIELDS = ["cpu: 0.1", "memory: 256MiB", "disk: 64MiB", "bandwidth: 100Mbit",
                    "delay: 0ms", "loss: 0%", "cpu: 0.5", "bandwidth: 1Gbit",
                    "bandwidth: 20Mbit", "delay: 5ms", "memory: 128MiB"]


@FUZZ
@given(st.sampled_from(_SCENARIO_FIELDS), _EXTREME)
def test_extreme_scenario_numbers(field, value):
    name = field.split(":")[0]
    scenario = SCENARIO.replace(field, f"{name}: {value}", 1)
    assert_clean(*check_files(scenario.encode(), TOPOLOGY.encode()))


@FUZZ
@given(st.sampled_from(_TOPOLOGY_FIELDS), _EXTREME)
def test_extreme_topology_numbers(field, value):
    name = field.split(":")[0]
    topology = TOPOLOGY.replace(field, f"{name}: {value}", 1)
    assert_clean(*check_files(SCENARIO.encode(), topology.encode()))


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.integers(65, 30000), st.sampled_from(["[", "{a: "]))
def test_deep_nesting_is_refused(depth, opener):
    closer = "]" if opener == "[" else "}"
    scenario = SCENARIO + "control: " + opener * depth + "1" + closer * depth + "\n"
    code, err, folder = check_files(scenario.encode(), TOPOLOGY.encode())
    assert code == 2 and "nested" in err and str(folder) in err, err
    code, err, folder = solve("[" * depth + "]" * depth)
    assert code == 2 and "nested" in err and str(folder) in err, err


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


@FUZZ
@given(_JSON)
def test_arbitrary_json_instances_are_refused_cleanly(data):
    code, err, folder = solve(json.dumps(data))
    assert code == 2 and "Traceback" not in err and str(folder) in err, err


@FUZZ
@given(st.sampled_from(["input_bytes", "segments.0.compute_ms", "segments.1.memory_bytes",
                        "segments.0.output_bytes", "nodes.0.speed", "nodes.1.memory_bytes",
                        "bandwidth_mbps.0.2"]),
       st.one_of(st.floats(allow_nan=False), st.integers(-10**40, 10**40),
                 st.sampled_from([1e300, -1, 0, 2**63, "NaN", None, [], {}])))
def test_extreme_instance_numbers(where, value):
    data = json.loads(json.dumps(INSTANCE))
    *path, last = where.split(".")
    target = data
    for key in path:
        target = target[int(key)] if key.isdigit() else target[key]
    target[int(last) if last.isdigit() else last] = value
    code, err, folder = solve(data)
    assert code in (0, 2) and "Traceback" not in err, err
    if code == 2:
        assert str(folder) in err, err


@pytest.mark.parametrize("text", [b"name: x\xff\n", b"name: x\n# \x07\n", b"\xef\xbb\xbf\x00"])
def test_bad_text_names_file_and_line(text):
    code, err, folder = check_files(text, TOPOLOGY.encode())
    assert code == 2 and str(folder) in err and "Traceback" not in err, err
