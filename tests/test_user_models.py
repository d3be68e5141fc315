"""Models as users bring them (issue 13): exporter-shaped graphs through cuts/plan/split, cut
sizes from a real run, stated input shapes, external data, token inputs behind a Reshape,
`solve`'s stdout, and kernel time charged to the nodes a fused kernel stands for.

Small versions of the exporter-shaped zoo builders keep this fast; nothing here asserts a
timing (speed belongs in benchmarks/profile_verify.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from formats.errors import EXIT_BAD_INPUT, InputError
from formats.scenario import load_scenario
from partitioner import attribution, cuts, inputs, split, zoo_exported
from partitioner.__main__ import main
from partitioner.instance import Segment
from partitioner.profile import external_data_files, model_sha256, profile_kernels
from testbed.control import dispatcher, repository

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4


def small_gpt(tmp_path: Path, name: str = "gpt.onnx") -> Path:
    model = zoo_exported.build_gpt_exported(7, layers=2, hidden=64, heads=2, vocab=300,
                                            positions=64)
    path = tmp_path / name
    onnx.save(model, path)
    return path


def small_bert(tmp_path: Path) -> Path:
    model = zoo_exported.build_bert_exported(8, layers=2, hidden=64, heads=2, vocab=500,
                                             positions=64)
    path = tmp_path / "bert.onnx"
    onnx.save(model, path)
    return path


# -- exporter-shaped models through cuts, split and plan --------------------------------------
@pytest.mark.parametrize("build", [small_gpt, small_bert])
def test_exported_models_split_and_chain(tmp_path: Path, build) -> None:
    path = build(tmp_path)
    model = onnx.load(path)
    assert any("/" in n.name for n in model.graph.node)            # path-like names
    assert {"Shape", "Gather", "Concat"} <= {n.op_type for n in model.graph.node}
    assert len(model.graph.input) == 2 and len(model.graph.output) == 2
    prepared = cuts.prepare_model(path, {"input_ids": (1, 16), "attention_mask": (1, 16)})
    assert len(prepared.analysis.cuts) >= 4
    every = list(range(len(prepared.analysis.cuts)))
    split.split_model(path, every, tmp_path / "stages")
    # Stage files keep the symbolic axes: they chain at the planned length and at another.
    for length in (16, 24):
        shapes = {"input_ids": (1, length), "attention_mask": (1, length)}
        assert split.check_split(path, tmp_path / "stages", input_shapes=shapes) <= TOLERANCE


def test_gpt_ties_embeddings_and_reshapes_ids(tmp_path: Path) -> None:
    model = onnx.load(small_gpt(tmp_path))
    readers = [n for n in model.graph.node if "transformer.wte.weight" in n.input]
    assert {n.op_type for n in readers} == {"Gather", "Transpose"}          # tied
    first = [n for n in model.graph.node if "input_ids" in n.input]
    assert {n.op_type for n in first} == {"Reshape", "Shape"}               # ids reshaped


def test_cuts_and_plan_cli_on_exported_model(tmp_path: Path, capsys) -> None:
    path = small_gpt(tmp_path)
    assert main(["cuts", str(path), "--json", "--input-shape", "input_ids=1x32",
                 "--input-shape", "attention_mask=1x32"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["input_shapes"] == {"input_ids": [1, 32], "attention_mask": [1, 32]}
    # the hidden state between layers: 32 tokens x 64 floats, not 1 token
    assert 32 * 64 * 4 in {c["bytes"] for c in data["cuts"]}
    plan = tmp_path / "plan.json"
    assert main(["plan", str(path), "--topology", str(ROOT / "topologies" / "star-5.yaml"),
                 "--out", str(plan), "--input-shape", "input_ids=1x32",
                 "--input-shape", "attention_mask=1x32"]) == 0
    assert main(["split", str(path), "--plan", str(plan), "--out", str(tmp_path / "s")]) == 0
    shapes = {"input_ids": (1, 32), "attention_mask": (1, 32)}
    assert split.check_split(path, tmp_path / "s", input_shapes=shapes) <= TOLERANCE


# -- cut sizes: measured, never an unknown dimension counted as 1 -----------------------------
def _unknown_dims_model() -> onnx.ModelProto:
    """MatMul -> Reshape to a target computed from the data (shape inference cannot follow
    ReduceMax, so the reshaped tensor has unknown dims) -> Relu -> MatMul."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 256)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((256, 10)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["y"], name="/m/MatMul"),
        helper.make_node("ReduceMax", ["x"], ["peak"], name="/m/ReduceMax", axes=[1],
                         keepdims=0),
        helper.make_node("Abs", ["peak"], ["abs"], name="/m/Abs"),
        helper.make_node("Sign", ["abs"], ["sign"], name="/m/Sign"),
        helper.make_node("Cast", ["sign"], ["cast"], name="/m/Cast", to=TensorProto.INT64),
        helper.make_node("Neg", ["cast"], ["minus_one"], name="/m/Neg"),
        helper.make_node("Concat", ["one", "minus_one"], ["target"], name="/m/Concat", axis=0),
        helper.make_node("Reshape", ["y", "target"], ["z"], name="/m/Reshape"),
        helper.make_node("Relu", ["z"], ["r"], name="/m/Relu"),
        helper.make_node("MatMul", ["r", "w2"], ["out"], name="/m/MatMul_1"),
    ]
    graph = helper.make_graph(nodes, "unk", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 64])], [helper.make_tensor_value_info(
            "out", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_unknown_dims_are_measured_not_counted_as_one() -> None:
    model = cuts.infer_shapes(_unknown_dims_model())
    inferred = cuts.analyze(model, require_sizes=False)
    z_cut = next(c for c in inferred.cuts if c.names == ["z"])
    assert z_cut.tensors[0].nbytes == -1          # unknown, and said so (it was 4 bytes)
    with pytest.raises(InputError, match="only known from a run"):
        cuts.analyze(model)                       # an unknown size is never priced
    measured = cuts.prepare_model(_unknown_dims_model()).analysis
    z_measured = next(c for c in measured.cuts if c.names == ["z"])
    assert z_measured.tensors[0].shape == (1, 256) and z_measured.nbytes == 256 * 4


# -- input shapes -----------------------------------------------------------------------------
def test_symbolic_dimension_without_value_exits_2(tmp_path: Path, capsys) -> None:
    path = small_gpt(tmp_path)
    assert main(["cuts", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "input_ids" in err and "dimension 1" in err and "sequence" in err
    assert main(["cuts", str(path), "--input-shape", "input_ids=1xfoo"]) == EXIT_BAD_INPUT
    assert main(["cuts", str(path), "--input-shape", "nope=1x4"]) == EXIT_BAD_INPUT
    assert "no input 'nope'" in capsys.readouterr().err


def test_fixed_dimension_must_agree_and_batch_defaults_to_one(tmp_path: Path,
                                                             capsys) -> None:
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="/a/MatMul"),
         helper.make_node("Relu", ["h"], ["y"], name="/a/Relu")], "b",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32),
                                             "w")])
    path = tmp_path / "batch.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), path)
    assert main(["cuts", str(path)]) == 0
    out = capsys.readouterr().out
    assert "batch dimension 'N' set to 1" in out and "input 32 bytes" in out
    assert main(["cuts", str(path), "--input-shape", "x=3x8"]) == 0
    assert "input 96 bytes" in capsys.readouterr().out
    assert main(["cuts", str(path), "--input-shape", "x=1x9"]) == EXIT_BAD_INPUT
    assert "fixed at 8" in capsys.readouterr().err


