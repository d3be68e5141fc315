"""SIGINT and SIGTERM end a run with exit 130 and 143 (issue 15), after tearing down what it
built: the real run_scenario.py, without root (--dry-run), signalled while it profiles a model
nobody profiled before (its own random weights, so its own SHA-256 and no cached profile)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGY = """name: tr-exit
hosts:
  dispatcher: {role: dispatcher, cpu: 0.5}
  edge1: {}
switches: [s1]
links:
  - {endpoints: [dispatcher, s1]}
  - {endpoints: [edge1, s1]}
"""
SCENARIO = """name: tr-exit
topology: topo.yaml
model: {path: chain.onnx}
workload: {mode: closed, concurrency: 2, duration: 10s}
"""


def _fresh_model(path: Path, layers: int = 200, width: int = 1024) -> None:
    """A model nobody profiled before that takes seconds to profile on a quiet machine (the
    signal must land while the run works) but is small on disk: every layer multiplies by
    the same fresh weights."""
    rng = np.random.default_rng(int(time.time_ns() % 2**32))
    inits = [numpy_helper.from_array(
        (rng.standard_normal((width, width)) / 32).astype(np.float32), "w")]
    nodes, prev = [], "x"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"m{i}"]))
        prev = "y" if i == layers - 1 else f"r{i}"
        nodes.append(helper.make_node("Relu", [f"m{i}"], [prev]))
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signalled_run_exits_128_plus_the_signal(tmp_path, sig, code):
    (tmp_path / "topo.yaml").write_text(TOPOLOGY)
    (tmp_path / "scenario.yaml").write_text(SCENARIO)
    _fresh_model(tmp_path / "chain.onnx")
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_scenario.py"),
                             str(tmp_path / "scenario.yaml"), "--dry-run", "--out",
                             str(tmp_path / "out")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = ""
    for line in proc.stderr:
        seen += line
        if "profiling" in line:      # the run is under way: prepare() profiles the model
            proc.send_signal(sig)
            break
    _, rest = proc.communicate(timeout=120)
    seen += rest
    assert proc.returncode == code, seen
    assert f"interrupted ({signal.Signals(sig).name})" in seen, seen
    assert "Traceback" not in seen, seen
