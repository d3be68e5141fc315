"""The k3s controller's image builds offline FROM the stage image and runs the control loop's
code with no network at all.

Builds with `python -m testbed.emulation.images --target controller` (the stage image first,
up to date or rebuilt, then the controller image; each is rebuilt only when its inputs
changed), then in containers started with `--network none`: the controller's command line,
the loop's imports, the real planner solving an instance, and a model split the way the loop
does it on a re-plan (`testbed.control.planning.split_model`: a `python -m partitioner split` child
process) checked against the full model with the image's onnxruntime.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testbed.emulation import images as build_image
from testbed.emulation.dockerd import Dockerd
from testbed.k8s.manifests import K8sSettings
from tests.conftest import RunInImage

REPO = Path(__file__).resolve().parent.parent
MAX_EXTRA_MB = 200          # over the stage image: ~112 MB today (kubernetes 59)


def test_default_controller_image_is_the_one_built() -> None:
    assert K8sSettings(nodes={}).controller_image == build_image.CONTROLLER_TAG


def test_controller_modules_follow_the_imports() -> None:
    app = build_image.controller_app()
    # The pod's command, the planner (imported inside a function), the split child process.
    for name in ("testbed/k8s/loop.py", "formats/scenario.py",
                 "partitioner/algorithms/optimal.py", "partitioner/__main__.py",
                 "partitioner/split.py"):
        assert name in app
    # The emulator is not the controller's business; stage_image is the stage image's.
    assert not any(name.startswith(("testbed/emulation/", "testbed/experiment/", "stage_image/"))
                   for name in app)


@pytest.fixture(scope="module")
def image(daemon: Dockerd) -> str:
    build = subprocess.run([sys.executable, "-m", "testbed.emulation.images", "--quiet",
                            "--target", "controller"], cwd=REPO, capture_output=True,
                           text=True, timeout=900)
    print(build.stdout, build.stderr, sep="\n")
    assert build.returncode == 0, build.stderr
    return build_image.CONTROLLER_TAG


@pytest.fixture
def run(run_in: RunInImage, image: str) -> RunInImage:
    return functools.partial(run_in, image)


@pytest.mark.root
@pytest.mark.slow
class TestControllerImage:
    """In the image (the two tests above need neither root nor Docker)."""

    def test_from_the_stage_image(self, daemon: Dockerd, image: str) -> None:
        def inspect(tag: str, field: str) -> str:
            return daemon.docker("image", "inspect", "-f", field, tag).stdout.decode().strip()

        # Every layer of the stage image is shared, the controller's are added on top.
        stage = json.loads(inspect(build_image.DEFAULT_TAG, "{{json .RootFS.Layers}}"))
        controller = json.loads(inspect(image, "{{json .RootFS.Layers}}"))
        assert controller[:len(stage)] == stage and len(controller) > len(stage)
        extra = int(inspect(image, "{{.Size}}")) - int(inspect(build_image.DEFAULT_TAG,
                                                               "{{.Size}}"))
        assert extra < MAX_EXTRA_MB * 1e6, f"the controller adds {extra / 1e6:.0f} MB"
        assert inspect(image, "{{json .Config.Entrypoint}}") == \
            '["python3","-m","testbed.k8s.loop"]'
        assert inspect(image, "{{.Config.User}}") == "65532:65532"

    def test_controller_command_line(self, run: RunInImage) -> None:
        proc = run("-m", "testbed.k8s.loop", "--backend", "k3s", "--help")
        assert proc.returncode == 0, proc.stderr.decode()
        assert b"usage" in proc.stdout.lower()

    def test_loop_imports(self, run: RunInImage) -> None:
        proc = run("-c", "import testbed.k8s.loop, partitioner.algorithms, kubernetes; "
                         "import highspy, onnx, yaml; print(kubernetes.__version__)")
        assert proc.returncode == 0, proc.stderr.decode()
        import kubernetes
        assert proc.stdout.decode().strip() == kubernetes.__version__   # the pinned client

    def test_tar_for_kubectl_cp(self, run: RunInImage) -> None:
        proc = run("--version", entrypoint="tar")
        assert proc.returncode == 0, proc.stderr.decode()

    def test_planner_solves_in_the_image(self, run: RunInImage, tmp_path: Path) -> None:
        mib = 1024 * 1024
        instance = {
            "segments": [{"compute_ms": ms, "memory_bytes": 40 * mib, "output_bytes": 200_000}
                         for ms in (12.0, 30.0, 8.0, 25.0, 5.0)],
            "input_bytes": 600_000,
            "nodes": [{"name": "edge1", "speed": 1.0, "memory_bytes": 128 * mib},
                      {"name": "edge2", "speed": 2.0, "memory_bytes": 96 * mib},
                      {"name": "edge3", "speed": 0.5, "memory_bytes": 256 * mib}],
            "source": "dispatcher",
            "bandwidth_mbps": [["dispatcher", "edge1", 100.0], ["dispatcher", "edge2", 50.0],
                               ["dispatcher", "edge3", 100.0], ["edge1", "edge2", 50.0],
                               ["edge2", "edge3", 100.0], ["edge1", "edge3", 20.0]]}
        (tmp_path / "instance.json").write_text(json.dumps(instance))
        os.chmod(tmp_path, 0o755)
        proc = run("-m", "partitioner", "solve", "/m/instance.json", "--algorithm", "optimal",
                   mounts=(f"{tmp_path}:/m:ro",))
        assert proc.returncode == 0, proc.stderr.decode()
        plan = json.loads(proc.stdout)
        host = subprocess.run([sys.executable, "-m", "partitioner", "solve",
                               str(tmp_path / "instance.json"), "--algorithm", "optimal"],
                              cwd=REPO, capture_output=True, text=True, check=True)
        expected = json.loads(host.stdout)
        assert plan["optimal"] is True
        assert plan["bottleneck_ms"] == pytest.approx(expected["bottleneck_ms"])
        assert plan["stages"] == expected["stages"]

    def test_split_as_the_loop_does(self, run: RunInImage, tmp_path: Path) -> None:
        _write_chain_model(tmp_path / "chain.onnx")
        os.chmod(tmp_path, 0o755)
        os.chmod(tmp_path / "chain.onnx", 0o644)
        script = (
            "from pathlib import Path\n"
            "from partitioner.split import check_split\n"
            "from testbed.control.planning import split_model\n"
            "out = Path('/tmp/ctlimg-split/stages')\n"
            "split_model(Path('/m/chain.onnx'), [0, 1], out)\n"
            "print(len(list(out.glob('stage_*.onnx'))), check_split('/m/chain.onnx', out))\n")
        proc = run("-c", script, mounts=(f"{tmp_path}:/m:ro",))
        assert proc.returncode == 0, proc.stderr.decode()
        stages, difference = proc.stdout.decode().split()
        assert int(stages) == 3
        assert float(difference) < 1e-5


def _write_chain_model(path: Path) -> None:
    """MatMul + Relu three times, seeded weights: two single-tensor cut points."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    nodes, weights, previous = [], [], "x"
    for i in range(3):
        weights.append(numpy_helper.from_array(
            rng.standard_normal((16, 16)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [previous, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"h{i}" if i < 2 else "y"])]
        previous = f"h{i}"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