def test_scenario_input_shapes(tmp_path: Path) -> None:
    star5 = ROOT / "topologies" / "star-5.yaml"
    text = (f"name: t\ntopology: {star5}\nmodel: {{zoo: gpt_exported, input_shapes: "
            "{input_ids: [1, 32], attention_mask: [1, 32]}}\n"
            "workload: {mode: closed, concurrency: 2, duration: 5s}\n")
    path = tmp_path / "s.yaml"
    path.write_text(text)
    assert load_scenario(path).input_shapes == {"input_ids": (1, 32),
                                                "attention_mask": (1, 32)}
    path.write_text(text.replace("[1, 32]}}", "[1, 0]}}"))
    assert "[1, 0]}}" in path.read_text()
    with pytest.raises(InputError) as info:
        load_scenario(path)
    assert "model.input_shapes" in str(info.value) and ":3" in str(info.value)
    plain = tmp_path / "plain.yaml"
    plain.write_text(text.replace(", input_shapes: {input_ids: [1, 32], attention_mask: "
                                  "[1, 32]}", ""))
    assert load_scenario(plain).input_shapes == {}


def test_workload_input_dims_follow_stated_shapes(tmp_path: Path) -> None:
    path = small_gpt(tmp_path)
    dims = dispatcher.input_dims(path, {"input_ids": (2, 48)})
    assert dims == {"batch": 2, "sequence": 48}
    pool = dispatcher.make_pool(dispatcher.input_specs(path), 2, 1, dims,
                                dispatcher.default_generator(dispatcher.vocab_sizes(path)))
    assert pool[0]["input_ids"].shape == (2, 48) and pool[0]["attention_mask"].shape == (2, 48)
    with pytest.raises(InputError, match="sequence"):
        dispatcher.input_dims(path, {})


