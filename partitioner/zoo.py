"""The model zoo: standard architectures built directly as ONNX (opset 17) with seeded random
weights, so nothing is downloaded and torch is never needed.

Division of labour: this module only *builds* models and resolves a model argument (zoo name
or ONNX path) to a file. Cut points are found in `partitioner.cuts`, stages are cut out in
`partitioner.split`, costs are measured in `partitioner.profile`.

Partition quality depends on the architecture, not on the weights, but the weights still have
to behave: every model is initialised He-style (variance kept constant through conv + ReLU),
residual branches are scaled down but never zero (a cut that dropped a branch must change the
result), and batch norm is folded into the convolutions the way an exported inference model
has it. Building is deterministic: the same seed gives the same bytes, so a cached file can be
rebuilt anywhere and compared by SHA-256.
"""

from __future__ import annotations

import json
import math
import os
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from formats.errors import InputError
from formats.models import ZOO_MODELS
from partitioner import zoo_exported

OPSET = 17
IR_VERSION = 8            # the IR version that goes with opset 17; old enough for any runtime
IMAGE_SHAPE = (1, 3, 224, 224)
BERT_SEQ = 128
ZOO_VERSION = 1           # bump when a builder changes: cached files are then rebuilt


def cache_dir() -> Path:
    """Root of everything the partitioner caches ($EDGEPIPE_CACHE, default ~/.cache/edgepipe)."""
    root = os.environ.get("EDGEPIPE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "edgepipe"


def zoo_path(name: str) -> Path:
    return cache_dir() / "zoo" / f"{name}.onnx"


class GraphBuilder:
    """Accumulates nodes and initializers; every helper returns the name of its output tensor.

    Node names double as output tensor names, so profiles and cut tables read like the model
    (`layer2.0.conv1`), and initializers are `<node>.weight` / `<node>.bias`.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()

    # -- plumbing -------------------------------------------------------------------------
    def _unique(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"duplicate name {name}")
        self._names.add(name)
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, self._unique(name)))
        return name

    def normal(self, name: str, shape: tuple[int, ...], std: float) -> str:
        data = self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        return self.const(name, data)

    def op(self, op_type: str, name: str, inputs: list[str], **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [self._unique(name)], name=name,
                                           **attrs))
        return name

    # -- layers ---------------------------------------------------------------------------
    def conv(self, x: str, name: str, cin: int, cout: int, k: int, stride: int = 1,
             groups: int = 1, gain: float = 2.0) -> str:
        """Conv with a (folded batch-norm) bias. `gain` 2 suits a following ReLU (He);
        1 keeps the second moment of a linear projection."""
        fan_in = cin // groups * k * k
        w = self.normal(f"{name}.weight", (cout, cin // groups, k, k), math.sqrt(gain / fan_in))
        b = self.normal(f"{name}.bias", (cout,), 0.01)
        pad = k // 2
        return self.op("Conv", name, [x, w, b], kernel_shape=[k, k], strides=[stride, stride],
                       pads=[pad, pad, pad, pad], group=groups)

    def relu(self, x: str, name: str) -> str:
        return self.op("Relu", name, [x])

    def relu6(self, x: str, name: str) -> str:
        if "relu6.min" not in self._names:
            self.const("relu6.min", np.array(0.0, np.float32))
            self.const("relu6.max", np.array(6.0, np.float32))
        return self.op("Clip", name, [x, "relu6.min", "relu6.max"])

    def gemm(self, x: str, name: str, fin: int, fout: int, gain: float = 1.0) -> str:
        w = self.normal(f"{name}.weight", (fout, fin), math.sqrt(gain / fin))
        b = self.normal(f"{name}.bias", (fout,), 0.01)
        return self.op("Gemm", name, [x, w, b], transB=1)

    def linear(self, x: str, name: str, fin: int, fout: int, std: float) -> str:
        """MatMul + Add on a [batch, seq, features] tensor (how transformers export)."""
        w = self.normal(f"{name}.weight", (fin, fout), std)
        b = self.normal(f"{name}.bias", (fout,), 0.01)
        y = self.op("MatMul", f"{name}.matmul", [x, w])
        return self.op("Add", name, [y, b])

    def layer_norm(self, x: str, name: str, width: int) -> str:
        # Scale near 1 and a small bias, as a trained model has them: not exactly 1/0 so a
        # mix-up between the parameters of two layers would show.
        scale = self.const(f"{name}.weight", (1.0 + 0.1 * self.rng.standard_normal(
            width, dtype=np.float32)).astype(np.float32))
        bias = self.normal(f"{name}.bias", (width,), 0.02)
        return self.op("LayerNormalization", name, [x, scale, bias], axis=-1, epsilon=1e-12)

    def classifier_head(self, x: str, channels: int, classes: int = 1000) -> str:
        y = self.op("GlobalAveragePool", "avgpool", [x])
        y = self.op("Flatten", "flatten", [y], axis=1)
        return self.gemm(y, "fc", channels, classes)

    def model(self, name: str, inputs: list[onnx.ValueInfoProto],
              outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs,
                                  initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="edgepipe.zoo", ir_version=IR_VERSION)
        model.doc_string = f"{name}: seeded random weights (edgepipe zoo)"
        onnx.checker.check_model(model)
        return model


def _image_io(classes: int = 1000) -> tuple[list, list]:
    return ([helper.make_tensor_value_info("input", TensorProto.FLOAT, list(IMAGE_SHAPE))],
            [helper.make_tensor_value_info("fc", TensorProto.FLOAT, [1, classes])])


# -- ResNet ---------------------------------------------------------------------------------
def _resnet(name: str, bottleneck: bool, blocks: list[int], seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed)
    # Each residual branch ends in a conv scaled by alpha: the second moment grows by about
    # (1 + alpha^2) per block, so alpha^2 = 1/blocks keeps the whole net within a factor e.
    alpha2 = 1.0 / sum(blocks)
    x = g.conv("input", "conv1", 3, 64, 7, stride=2)
    x = g.relu(x, "relu")
    x = g.op("MaxPool", "maxpool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    expansion = 4 if bottleneck else 1
    for stage, (count, width) in enumerate(zip(blocks, [64, 128, 256, 512]), start=1):
        for i in range(count):
            p = f"layer{stage}.{i}"
            stride = 2 if (i == 0 and stage > 1) else 1
            cout = width * expansion
            if bottleneck:
                y = g.relu(g.conv(x, f"{p}.conv1", cin, width, 1), f"{p}.relu1")
                y = g.relu(g.conv(y, f"{p}.conv2", width, width, 3, stride), f"{p}.relu2")
                y = g.conv(y, f"{p}.conv3", width, cout, 1, gain=2.0 * alpha2)
            else:
                y = g.relu(g.conv(x, f"{p}.conv1", cin, width, 3, stride), f"{p}.relu1")
                y = g.conv(y, f"{p}.conv2", width, cout, 3, gain=2.0 * alpha2)
            skip = x
            if stride != 1 or cin != cout:
                skip = g.conv(x, f"{p}.downsample", cin, cout, 1, stride, gain=1.0)
            x = g.relu(g.op("Add", f"{p}.add", [skip, y]), f"{p}.relu")
            cin = cout
    out = g.classifier_head(x, cin)
    assert out == "fc"
    return g.model(name, *_image_io())


def build_resnet18(seed: int) -> onnx.ModelProto:
    return _resnet("resnet18", False, [2, 2, 2, 2], seed)


def build_resnet50(seed: int) -> onnx.ModelProto:
    return _resnet("resnet50", True, [3, 4, 6, 3], seed)


# -- MobileNetV2 ----------------------------------------------------------------------------
def build_mobilenetv2(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed)
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    residuals = sum(n - 1 for _, _, n, _ in settings)
    alpha2 = 1.0 / residuals
    x = g.relu6(g.conv("input", "features.0.conv", 3, 32, 3, stride=2), "features.0.relu6")
    cin, index = 32, 1
    for t, c, n, s in settings:
        for i in range(n):
            p = f"features.{index}"
            stride = s if i == 0 else 1
            hidden = cin * t
            residual = stride == 1 and cin == c
            y = x
            if t != 1:
                y = g.relu6(g.conv(y, f"{p}.expand", cin, hidden, 1), f"{p}.expand_relu6")
            y = g.relu6(g.conv(y, f"{p}.depthwise", hidden, hidden, 3, stride, groups=hidden),
                        f"{p}.depthwise_relu6")
            # The linear bottleneck keeps the second moment (gain 1), scaled down when a
            # residual adds it to the block input.
            y = g.conv(y, f"{p}.project", hidden, c, 1, gain=alpha2 if residual else 1.0)
            if residual:
                y = g.op("Add", f"{p}.add", [x, y])
            x, cin, index = y, c, index + 1
    x = g.relu6(g.conv(x, f"features.{index}.conv", cin, 1280, 1), f"features.{index}.relu6")
    out = g.classifier_head(x, 1280)
    assert out == "fc"
    return g.model("mobilenetv2", *_image_io())


# -- VGG-16 ---------------------------------------------------------------------------------
def build_vgg16(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed)
    config = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"]
    x, cin, index = "input", 3, 0
    for item in config:
        if item == "M":
            x = g.op("MaxPool", f"features.{index}", [x], kernel_shape=[2, 2], strides=[2, 2])
            index += 1
            continue
        x = g.conv(x, f"features.{index}", cin, int(item), 3)
        x = g.relu(x, f"features.{index + 1}")
        cin, index = int(item), index + 2
    # At 224x224 the adaptive average pool to 7x7 is the identity; exporters drop it too.
    x = g.op("Flatten", "flatten", [x], axis=1)
    x = g.relu(g.gemm(x, "classifier.0", 512 * 7 * 7, 4096, gain=2.0), "classifier.1")
    x = g.relu(g.gemm(x, "classifier.3", 4096, 4096, gain=2.0), "classifier.4")
    x = g.gemm(x, "fc", 4096, 1000)
    return g.model("vgg16", *_image_io())


# -- BERT-mini ------------------------------------------------------------------------------
def build_bert_mini(seed: int, layers: int = 4, hidden: int = 256, heads: int = 4,
                    vocab: int = 30522, seq: int = BERT_SEQ) -> onnx.ModelProto:
    """A BERT encoder (4 layers, hidden 256, 4 heads, as google/bert_uncased_L-4_H-256_A-4).

    The attention mask becomes an additive bias once, before the first layer, and every
    layer adds it to its attention scores: between layers two tensors are live (hidden state
    and mask bias), so the encoder has no single-tensor cut and needs 2-tensor cuts.
    Outputs: last_hidden_state [1, seq, hidden] and pooler_output [1, hidden]; the pooler
    reads the last hidden state, so a stage after the encoder passes it through.
    """
    g = GraphBuilder(seed)
    head_dim = hidden // heads
    ffn = 4 * hidden
    g.const("shape.split_heads", np.array([1, seq, heads, head_dim], np.int64))
    g.const("shape.merge_heads", np.array([1, seq, hidden], np.int64))
    g.const("mask.axes", np.array([1, 2], np.int64))
    g.const("one", np.array(1.0, np.float32))
    g.const("half", np.array(0.5, np.float32))
    g.const("sqrt2", np.array(math.sqrt(2.0), np.float32))
    g.const("mask.fill", np.array(-10000.0, np.float32))
    g.const("scale", np.array(1.0 / math.sqrt(head_dim), np.float32))
    g.const("cls.index", np.array(0, np.int64))

    # Additive mask bias [1, 1, 1, seq]: 0 where attended, -10000 where masked.
    m = g.op("Cast", "mask.cast", ["attention_mask"], to=TensorProto.FLOAT)
    m = g.op("Sub", "mask.invert", ["one", m])
    m = g.op("Mul", "mask.fill_value", [m, "mask.fill"])
    mask = g.op("Unsqueeze", "mask.bias", [m, "mask.axes"])

    # Embeddings (token type 0 for every token, folded into the position table).
    words = g.normal("embeddings.word.weight", (vocab, hidden), 0.02)
    x = g.op("Gather", "embeddings.word", [words, "input_ids"], axis=0)
    positions = g.normal("embeddings.position.weight", (seq, hidden), 0.02)
    x = g.op("Add", "embeddings.add", [x, positions])
    x = g.layer_norm(x, "embeddings.norm", hidden)

    # Projections at 1/sqrt(fan_in) so attention scores have unit scale (softmax neither
    # uniform nor one-hot) and each residual branch contributes visibly.
    proj = 1.0 / math.sqrt(hidden)
    for i in range(layers):
        p = f"encoder.{i}"
        q = g.linear(x, f"{p}.query", hidden, hidden, proj)
        k = g.linear(x, f"{p}.key", hidden, hidden, proj)
        v = g.linear(x, f"{p}.value", hidden, hidden, proj)
        q = g.op("Transpose", f"{p}.query.heads",
                 [g.op("Reshape", f"{p}.query.split", [q, "shape.split_heads"])],
                 perm=[0, 2, 1, 3])
        k = g.op("Transpose", f"{p}.key.heads",
                 [g.op("Reshape", f"{p}.key.split", [k, "shape.split_heads"])],
                 perm=[0, 2, 3, 1])
        v = g.op("Transpose", f"{p}.value.heads",
                 [g.op("Reshape", f"{p}.value.split", [v, "shape.split_heads"])],
                 perm=[0, 2, 1, 3])
        s = g.op("MatMul", f"{p}.scores", [q, k])
        s = g.op("Mul", f"{p}.scores.scaled", [s, "scale"])
        s = g.op("Add", f"{p}.scores.masked", [s, mask])
        s = g.op("Softmax", f"{p}.probs", [s], axis=-1)
        c = g.op("MatMul", f"{p}.context", [s, v])
        c = g.op("Transpose", f"{p}.context.merge", [c], perm=[0, 2, 1, 3])
        c = g.op("Reshape", f"{p}.context.flat", [c, "shape.merge_heads"])
        a = g.linear(c, f"{p}.attention.out", hidden, hidden, proj)
        x = g.layer_norm(g.op("Add", f"{p}.attention.residual", [x, a]),
                         f"{p}.attention.norm", hidden)
        f = g.linear(x, f"{p}.ffn.in", hidden, ffn, math.sqrt(2.0 / hidden))
        # GELU(f) = 0.5 f (1 + erf(f / sqrt 2)); opset 17 has no Gelu op.
        e = g.op("Erf", f"{p}.gelu.erf", [g.op("Div", f"{p}.gelu.div", [f, "sqrt2"])])
        e = g.op("Add", f"{p}.gelu.add", [e, "one"])
        f = g.op("Mul", f"{p}.gelu.half",
                 [g.op("Mul", f"{p}.gelu.mul", [f, e]), "half"])
        f = g.linear(f, f"{p}.ffn.out", ffn, hidden, 1.0 / math.sqrt(ffn))
        last = i == layers - 1
        x = g.layer_norm(g.op("Add", f"{p}.ffn.residual", [x, f]),
                         "last_hidden_state" if last else f"{p}.ffn.norm", hidden)

    cls = g.op("Gather", "pooler.cls", [x, "cls.index"], axis=1)
    pooled = g.op("Tanh", "pooler_output", [g.gemm(cls, "pooler.dense", hidden, hidden)])
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, seq]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, seq])]
    outputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, seq, hidden]),
               helper.make_tensor_value_info(pooled, TensorProto.FLOAT, [1, hidden])]
    return g.model("bert_mini", inputs, outputs)


BUILDERS: dict[str, Callable[[int], onnx.ModelProto]] = {
    "resnet18": build_resnet18,
    "resnet50": build_resnet50,
    "mobilenetv2": build_mobilenetv2,
    "vgg16": build_vgg16,
    "bert_mini": build_bert_mini,
    **zoo_exported.BUILDERS,
}

DESCRIPTIONS = ZOO_MODELS


def model_seed(name: str, seed: int = 0) -> int:
    """Each model draws from its own stream, so building one never changes another."""
    return zlib.crc32(name.encode()) ^ seed


def build_model(name: str, seed: int = 0) -> onnx.ModelProto:
    if name not in BUILDERS:
        raise InputError(f"unknown zoo model {name!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[name](model_seed(name, seed))


def write_model(model: onnx.ModelProto, path: Path) -> None:
    """Write atomically: concurrent builders (tests, helpers) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(model.SerializeToString())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _stamp_data(name: str) -> dict[str, object]:
    return {"model": name, "zoo_version": ZOO_VERSION, "seed": 0}


def ensure_model(name: str, out: Path | None = None, progress: bool = True) -> Path:
    """Path of zoo model `name` (seed 0) in the cache, building it when the file is missing.
    A cached file carries a stamp (`NAME.onnx.json`) with the zoo version, so a cache made by
    an older builder is rebuilt rather than trusted. With `out`, always build to that file."""
    if name not in BUILDERS:
        raise InputError(f"unknown zoo model {name!r}; known: {', '.join(BUILDERS)}")
    path = Path(out) if out is not None else zoo_path(name)
    stamp = _stamp(path)
    if out is None:
        try:
            if path.is_file() and json.loads(stamp.read_text()) == _stamp_data(name):
                return path
        except (OSError, ValueError):
            pass                      # no stamp or a broken one: build again
    if progress:
        print(f"building zoo model {name} -> {path} ...", file=sys.stderr, flush=True)
    write_model(build_model(name), path)
    if out is None:
        stamp.write_text(json.dumps(_stamp_data(name)) + "\n")
    if progress:
        print(f"built {name}: {path.stat().st_size / 1e6:.1f} MB", file=sys.stderr, flush=True)
    return path


def default_input_shapes(spec: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """The input shapes a zoo model is planned at when the user states none (its symbolic
    sequence axis needs a length); empty for every other model."""
    text = os.fspath(spec)
    for name, shapes in zoo_exported.DEFAULT_INPUT_SHAPES.items():
        if text == name or Path(text) == zoo_path(name):
            return dict(shapes)
    return {}


def resolve_model(spec: str | os.PathLike[str]) -> Path:
    """A model argument as users give it: a zoo name (built on first use) or an ONNX file."""
    text = os.fspath(spec)
    if text in BUILDERS:
        return ensure_model(text)
    path = Path(text)
    if path.is_file():
        return path
    raise InputError(f"neither a zoo model ({', '.join(BUILDERS)}) nor an existing ONNX file",
                     file=text)
