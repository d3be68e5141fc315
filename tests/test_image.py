"""The stage image builds without any registry and runs with no network at all.

Builds with `python -m testbed.emulation.images` (cached: the base image and wheelhouse are
reused, an unchanged image is not rebuilt), then in containers started with `--network none`:
imports onnxruntime and zmq, runs an onnxruntime inference on a model made on the host, and
starts the agent, worker and model fetcher entry points. Every container is labelled and
removed at the end; the Docker daemon is stopped if this test started it.

Timing on the project's machine (2 cores): from nothing ~110 s (debootstrap with python3
~70 s, wheel download ~5 s, import + build ~30 s); with the base image in the daemon's store
~25 s; an up-to-date image ~5 s."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.emulation.dockerd import Dockerd
from tests.conftest import RunInImage

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
TAG = "edgepipe-stage:latest"
MAX_IMAGE_MB = 400          # ~250 MB today; catches a compiler or apt lists sneaking in


@pytest.fixture(scope="module")
def image(daemon: Dockerd) -> str:
    build = subprocess.run([sys.executable, "-m", "testbed.emulation.images", "--quiet",
                            "--tag", TAG], cwd=REPO, capture_output=True, text=True,
                           timeout=900)
    print(build.stdout, build.stderr, sep="\n")
    assert build.returncode == 0, build.stderr
    size = int(daemon.docker("image", "inspect", "-f", "{{.Size}}", TAG).stdout)
    assert size < MAX_IMAGE_MB * 1e6, f"image is {size / 1e6:.0f} MB"
    return TAG


@pytest.fixture
def run(run_in: RunInImage, image: str) -> RunInImage:
    return functools.partial(run_in, image)


def test_runtime_imports(run) -> None:
    proc = run("-c", "import onnxruntime, zmq, numpy; "
                     "print(onnxruntime.__version__, zmq.zmq_version(), numpy.__version__)")
    assert proc.returncode == 0, proc.stderr.decode()
    ort_version, _, _ = proc.stdout.decode().split()
    import onnxruntime
    assert ort_version == onnxruntime.__version__      # same pin as the host


def test_inference_runs_offline(run, tmp_path) -> None:
    # A model made on the host (onnx is not in the image), run by the image's onnxruntime.
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])], "double",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "double.onnx")
    os.chmod(tmp_path, 0o755)
    script = ("import numpy as np, onnxruntime as ort; "
              "s = ort.InferenceSession('/m/double.onnx', providers=['CPUExecutionProvider']); "
              "print(s.run(None, {'x': np.array([1.5, 2.0], dtype=np.float32)})[0].tolist())")
    proc = run("-c", script, mounts=(f"{tmp_path}:/m:ro",))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == "[3.0, 4.0]"


def test_entry_points_start(daemon: Dockerd, image: str, run) -> None:
    entrypoint = daemon.docker("image", "inspect", "-f", "{{json .Config.Entrypoint}}", image)
    assert entrypoint.stdout.decode().strip() == '["python3","-m","stage_image.agent"]'
    # `--entrypoint` takes one word: run each module through python3 explicitly.
    agent = run("-m", "stage_image.agent", "--help")
    assert agent.returncode == 0, agent.stderr.decode()
    assert b"usage" in agent.stdout.lower()
    worker = run("-m", "stage_image.worker", "--help")
    err = worker.stderr.decode()
    # The worker takes a config path, not options: any clean exit that is not a crash on
    # import (onnxruntime, zmq, stage_image.wire) is what this checks.
    assert worker.returncode in (0, 2), err
    assert "Traceback" not in err and "ModuleNotFoundError" not in err
    fetch = run("-m", "stage_image.fetch_model", "--help")
    assert fetch.returncode == 0, fetch.stderr.decode()


def test_runs_as_non_root(run) -> None:
    proc = run("-c", "import os; print(os.getuid(), os.getgid())")
    assert proc.stdout.decode().split() == ["65532", "65532"]