# -- token inputs behind a Reshape ------------------------------------------------------------
def test_token_ids_found_through_reshape(tmp_path: Path) -> None:
    path = small_gpt(tmp_path)
    assert inputs.vocab_sizes(onnx.load(path)) == {"input_ids": 300}
    assert dispatcher.vocab_sizes(path) == {"input_ids": 300}
    feeds = inputs.make_feeds(onnx.load(path), {"input_ids": (1, 200),
                                                 "attention_mask": (1, 200)})
    assert feeds["input_ids"].max() >= 2 and feeds["input_ids"].max() < 300


# -- external data ----------------------------------------------------------------------------
def test_external_data_publish_and_split_round_trip(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    model = onnx.load(small_bert(tmp_path))
    path = source / "model.onnx"
    onnx.save(onnx.load(tmp_path / "bert.onnx"), path, save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    assert external_data_files(path) == ["weights.bin"]
    identity = model_sha256(path)

    profile = types.SimpleNamespace(segments=[Segment(1.0, 1, 1)], input_bytes=1,
                                    total_ms=1.0, activation_reserve_bytes=0)
    manifest = repository.publish(tmp_path / "repo", path, 1, profile)
    published = manifest.directory / repository.MODEL_FILE
    assert sorted(p.name for p in manifest.directory.iterdir()) == ["manifest.json",
                                                                     "model.onnx"]
    assert external_data_files(published) == []                     # self-contained
    assert repository.sha256_file(published) == manifest.sha256
    shapes = {"input_ids": (1, 16), "attention_mask": (1, 16)}
    feeds = inputs.make_feeds(model, shapes)
    expected = split.run_full(model, feeds)
    got = split.run_full(published, feeds)
    assert split.max_difference(expected, got) == 0.0
    assert repository.publish(tmp_path / "repo", path, 1, profile).sha256 == manifest.sha256

    split.split_model(path, [0, 3], tmp_path / "stages")
    for stage in (tmp_path / "stages").glob("stage_*.onnx"):
        assert external_data_files(stage) == []
    assert split.check_split(path, tmp_path / "stages", input_shapes=shapes) <= TOLERANCE

    # The identity covers the weights: same graph file, other weights, other hash.
    weights = source / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert model_sha256(path) != identity
    with pytest.raises(InputError, match="other bytes"):
        repository.publish(tmp_path / "repo", path, 1, profile)


# -- solve: stdout is JSON only ---------------------------------------------------------------
def test_highs_banner_never_reaches_stdout() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from partitioner.algorithms.flow import _quiet_highs; "
                               "_quiet_highs(); print('END')"],
        capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout == "END\n"


def test_solve_stdout_is_pure_json(tmp_path: Path) -> None:
    instance = {"segments": [{"compute_ms": c, "memory_bytes": 1000, "output_bytes": 5000}
                             for c in (3.0, 1.0, 2.0, 4.0)],
                "input_bytes": 10000, "source": "src",
                "nodes": [{"name": f"n{i}", "speed": 0.5 + i / 4, "memory_bytes": 3000}
                          for i in range(4)],
                "bandwidth_mbps": [["src", f"n{i}", 10.0 + i] for i in range(4)]
                + [[f"n{i}", f"n{j}", 5.0 * (i + j + 1)]
                   for i in range(4) for j in range(i + 1, 4)]}
    path = tmp_path / "instance.json"
    path.write_text(json.dumps(instance))
    for algorithm in ("optimal", "auto"):
        result = subprocess.run([sys.executable, "-m", "partitioner", "solve", str(path),
                                 "--algorithm", algorithm, "--time-limit", "5"],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        plan = json.loads(result.stdout)                 # nothing but the JSON
        assert plan["stages"] and plan["algorithm"] == algorithm


# -- attribution ------------------------------------------------------------------------------
def _fused_graphs() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """An exporter-named MatMul + Add + Relu, and the optimised graph onnxruntime makes of it
    (Gemm named `<matmul>/MatMulAddFusion` between input and output reshapes)."""
    base = "/m/encoder/layer.0/intermediate/dense"
    w = numpy_helper.from_array(np.ones((4, 8), np.float32), "onnx::MatMul_7")
    b = numpy_helper.from_array(np.ones(8, np.float32), "dense.bias")
    original = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", w.name], ["mm"], name=f"{base}/MatMul"),
         helper.make_node("Add", ["mm", b.name], ["add"], name=f"{base}/Add"),
         helper.make_node("Relu", ["add"], ["y"], name="/m/act/Relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8])],
        initializer=[w, b]))
    optimised = helper.make_model(helper.make_graph(
        [helper.make_node("Reshape", ["x", "s0"], ["r0"], name="gemm_input_reshape"),
         helper.make_node("Gemm", ["r0", w.name, b.name], ["g0"],
                          name=f"{base}/MatMul/MatMulAddFusion"),
         helper.make_node("Reshape", ["g0", "s1"], ["add"], name="gemm_output_reshape"),
         helper.make_node("Relu", ["add"], ["y"], name="/m/act/Relu")], "o", [], []))
    return original, optimised


def test_fused_kernel_time_goes_to_the_nodes_it_fused() -> None:
    original, optimised = _fused_graphs()
    base = "/m/encoder/layer.0/intermediate/dense"
    result = attribution.attribute(
        original, optimised,
        {"gemm_input_reshape": 0.5, f"{base}/MatMul/MatMulAddFusion": 9.0,
         "gemm_output_reshape": 0.5, "/m/act/Relu": 1.0},
        {f"{base}/MatMul": 8.0, f"{base}/Add": 2.0, "/m/act/Relu": 1.0})
    assert result.unmatched_ms == 0.0
    # 9.5 ms (the fused Gemm and the reshape feeding it) shared 8:2, the output reshape
    # (which writes the Add's tensor) to the Add, the Relu its own.
    assert result.node_ms[f"{base}/MatMul"] == pytest.approx(9.5 * 0.8)
    assert result.node_ms[f"{base}/Add"] == pytest.approx(9.5 * 0.2 + 0.5)
    assert result.node_ms["/m/act/Relu"] == pytest.approx(1.0)


def test_real_fused_kernels_are_charged_to_their_nodes(tmp_path: Path) -> None:
    path = small_bert(tmp_path)
    prepared = cuts.prepare_model(path, {"input_ids": (1, 16), "attention_mask": (1, 16)})
    model_bytes = prepared.model.SerializeToString()
    runs = profile_kernels(model_bytes, prepared.feeds, 2, "ORT_DISABLE_ALL")
    base_ms = attribution.unoptimised_node_ms(
        prepared.model, {k.node_index: k.ms for k in runs[-1]})
    optimized = str(tmp_path / "optimised.onnx")
    opt_runs = profile_kernels(model_bytes, prepared.feeds, 2, "ORT_ENABLE_ALL", optimized)
    kernel_ms = {k.name: k.ms for k in opt_runs[-1]}
    result = attribution.attribute(prepared.model, onnx.load(optimized), kernel_ms, base_ms)
    fused = [k for k in kernel_ms if k.startswith("/bert/encoder")
             and k.endswith("/MatMul/MatMulAddFusion")]
    assert len(fused) == 2 * 6, "onnxruntime fused no MatMul + Add"
    for kernel in fused:
        layer = kernel.removesuffix("/MatMul/MatMulAddFusion")
        assert result.kernels[kernel] == [f"{layer}/MatMul", f"{layer}/Add"]
    # the pooler's Gemm also took its Tanh: charged to all three
    pooler = next(k for k in kernel_ms if "/bert/pooler/dense/MatMul" in k)
    assert set(result.kernels[pooler]) == {"/bert/pooler/dense/MatMul",
                                           "/bert/pooler/dense/Add",
                                           "/bert/pooler/activation/Tanh"}
    assert result.unmatched_ms == 0.0
    assert sum(result.node_ms.values()) == pytest.approx(sum(kernel_ms.values()))


def _padded_channel_convs() -> onnx.ModelProto:
    """Conv 3x3 (16 -> 32) + Relu, Conv 1x1 (32 -> 20), Conv 1x1 (20 -> 32): onnxruntime runs
    them in the NCHWc layout, and the 20-channel convolution's bias is padded to the block
    size, so its kernel reads and writes only tensors the original graph does not have."""
    rng = np.random.default_rng(0)

    def conv(name: str, x: str, c_in: int, c_out: int, k: int) -> tuple[onnx.NodeProto, list]:
        w = numpy_helper.from_array(rng.standard_normal((c_out, c_in, k, k)).astype(np.float32),
                                    f"{name}.weight")
        b = numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32),
                                    f"{name}.bias")
        return helper.make_node("Conv", [x, w.name, b.name], [name], name=name,
                                pads=[k // 2] * 4), [w, b]

    expand, p1 = conv("expand", "x", 16, 32, 3)
    project, p2 = conv("project", "expand_relu", 32, 20, 1)
    widen, p3 = conv("widen", "project", 20, 32, 1)
    return helper.make_model(helper.make_graph(
        [expand, helper.make_node("Relu", ["expand"], ["expand_relu"], name="expand_relu"),
         project, widen], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 56, 56])],
        [helper.make_tensor_value_info("widen", TensorProto.FLOAT, [1, 32, 56, 56])],
        initializer=p1 + p2 + p3), opset_imports=[helper.make_opsetid("", 17)])


