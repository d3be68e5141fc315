"""Zoo models shaped like what `torch.onnx.export` writes for Hugging Face transformers, built
with `onnx.helper` (seeded random weights, no torch), so everything a user's exported model
brings is covered in CI:

- path-like node names with `/` (`/transformer/h.0/attn/c_attn/MatMul`) and tensors named
  `<node>_output_0`, weights partly named `onnx::MatMul_N` as exporters name them;
- symbolic `batch` and `sequence` axes, so nothing is planned until a length is stated
  (`DEFAULT_INPUT_SHAPES` gives the zoo's own length);
- reshape targets computed at run time by Shape -> Gather -> Unsqueeze -> Concat subgraphs;
- token ids that pass a Reshape (GPT) before their embedding Gather;
- tied embeddings (GPT: the word table is also the output projection, through a Transpose);
- two inputs (ids and mask) and two outputs.

Division of labour as in `partitioner.zoo`, which registers these builders.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
EXPORTED_SEQ = 64


class ExportBuilder:
    """Nodes named by module path, outputs `<path>_output_<i>`, as torch.onnx names them."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._anonymous = 0

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, name: str | None, shape: tuple[int, ...], std: float) -> str:
        if name is None:                        # how exporters name transposed weights
            self._anonymous += 1
            name = f"onnx::MatMul_{1000 + self._anonymous}"
        return self.const(name, (self.rng.standard_normal(shape, dtype=np.float32)
                                 * np.float32(std)))

    def op(self, op_type: str, path: str, inputs: list[str], outputs: int = 1,
           **attrs: object) -> str:
        names = [f"{path}_output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=path, **attrs))
        return names[0]

    def linear(self, x: str, path: str, fin: int, fout: int, std: float,
               bias_name: str) -> str:
        w = self.weight(None, (fin, fout), std)
        b = self.const(bias_name, (self.rng.standard_normal(fout, dtype=np.float32)
                                   * np.float32(0.01)))
        return self.op("Add", f"{path}/Add", [self.op("MatMul", f"{path}/MatMul", [x, w]), b])

    def layer_norm(self, x: str, path: str, prefix: str, width: int) -> str:
        scale = self.const(f"{prefix}.weight", (1.0 + 0.1 * self.rng.standard_normal(
            width, dtype=np.float32)).astype(np.float32))
        bias = self.const(f"{prefix}.bias", (self.rng.standard_normal(width, dtype=np.float32)
                                             * np.float32(0.02)))
        return self.op("LayerNormalization", f"{path}/LayerNormalization", [x, scale, bias],
                       axis=-1, epsilon=1e-5)

    def dim(self, x: str, path: str, axis: int) -> str:
        """Shape(x)[axis] as a 1-element tensor (Shape -> Gather -> Unsqueeze)."""
        shape = self.op("Shape", f"{path}/Shape", [x])
        index = self.const(f"{path}/Constant_output_0", np.array(axis, np.int64))
        scalar = self.op("Gather", f"{path}/Gather", [shape, index], axis=0)
        return self.op("Unsqueeze", f"{path}/Unsqueeze", [scalar, "const.axes0"])

    def gelu(self, x: str, path: str) -> str:
        e = self.op("Erf", f"{path}/Erf", [self.op("Div", f"{path}/Div", [x, "const.sqrt2"])])
        e = self.op("Add", f"{path}/Add", [e, "const.one"])
        return self.op("Mul", f"{path}/Mul_1", [self.op("Mul", f"{path}/Mul", [x, e]),
                                                 "const.half"])

    def attention(self, x: str, path: str, prefix: str, hidden: int, heads: int,
                  bias: str) -> str:
        """Self-attention with reshape targets from its input's run-time shape (as
        `x.size()` exports); `bias` is added to the scores."""
        head_dim = hidden // heads
        batch, seq = self.dim(x, f"{path}/size0", 0), self.dim(x, f"{path}/size1", 1)
        proj = 1.0 / math.sqrt(hidden)
        split = self.op("Concat", f"{path}/Concat", [batch, seq, "const.heads", "const.hdim"],
                        axis=0)
        merge = self.op("Concat", f"{path}/Concat_1", [batch, seq, "const.hidden"], axis=0)
        parts = []
        for name, perm in (("query", [0, 2, 1, 3]), ("key", [0, 2, 3, 1]),
                           ("value", [0, 2, 1, 3])):
            y = self.linear(x, f"{path}/{name}", hidden, hidden, proj, f"{prefix}.{name}.bias")
            y = self.op("Reshape", f"{path}/{name}/Reshape", [y, split])
            parts.append(self.op("Transpose", f"{path}/{name}/Transpose", [y], perm=perm))
        q, k, v = parts
        s = self.op("MatMul", f"{path}/MatMul", [q, k])
        s = self.op("Div", f"{path}/Div", [s, self.const(f"{prefix}.scale", np.array(
            math.sqrt(head_dim), np.float32))])
        s = self.op("Add", f"{path}/Add", [s, bias])
        s = self.op("Softmax", f"{path}/Softmax", [s], axis=-1)
        c = self.op("MatMul", f"{path}/MatMul_1", [s, v])
        c = self.op("Transpose", f"{path}/Transpose", [c], perm=[0, 2, 1, 3])
        c = self.op("Reshape", f"{path}/Reshape", [c, merge])
        return self.linear(c, f"{path}/output/dense", hidden, hidden, proj,
                           f"{prefix}.output.bias")

    def model(self, name: str, inputs: list[onnx.ValueInfoProto],
              outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs,
                                  initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="pytorch", producer_version="2.5.0",
                                  ir_version=IR_VERSION)
        model.doc_string = f"{name}: exporter-shaped, seeded random weights (edgepipe zoo)"
        onnx.checker.check_model(model)
        return model


def _common_constants(g: ExportBuilder, hidden: int, heads: int) -> None:
    g.const("const.axes0", np.array([0], np.int64))
    g.const("const.axes12", np.array([1, 2], np.int64))
    g.const("const.heads", np.array([heads], np.int64))
    g.const("const.hdim", np.array([hidden // heads], np.int64))
    g.const("const.hidden", np.array([hidden], np.int64))
    g.const("const.one", np.array(1.0, np.float32))
    g.const("const.half", np.array(0.5, np.float32))
    g.const("const.sqrt2", np.array(math.sqrt(2.0), np.float32))
    g.const("const.fill", np.array(np.finfo(np.float32).min / 2, np.float32))


def _mask_bias(g: ExportBuilder, path: str) -> str:
    """[batch, 1, 1, seq] additive bias from attention_mask, as the HF models export it."""
    m = g.op("Unsqueeze", f"{path}/Unsqueeze", ["attention_mask", "const.axes12"])
    m = g.op("Cast", f"{path}/Cast", [m], to=TensorProto.FLOAT)
    m = g.op("Sub", f"{path}/Sub", ["const.one", m])
    return g.op("Mul", f"{path}/Mul", [m, "const.fill"])


def _io(outputs: list[tuple[str, list[object]]]) -> tuple[list, list]:
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
              for n in ("input_ids", "attention_mask")]
    return inputs, [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
                    for n, shape in outputs]


def build_gpt_exported(seed: int, layers: int = 4, hidden: int = 256, heads: int = 4,
                       vocab: int = 8192, positions: int = 256) -> onnx.ModelProto:
    """A GPT-2-like decoder as exported: ids reshaped to [-1, seq] before the embedding,
    positions from Range over the run-time length, a causal bias sliced to the length, and
    the word table tied to the output projection (MatMul by its Transpose). Outputs: logits
    [batch, seq, vocab] and the final hidden state."""
    g = ExportBuilder(seed)
    _common_constants(g, hidden, heads)
    seq = g.dim("input_ids", "/transformer", 1)
    ids_shape = g.op("Concat", "/transformer/Concat",
                     [g.const("/transformer/Constant_1_output_0", np.array([-1], np.int64)),
                      seq], axis=0)
    ids = g.op("Reshape", "/transformer/Reshape", ["input_ids", ids_shape])
    wte = g.weight("transformer.wte.weight", (vocab, hidden), 0.02)
    x = g.op("Gather", "/transformer/wte/Gather", [wte, ids], axis=0)
    length = g.op("Squeeze", "/transformer/Squeeze", [seq, "const.axes0"])
    pos = g.op("Range", "/transformer/Range",
               [g.const("/transformer/Constant_2_output_0", np.array(0, np.int64)), length,
                g.const("/transformer/Constant_3_output_0", np.array(1, np.int64))])
    wpe = g.weight("transformer.wpe.weight", (positions, hidden), 0.01)
    x = g.op("Add", "/transformer/Add",
             [x, g.op("Gather", "/transformer/wpe/Gather", [wpe, pos], axis=0)])
    causal = np.triu(np.full((positions, positions), np.finfo(np.float32).min / 2,
                             np.float32), 1)[None, None]
    g.const("transformer.causal_bias", causal)
    ends = g.op("Concat", "/transformer/Concat_1", [seq, seq], axis=0)
    sliced = g.op("Slice", "/transformer/Slice",
                  ["transformer.causal_bias",
                   g.const("/transformer/Constant_4_output_0", np.array([0, 0], np.int64)),
                   ends, g.const("/transformer/Constant_5_output_0",
                                 np.array([2, 3], np.int64))])
    bias = g.op("Add", "/transformer/Add_1", [sliced, _mask_bias(g, "/transformer/mask")])
    for i in range(layers):
        p, prefix = f"/transformer/h.{i}", f"transformer.h.{i}"
        a = g.attention(g.layer_norm(x, f"{p}/ln_1", f"{prefix}.ln_1", hidden), f"{p}/attn",
                        f"{prefix}.attn", hidden, heads, bias)
        x = g.op("Add", f"{p}/Add", [x, a])
        f = g.linear(g.layer_norm(x, f"{p}/ln_2", f"{prefix}.ln_2", hidden), f"{p}/mlp/c_fc",
                     hidden, 4 * hidden, math.sqrt(2.0 / hidden), f"{prefix}.mlp.c_fc.bias")
        f = g.linear(g.gelu(f, f"{p}/mlp/act"), f"{p}/mlp/c_proj", 4 * hidden, hidden,
                     1.0 / math.sqrt(4 * hidden), f"{prefix}.mlp.c_proj.bias")
        x = g.op("Add", f"{p}/Add_1", [x, f])
    hidden_state = g.layer_norm(x, "/transformer/ln_f", "transformer.ln_f", hidden)
    tied = g.op("Transpose", "/lm_head/Transpose", [wte], perm=[1, 0])
    logits = g.op("MatMul", "/lm_head/MatMul", [hidden_state, tied])
    # Graph outputs under their HF names (an Identity each, as the exporter writes them).
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/Identity"))
    g.nodes.append(helper.make_node("Identity", [hidden_state], ["last_hidden_state"],
                                    name="/Identity_1"))
    inputs, outputs = _io([("logits", ["batch", "sequence", vocab]),
                           ("last_hidden_state", ["batch", "sequence", hidden])])
    return g.model("gpt_exported", inputs, outputs)


def build_bert_exported(seed: int, layers: int = 4, hidden: int = 256, heads: int = 4,
                        vocab: int = 30522, positions: int = 512) -> onnx.ModelProto:
    """A BERT encoder as exported (compare `zoo.build_bert_mini`, built by hand): run-time
    reshape targets, positions sliced from a position-id buffer by the run-time length, the
    mask bias broadcast over heads. Outputs: last_hidden_state and pooler_output."""
    g = ExportBuilder(seed)
    _common_constants(g, hidden, heads)
    seq = g.dim("input_ids", "/bert/embeddings", 1)
    words = g.weight("bert.embeddings.word_embeddings.weight", (vocab, hidden), 0.02)
    x = g.op("Gather", "/bert/embeddings/word_embeddings/Gather", [words, "input_ids"], axis=0)
    ids = g.const("bert.embeddings.position_ids", np.arange(positions, dtype=np.int64)[None])
    pos = g.op("Slice", "/bert/embeddings/Slice",
               [ids, g.const("/bert/embeddings/Constant_2_output_0", np.array([0], np.int64)),
                seq, g.const("/bert/embeddings/Constant_3_output_0", np.array([1], np.int64))])
    table = g.weight("bert.embeddings.position_embeddings.weight", (positions, hidden), 0.02)
    x = g.op("Add", "/bert/embeddings/Add",
             [x, g.op("Gather", "/bert/embeddings/position_embeddings/Gather", [table, pos],
                      axis=0)])
    x = g.layer_norm(x, "/bert/embeddings/LayerNorm", "bert.embeddings.LayerNorm", hidden)
    bias = _mask_bias(g, "/bert")
    proj = math.sqrt(2.0 / hidden)
    for i in range(layers):
        p, prefix = f"/bert/encoder/layer.{i}", f"bert.encoder.layer.{i}"
        a = g.attention(x, f"{p}/attention/self", f"{prefix}.attention", hidden, heads, bias)
        x = g.layer_norm(g.op("Add", f"{p}/attention/output/Add", [a, x]),
                         f"{p}/attention/output/LayerNorm",
                         f"{prefix}.attention.output.LayerNorm", hidden)
        f = g.linear(x, f"{p}/intermediate/dense", hidden, 4 * hidden, proj,
                     f"{prefix}.intermediate.dense.bias")
        f = g.linear(g.gelu(f, f"{p}/intermediate/intermediate_act_fn"), f"{p}/output/dense",
                     4 * hidden, hidden, 1.0 / math.sqrt(4 * hidden),
                     f"{prefix}.output.dense.bias")
        x = g.layer_norm(g.op("Add", f"{p}/output/Add", [f, x]), f"{p}/output/LayerNorm",
                         f"{prefix}.output.LayerNorm", hidden)
    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="/Identity"))
    cls = g.op("Gather", "/bert/pooler/Gather",
               [x, g.const("/bert/pooler/Constant_output_0", np.array(0, np.int64))], axis=1)
    pooled = g.linear(cls, "/bert/pooler/dense", hidden, hidden, 1.0 / math.sqrt(hidden),
                      "bert.pooler.dense.bias")
    g.nodes.append(helper.make_node("Tanh", [pooled], ["pooler_output"],
                                    name="/bert/pooler/activation/Tanh"))
    inputs, outputs = _io([("last_hidden_state", ["batch", "sequence", hidden]),
                           ("pooler_output", ["batch", hidden])])
    return g.model("bert_exported", inputs, outputs)


BUILDERS = {"gpt_exported": build_gpt_exported, "bert_exported": build_bert_exported}
DEFAULT_INPUT_SHAPES = {name: {"input_ids": (1, EXPORTED_SEQ),
                               "attention_mask": (1, EXPORTED_SEQ)} for name in BUILDERS}
