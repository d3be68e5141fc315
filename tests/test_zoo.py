"""The seeded zoo: valid opset-17 models with the promised inputs and outputs, deterministic
bytes, sane activations, and residual branches that actually contribute."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from formats.errors import InputError
from partitioner import cuts, split, zoo
from partitioner.__main__ import main as cli

SMALL = ("resnet18", "resnet50", "mobilenetv2", "bert_mini")


@pytest.fixture(scope="session")
def small_models() -> dict[str, onnx.ModelProto]:
    return {name: onnx.load(zoo.ensure_model(name)) for name in SMALL}


def _io(model: onnx.ModelProto) -> tuple[list, list]:
    def describe(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]
    return describe(model.graph.input), describe(model.graph.output)


def test_models_are_valid_with_the_promised_io(small_models):
    for model in small_models.values():
        onnx.checker.check_model(model)
        assert model.opset_import[0].version == 17
        assert not any(i.name in {t.name for t in model.graph.initializer}
                       for i in model.graph.input)
    image_in = [("input", onnx.TensorProto.FLOAT, [1, 3, 224, 224])]
    for name in ("resnet18", "resnet50", "mobilenetv2"):
        assert _io(small_models[name]) == (image_in, [("fc", onnx.TensorProto.FLOAT, [1, 1000])])
    inputs, outputs = _io(small_models["bert_mini"])
    assert inputs == [("input_ids", onnx.TensorProto.INT64, [1, 128]),
                      ("attention_mask", onnx.TensorProto.INT64, [1, 128])]
    assert outputs == [("last_hidden_state", onnx.TensorProto.FLOAT, [1, 128, 256]),
                       ("pooler_output", onnx.TensorProto.FLOAT, [1, 256])]


def test_parameter_counts_match_the_architectures(small_models):
    def params(model):
        return sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    # torchvision: 11.69M, 25.56M, 3.50M (batch norm folded into conv biases here)
    assert 11.6e6 < params(small_models["resnet18"]) < 11.8e6
    assert 25.4e6 < params(small_models["resnet50"]) < 25.7e6
    assert 3.4e6 < params(small_models["mobilenetv2"]) < 3.6e6
    assert 11.0e6 < params(small_models["bert_mini"]) < 11.3e6     # google BERT-mini: 11.2M


def test_building_is_deterministic(small_models):
    again = zoo.build_model("resnet18").SerializeToString()
    assert again == small_models["resnet18"].SerializeToString()
    assert zoo.build_model("resnet18", seed=1).SerializeToString() != again
    assert zoo.build_model("mobilenetv2").SerializeToString() == \
        small_models["mobilenetv2"].SerializeToString()


def _all_values(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every intermediate tensor of a model (exposed as extra outputs)."""
    inferred = cuts.infer_shapes(model)
    outputs = {o.name for o in inferred.graph.output}
    inferred.graph.output.extend(v for v in inferred.graph.value_info if v.name not in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(inferred.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "bert_mini"])
def test_activations_are_sane_and_residual_branches_contribute(small_models, name):
    model = small_models[name]
    feeds = split.random_feeds(cuts.analyze(model))
    values = _all_values(model, feeds)
    floats = {k: v for k, v in values.items() if v.dtype == np.float32 and v.size > 16
              and not k.startswith("mask.") and not k.endswith(".scores.masked")}
    for key, value in floats.items():
        assert np.all(np.isfinite(value)), key
        assert 1e-2 < _rms(value) < 1e2, f"{name}: {key} has rms {_rms(value):.3g}"
    residual_adds = [n for n in model.graph.node if n.op_type == "Add" and
                     all(i in values for i in n.input) and
                     (n.name.endswith(".add") or n.name.endswith(".residual"))]
    assert residual_adds, name
    for node in residual_adds:
        skip, branch = (_rms(values[i]) for i in node.input)
        # A branch well below the skip still must move the result far beyond 1e-4.
        assert min(skip, branch) / max(skip, branch) > 0.05, (node.name, skip, branch)


def test_resolve_model(tmp_path):
    assert zoo.resolve_model("resnet18") == zoo.zoo_path("resnet18")
    assert zoo.resolve_model(str(zoo.zoo_path("resnet18"))) == zoo.zoo_path("resnet18")
    with pytest.raises(InputError, match="neither a zoo model"):
        zoo.resolve_model("resnet19")
    with pytest.raises(InputError):
        zoo.resolve_model(tmp_path / "nothing.onnx")


def test_cache_is_rebuilt_when_missing_or_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path))
    path = zoo.ensure_model("mobilenetv2", progress=False)
    assert path == tmp_path / "zoo" / "mobilenetv2.onnx"
    first = path.read_bytes()
    mtime = path.stat().st_mtime_ns
    assert zoo.ensure_model("mobilenetv2", progress=False) == path
    assert path.stat().st_mtime_ns == mtime            # cached: not rebuilt
    stamp = path.with_name(path.name + ".json")
    stamp.write_text('{"zoo_version": 0}')             # made by an older builder
    zoo.ensure_model("mobilenetv2", progress=False)
    assert path.read_bytes() == first
    assert '"zoo_version": 1' in stamp.read_text()
    assert not list(path.parent.glob(".*.tmp"))
    with pytest.raises(InputError):
        zoo.ensure_model("alexnet")


def test_cli_zoo_list_and_build(tmp_path, capsys):
    assert cli(["zoo", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in zoo.BUILDERS)
    out = tmp_path / "m.onnx"
    assert cli(["zoo", "build", "mobilenetv2", "--out", str(out)]) == 0
    assert out.read_bytes() == zoo.zoo_path("mobilenetv2").read_bytes()
    assert not (tmp_path / "m.onnx.json").exists()     # stamps belong to the cache only
    assert cli(["zoo", "build", "alexnet"]) == 2
    assert cli(["zoo", "build", "all", "--out", str(out)]) == 2


@pytest.mark.slow
def test_vgg16_builds_with_sane_output():
    path = zoo.ensure_model("vgg16")
    model = onnx.load(path)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert 138.3e6 < params < 138.4e6                   # torchvision: 138.36M
    outputs = split.run_full(path, split.random_feeds(cuts.analyze(model)))
    assert 1e-2 < _rms(outputs["fc"]) < 1e2