def test_kernels_touching_no_original_tensor_are_placed_by_position(tmp_path: Path) -> None:
    model = _padded_channel_convs()
    feeds = {"x": np.ones((1, 16, 56, 56), np.float32)}
    model_bytes = model.SerializeToString()
    base = profile_kernels(model_bytes, feeds, 2, "ORT_DISABLE_ALL")
    base_ms = attribution.unoptimised_node_ms(model, {k.node_index: k.ms for k in base[-1]})
    optimized = str(tmp_path / "optimised.onnx")
    runs = profile_kernels(model_bytes, feeds, 2, "ORT_ENABLE_ALL", optimized)
    kernel_ms = {k.name: k.ms for k in runs[-1]}
    graph = onnx.load(optimized)
    convs = [n.name for n in graph.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3 and all(n.domain == "com.microsoft.nchwc"
                                   for n in graph.graph.node if n.op_type == "Conv"), \
        "onnxruntime did not use the NCHWc layout"
    result = attribution.attribute(model, graph, kernel_ms, base_ms)
    # each convolution kernel stands for its own node (the Relu folded into the first)
    assert [result.kernels[k] for k in convs] == [["expand", "expand_relu"], ["project"],
                                                  ["widen"]]
    assert result.node_ms["project"] >= kernel_ms[convs[1]]
    assert sum(result.node_ms.values()) == pytest.approx(sum(kernel_ms.values()))
