"""Cut points: counts and tensors on the zoo models, and the corner cases on small hand-made
graphs the zoo does not have (parallel branches, parallel edges, two inputs, an early graph
output, constant subgraphs, dead nodes). The hand-made graphs are also used by test_split."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from partitioner import cuts, zoo


@pytest.fixture(scope="session")
def zoo_analysis() -> dict[str, cuts.CutAnalysis]:
    """Cut analysis of the small zoo models (built once into the default cache)."""
    return {name: cuts.analyze(zoo.ensure_model(name))
            for name in ("resnet18", "resnet50", "mobilenetv2", "bert_mini")}


# -- hand-made graphs ---------------------------------------------------------------------------
def _model(nodes: list, inputs: list, outputs: list, inits: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "handmade", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _weight(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    return numpy_helper.from_array(
        (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32), name)


def inception_graph() -> onnx.ModelProto:
    """Stem, one inception module (4 parallel branches of different depth, concatenated),
    head. Only the stem/module/head boundaries are single-tensor cuts."""
    rng = np.random.default_rng(1)
    inits, nodes = [], []

    def conv(x: str, name: str, cin: int, cout: int, k: int) -> str:
        inits.append(_weight(rng, f"{name}.w", cout, cin, k, k))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w"], [name], name=name,
                                      pads=[k // 2] * 4))
        relu = f"{name}.relu"
        nodes.append(helper.make_node("Relu", [name], [relu], name=relu))
        return relu

    stem = conv("x", "stem", 4, 16, 3)
    b1 = conv(stem, "b1", 16, 8, 1)
    b2 = conv(conv(stem, "b2a", 16, 8, 1), "b2b", 8, 8, 3)
    nodes.append(helper.make_node("MaxPool", [stem], ["b3.pool"], name="b3.pool",
                                  kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    b3 = conv("b3.pool", "b3", 16, 8, 1)
    b4 = conv(conv(conv(stem, "b4a", 16, 4, 1), "b4b", 4, 8, 3), "b4c", 8, 8, 3)
    nodes.append(helper.make_node("Concat", [b1, b2, b3, b4], ["concat"], name="concat",
                                  axis=1))
    nodes.append(helper.make_node("GlobalAveragePool", ["concat"], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flat"))
    inits.append(_weight(rng, "fc.w", 10, 32))
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w"], ["y"], name="fc", transB=1))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 12, 12])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)


def parallel_edges_graph() -> onnx.ModelProto:
    """A Split whose two outputs both feed one Mul (two parallel edges carrying different
    tensors), and an Add reading one tensor twice (two edges, one tensor)."""
    rng = np.random.default_rng(2)
    inits = [_weight(rng, "w1", 32, 32), _weight(rng, "w2", 8, 16),
             numpy_helper.from_array(np.array([16, 16], np.int64), "halves")]
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
        helper.make_node("Split", ["h", "halves"], ["a", "b"], name="split", axis=1),
        helper.make_node("Mul", ["a", "b"], ["ab"], name="mul"),
        helper.make_node("Add", ["ab", "ab"], ["twice"], name="double"),
        helper.make_node("Gemm", ["twice", "w2"], ["y"], name="fc2", transB=1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)


def two_inputs_graph() -> onnx.ModelProto:
    """Two inputs, the second read only by the last layer; an early graph output that later
    layers also read; a Constant node and a static chain computed from it; a dead node."""
    rng = np.random.default_rng(3)
    inits = [_weight(rng, "w1", 16, 16), _weight(rng, "w2", 16, 16), _weight(rng, "w3", 16, 16)]
    nodes = [
        helper.make_node("Constant", [], ["c"], name="const",
                         value=numpy_helper.from_array(np.full((1, 16), 0.5, np.float32))),
        helper.make_node("Neg", ["c"], ["neg_c"], name="static_neg"),
        helper.make_node("Relu", ["x"], ["early"], name="relu0"),
        helper.make_node("Gemm", ["early", "w1"], ["g1"], name="fc1", transB=1),
        helper.make_node("Relu", ["g1"], ["r1"], name="relu1"),
        helper.make_node("Sigmoid", ["r1"], ["unused"], name="dead"),
        helper.make_node("Mul", ["r1", "neg_c"], ["m1"], name="scale"),
        helper.make_node("Gemm", ["m1", "w2"], ["g2"], name="fc2", transB=1),
        helper.make_node("Add", ["g2", "early"], ["skip"], name="skip"),
        helper.make_node("Gemm", ["skip", "w3"], ["g3"], name="fc3", transB=1),
        helper.make_node("Add", ["g3", "y"], ["z"], name="add_y"),
        helper.make_node("Tanh", ["z"], ["out"], name="tanh"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16]),
                          helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 16]),
                   helper.make_tensor_value_info("early", TensorProto.FLOAT, [1, 16])], inits)


HANDMADE = {"inception": inception_graph, "parallel_edges": parallel_edges_graph,
            "two_inputs": two_inputs_graph}


# -- zoo models ---------------------------------------------------------------------------------
def _after(analysis: cuts.CutAnalysis) -> dict[str, cuts.Cut]:
    return {analysis.order[c.position - 1]: c for c in analysis.cuts}


def test_resnet18_cuts_between_every_basic_block(zoo_analysis):
    a = zoo_analysis["resnet18"]
    after = _after(a)
    assert len(a.cuts) == 21
    assert all(c.kind == "single" and len(c.tensors) == 1 for c in a.cuts)
    blocks = [f"layer{s}.{i}.relu" for s in range(1, 5) for i in range(2)]
    for block in blocks:
        assert block in after, f"no cut after {block}"
    assert after["layer1.0.relu"].nbytes == 64 * 56 * 56 * 4
    assert after["layer4.1.relu"].tensors[0].shape == (1, 512, 7, 7)
    # Inside a block the skip connection bypasses the branch: no cut there.
    assert not any(".conv" in name for name in after)
    assert [c.index for c in a.cuts] == list(range(len(a.cuts)))
    assert [c.position for c in a.cuts] == sorted(c.position for c in a.cuts)


def test_resnet50_and_mobilenetv2_cut_counts(zoo_analysis):
    r50 = _after(zoo_analysis["resnet50"])
    assert len(r50) == 37
    for stage, blocks in enumerate([3, 4, 6, 3], start=1):
        for i in range(blocks):
            assert f"layer{stage}.{i}.relu" in r50
    mob = zoo_analysis["mobilenetv2"]
    assert len(mob.cuts) == 49
    after = _after(mob)
    # A residual inverted block (features.5 has one) is not cut inside; a plain one is.
    assert "features.5.add" in after and "features.5.expand" not in after
    assert "features.4.expand" in after
    assert all(c.kind == "single" for c in mob.cuts)


def test_bert_mini_has_two_tensor_cuts_between_layers(zoo_analysis):
    a = zoo_analysis["bert_mini"]
    after = _after(a)
    for i in range(3):
        cut = after[f"encoder.{i}.ffn.norm"]
        assert cut.kind == "multi"
        assert sorted(cut.names) == sorted(["mask.bias", f"encoder.{i}.ffn.norm"])
        assert cut.nbytes == 128 * 256 * 4 + 128 * 4
    # The mask is read by every layer, so no single tensor separates two layers: single
    # cuts start only after the last layer has used the mask.
    first_single = min(c.position for c in a.cuts if c.kind == "single")
    assert first_single > a.order.index("encoder.3.scores.masked")
    assert after["last_hidden_state"].names == ["last_hidden_state"]
    assert all(len(c.tensors) <= 2 for c in a.cuts)
    # Multi-tensor cuts switched off: only the tail after the last use of the mask remains.
    singles_only = cuts.find_cuts(zoo.zoo_path("bert_mini"), max_tensors=1)
    assert [c.names for c in singles_only] == [c.names for c in a.cuts if c.kind == "single"]


def test_segments_partition_the_nodes(zoo_analysis):
    for name, a in zoo_analysis.items():
        segments = a.segment_nodes()
        assert len(segments) == len(a.cuts) + 1
        assert all(segments), f"{name}: an empty segment"
        flat = [n for seg in segments for n in seg]
        assert sorted(flat) == sorted(set(flat)), f"{name}: a node in two segments"
        assert set(a.order) <= set(flat)
        for k, cut in enumerate(a.cuts):   # the node before each cut ends its segment
            assert a.node_segment[a.order[cut.position - 1]] == k
            assert a.node_segment[a.order[cut.position]] == k + 1


# -- hand-made graphs ---------------------------------------------------------------------------
def test_inception_single_cuts_at_module_boundaries_multi_inside():
    singles = cuts.analyze(inception_graph(), max_tensors=1)
    assert set(_after(singles)) == {"stem", "stem.relu", "concat", "gap", "flat"}
    assert all(c.kind == "single" for c in singles.cuts)
    # The module is most of this small graph, so by default it gets 2-tensor cuts: the
    # first branch is done and the stem output is still live for the others.
    default = cuts.analyze(inception_graph())
    multi = [c for c in default.cuts if c.kind == "multi"]
    assert [c.names for c in default.cuts if c.kind == "single"] == [
        c.names for c in singles.cuts]
    assert multi and all(len(c.tensors) == 2 and "stem.relu" in c.names for c in multi)
    # Up to 4 tensors anywhere: the branches can be cut with the live set of the others
    # (each tensor once, bytes from the shapes).
    wide = cuts.analyze(inception_graph(), max_tensors=4, region_share=0.0)
    assert len(wide.cuts) > len(default.cuts)
    assert max(len(c.tensors) for c in wide.cuts) == 4
    for c in wide.cuts:
        assert c.nbytes == sum(int(np.prod(t.shape)) * 4 for t in c.tensors)


def test_parallel_edges_count_every_tensor_once():
    a = cuts.analyze(parallel_edges_graph())
    after = _after(a)
    split = after["split"]
    assert split.kind == "single"              # one node, but two tensors on two edges
    assert split.names == ["a", "b"]
    assert split.nbytes == 2 * 16 * 4
    assert after["mul"].names == ["ab"]        # read twice by the next node, counted once
    assert after["mul"].nbytes == 16 * 4


def test_two_inputs_early_output_constants_and_dead_nodes():
    a = cuts.analyze(two_inputs_graph(), max_tensors=3, region_share=0.0)
    assert [t.name for t in a.inputs] == ["x", "y"]
    assert [t.name for t in a.outputs] == ["out", "early"]
    assert "dead" not in a.order and "dead" not in a.node_segment
    # Static nodes are not in the order (never cut around) but move with their consumer.
    assert "const" not in a.order and "static_neg" not in a.order
    assert a.node_segment["static_neg"] == a.node_segment["scale"]
    assert a.node_segment["const"] == a.node_segment["scale"]
    for c in a.cuts:
        position = c.position
        if position <= a.order.index("add_y"):
            assert "y" in c.names              # y travels until the node that reads it
        assert "early" in c.names              # a graph output made early travels to the end
    # With the default options: y and early both cross everything before add_y, so only
    # the cuts after it are single-tensor.
    default = cuts.analyze(two_inputs_graph())
    assert all(len(c.tensors) <= 2 for c in default.cuts)


def test_unknown_shapes_and_bad_files_are_refused(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a model")
    with pytest.raises(zoo.InputError):
        cuts.analyze(bad)
    with pytest.raises(zoo.InputError):
        cuts.analyze(tmp_path / "missing.onnx")
