"""Valid cut points of an ONNX graph, in order, and the tensors (with bytes) crossing each.

Division of labour: this module only analyses the graph (which cuts exist, what crosses
them, which node belongs to which segment). `partitioner.split` cuts stages at chosen cuts,
`partitioner.profile` puts costs on the segments between cuts.

The model is seen as a DAG of its *dynamic* nodes (nodes that depend on a graph input),
between a virtual source producing the graph inputs and a virtual sink consuming the graph
outputs. Nodes fed only by initializers and constants are *static*: they move with their
first consumer (the stage extractor copies them into every stage that needs them).

A cut is a prefix of one fixed topological order (the file's own node order): everything
before it runs in earlier stages, everything after in later ones. The tensors crossing it are
the tensors produced before it (or graph inputs) that are consumed after it or are graph
outputs, each counted once however many edges carry it: tensors are kept as sets per edge,
so two parallel edges between the same nodes (two outputs of one node into another) count as
two tensors and one tensor read twice counts once.

- Single-tensor cuts are the immediate dominators of the sink: the prefix ending at node v is
  a cut carrying only v's outputs exactly when every path from input to output passes v. Such
  a prefix is the same in every topological order, so these cuts do not depend on the order.
- Multi-tensor cuts (at most `max_tensors` tensors, default 2) are added only where they are
  needed: inside a region between consecutive single-tensor cuts that holds more than
  `region_share` of the graph's nodes. A transformer encoder is one such region (the
  attention-mask bias is live across every layer, so no single tensor separates two layers);
  a residual block is not (its skip connection would be carried for little gain).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from formats.errors import InputError
from formats.onnxfile import load_model

DEFAULT_MAX_TENSORS = 2
DEFAULT_REGION_SHARE = 0.25


@dataclass(frozen=True)
class TensorInfo:
    """A tensor crossing a cut. `shape` and `nbytes` are measured (a real run at the declared
    input shapes) or, for a fully static shape, computed; -1 bytes: not known (a symbolic
    dimension and no measurement), never counted as 1."""

    name: str
    dtype: str                      # numpy dtype name: float32, int64, ...
    shape: tuple[int | str, ...]
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "bytes": self.nbytes}


@dataclass(frozen=True)
class Cut:
    """Cut `index` lies after the first `position` nodes of `CutAnalysis.order`; segment
    `index` ends at it and segment `index + 1` starts at it."""

    index: int
    position: int
    tensors: tuple[TensorInfo, ...]
    kind: str                       # "single" (a dominator) or "multi"

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "bytes": self.nbytes,
                "tensors": [t.to_json() for t in self.tensors]}


@dataclass
class CutAnalysis:
    """Everything found about one graph: the node order, the cuts and the segments."""

    order: list[str]                        # dynamic node names, topological
    cuts: list[Cut]
    inputs: tuple[TensorInfo, ...]          # what the first segment receives
    outputs: tuple[TensorInfo, ...]         # the graph outputs
    node_segment: dict[str, int] = field(default_factory=dict)   # every live node -> segment
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def segment_count(self) -> int:
        return len(self.cuts) + 1

    def boundary(self, k: int) -> tuple[TensorInfo, ...]:
        """Tensors entering segment k (k = 0: the graph inputs) or, with k = number of
        segments, leaving the last one (the graph outputs)."""
        if k == 0:
            return self.inputs
        if k == self.segment_count:
            return self.outputs
        return self.cuts[k - 1].tensors

    def segment_nodes(self) -> list[list[str]]:
        """Node names of each segment: its dynamic nodes in order, each static node (a
        constant computation) in the segment of its first consumer."""
        out: list[list[str]] = [[] for _ in range(self.segment_count)]
        for name, seg in self.node_segment.items():
            out[seg].append(name)
        return out


def load(model: onnx.ModelProto | str | os.PathLike[str]) -> onnx.ModelProto:
    """A model object as is, a file through the input boundary (formats.onnxfile)."""
    if isinstance(model, onnx.ModelProto):
        return model
    return load_model(model)


def _light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without the data of its large initializers: shape inference needs their
    dims only (small ones, such as Reshape targets, keep their values), and serialising
    hundreds of MB of weights in and out of the inference library is what makes it slow."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    for init in model.graph.initializer:
        if init.HasField("data_location") and init.data_location == onnx.TensorProto.EXTERNAL:
            graph.initializer.append(init)
        elif int(np.prod(init.dims, dtype=np.int64)) > 1024:   # (raw_data would copy)
            graph.initializer.append(onnx.TensorProto(name=init.name, dims=init.dims,
                                                      data_type=init.data_type))
        else:
            graph.initializer.append(init)
    return light


def _inferred_light(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(_light_copy(model), data_prop=True)
    except Exception as exc:   # the inference library raises several unrelated types
        raise InputError(f"ONNX shape inference failed: {exc}") from exc


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape-inferred copy of a model, weights included (data propagation on, so Reshape
    targets resolve)."""
    inferred = _inferred_light(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.ClearField("value_info")
    out.graph.value_info.extend(inferred.graph.value_info)
    return out


def _has_shapes(model: onnx.ModelProto) -> bool:
    known = {v.name for v in [*model.graph.value_info, *model.graph.output]}
    return all(o in known for n in model.graph.node for o in n.output if o) or not model.graph.node


def _tensor_infos(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    graph = model.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        ttype = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or ttype.elem_type == 0:
            continue
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        shape: tuple[int | str, ...] = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in ttype.shape.dim)
        known = all(isinstance(d, int) and d > 0 for d in shape) or shape == ()
        count = int(np.prod(shape, dtype=np.int64)) if known else -1
        infos[vi.name] = TensorInfo(vi.name, dtype.name, shape,
                                    count * dtype.itemsize if known else -1)
    return infos


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names read by a control-flow node's subgraphs (If/Loop/Scan)."""
    used: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            defined = {i.name for i in g.input} | {i.name for i in g.initializer}
            for inner in g.node:
                defined.update(inner.output)
            for inner in g.node:
                used.update(n for n in [*inner.input, *_subgraph_inputs(inner)]
                            if n and n not in defined)
            used.update(o.name for o in g.output if o.name not in defined)
    return used


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads, including implicit outer-scope inputs of subgraphs."""
    names = [n for n in node.input if n]
    return names + sorted(_subgraph_inputs(node) - set(names))


def analyze(model: onnx.ModelProto | str | os.PathLike[str],
            max_tensors: int = DEFAULT_MAX_TENSORS,
            region_share: float = DEFAULT_REGION_SHARE,
            measured: dict[str, TensorInfo] | None = None,
            require_sizes: bool = True) -> CutAnalysis:
    """Find the cuts of a model (a ModelProto, shape-inferred or not, or a path). `measured`
    (from `measure_tensors`) overrides what shape inference says about a tensor; a tensor that
    crosses a cut must have a known size, from one or the other, unless `require_sizes` is
    off (cutting stages needs where the cuts are, not what they carry)."""
    model = load(model)
    infos = _tensor_infos(model if _has_shapes(model) else _inferred_light(model))
    infos.update(measured or {})
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    graph_inputs = [i.name for i in graph.input if i.name not in initializers]
    graph_outputs = [o.name for o in graph.output]
    if not graph_outputs:
        raise InputError("the model has no outputs")

    # Static tensors: initializers and whatever is computed from them alone.
    static = set(initializers)
    nodes = list(graph.node)
    reads = [node_inputs(n) for n in nodes]
    for node, inputs in zip(nodes, reads):
        if all(i in static for i in inputs):
            static.update(o for o in node.output if o)

    # Live nodes: those an output depends on (the rest would be dropped by any extractor).
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    live: set[int] = set()
    stack = [producer[o] for o in graph_outputs if o in producer]
    while stack:
        i = stack.pop()
        if i not in live:
            live.add(i)
            stack.extend(producer[t] for t in reads[i] if t in producer)

    order_idx = [i for i in range(len(nodes)) if i in live
                 and not all(o in static for o in nodes[i].output if o)]
    position = {i: p for p, i in enumerate(order_idx)}
    n = len(order_idx)
    if n == 0:
        raise InputError("the model has no computation that depends on its inputs")

    # Dynamic tensors: where each is produced (-1: graph input) and last read (n: output).
    produced: dict[str, tuple[int, int]] = {}          # name -> (position, output slot)
    for slot, name in enumerate(graph_inputs):
        produced[name] = (-1, slot)
    for p, i in enumerate(order_idx):
        for slot, name in enumerate(nodes[i].output):
            if name:
                produced[name] = (p, slot)
    last_use = {name: -1 for name in produced}
    for p, i in enumerate(order_idx):
        for name in reads[i]:
            if name in produced:
                last_use[name] = max(last_use[name], p)
    for name in graph_outputs:
        if name in produced:
            last_use[name] = n

    missing = [t for t in produced if last_use[t] >= 0 and t not in infos]
    if missing:
        raise InputError(f"no type/shape known for tensor {missing[0]!r}; "
                         "the partitioner needs a shape-inferable model")

    # Sweep the order once: live set after each prefix.
    born: list[list[str]] = [[] for _ in range(n)]
    for name, (p, _) in produced.items():
        if p >= 0 and last_use[name] > p:
            born[p].append(name)
    alive = {t for t in graph_inputs if last_use[t] >= 0}
    crossing: list[list[str]] = []               # crossing[p-1] = tensors at the cut after p
    for p in range(n - 1):
        alive.update(born[p])
        alive = {t for t in alive if last_use[t] > p}
        crossing.append(sorted(alive, key=lambda t: produced[t]))

    singles = [p for p in range(1, n)
               if all(produced[t][0] == p - 1 for t in crossing[p - 1])]
    positions = set(singles)
    if max_tensors >= 2:
        bounds = [0, *singles, n]
        for start, end in zip(bounds, bounds[1:]):
            if end - start <= region_share * n:
                continue
            positions.update(p for p in range(start + 1, end)
                             if len(crossing[p - 1]) <= max_tensors)
    needed = {t for p in positions for t in crossing[p - 1]}
    needed.update(t for t in graph_inputs if last_use[t] >= 0)
    needed.update(graph_outputs)
    unsized = sorted(t for t in needed if infos[t].nbytes < 0)
    if unsized and require_sizes:
        raise InputError(f"tensor {unsized[0]!r} has shape {list(infos[unsized[0]].shape)}: "
                         "its size is only known from a run at stated input shapes "
                         "(partitioner.cuts.prepare_model)")
    single_set = set(singles)
    cuts = [Cut(k, p, tuple(infos[t] for t in crossing[p - 1]),
                "single" if p in single_set else "multi")
            for k, p in enumerate(sorted(positions))]

    # Segment of every live node: dynamic nodes by position, static ones with their first
    # dynamic consumer (walking through static consumers).
    starts = [c.position for c in cuts]
    segment_of_position = np.searchsorted(np.array(starts, dtype=np.int64),
                                          np.arange(n), side="right")
    node_segment: dict[str, int] = {}
    consumers: dict[str, list[int]] = {}
    for i, inputs in enumerate(reads):
        for t in inputs:
            consumers.setdefault(t, []).append(i)

    def segment_of(i: int, seen: set[int]) -> int:
        if i in position:
            return int(segment_of_position[position[i]])
        seen.add(i)
        found = [segment_of(j, seen) for o in nodes[i].output if o
                 for j in consumers.get(o, []) if j in live and j not in seen]
        return min(found) if found else len(cuts)

    for i in sorted(live):
        node_segment[_node_name(nodes[i], i)] = segment_of(i, set())
    return CutAnalysis(
        order=[_node_name(nodes[i], i) for i in order_idx],
        cuts=cuts,
        inputs=tuple(infos[t] for t in graph_inputs if last_use[t] >= 0),
        outputs=tuple(infos[t] for t in graph_outputs),
        node_segment=node_segment,
        tensors=infos,
    )


def measure_tensors(model: onnx.ModelProto,
                    feeds: dict[str, np.ndarray]) -> dict[str, TensorInfo]:
    """Run the model once with onnxruntime (no graph optimisation, every node output made a
    graph output) and return every tensor's real dtype, shape and bytes: what a cut will
    carry at these input shapes, whatever shape inference could or could not resolve."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in outputs:
                outputs.add(name)
                probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, feeds)
    except Exception as exc:    # onnxruntime raises its own unrelated types
        raise InputError(f"onnxruntime could not run the model at input shapes "
                         f"{ {k: list(v.shape) for k, v in feeds.items()} }: {exc}") from exc
    out = {name: TensorInfo(name, value.dtype.name, tuple(value.shape), int(value.nbytes))
           for name, value in zip(names, values) if isinstance(value, np.ndarray)}
    out.update({name: TensorInfo(name, value.dtype.name, tuple(value.shape),
                                 int(value.nbytes)) for name, value in feeds.items()})
    return out


@dataclass
class PreparedModel:
    """A model at stated input shapes: inputs fixed, shapes inferred, sizes measured."""

    model: onnx.ModelProto                  # weights included, inputs fixed, shape-inferred
    analysis: CutAnalysis
    feeds: dict[str, np.ndarray]            # what the measuring run used (seeded)
    shapes: dict[str, tuple[int, ...]]
    notes: list[str]                        # defaults taken (batch 1) for the user to see


def prepare_model(model: onnx.ModelProto | str | os.PathLike[str],
                  input_shapes: dict[str, tuple[int, ...]] | None = None,
                  max_tensors: int = DEFAULT_MAX_TENSORS,
                  region_share: float = DEFAULT_REGION_SHARE,
                  field_name: str = "--input-shape") -> PreparedModel:
    """Load a model, fix its inputs at the stated shapes (`partitioner.inputs`), infer
    shapes, run it once to measure every tensor, and find the cuts with real sizes."""
    from partitioner import inputs as inputlib

    original = load(model)
    resolved = inputlib.resolve_shapes(original, input_shapes, field_name)
    fixed = infer_shapes(inputlib.with_input_shapes(original, resolved.shapes))
    feeds = inputlib.make_feeds(fixed, resolved.shapes)
    measured = measure_tensors(fixed, feeds)
    analysis = analyze(fixed, max_tensors, region_share, measured=measured)
    return PreparedModel(fixed, analysis, feeds, resolved.shapes, resolved.notes)


def _node_name(node: onnx.NodeProto, index: int) -> str:
    # Unnamed nodes get the name onnxruntime would not know either; keep them distinct.
    return node.name or f"<node {index}: {node.op_type}>"


def find_cuts(model: onnx.ModelProto | str | Path, max_tensors: int = DEFAULT_MAX_TENSORS,
              region_share: float = DEFAULT_REGION_SHARE) -> list[Cut]:
    """The valid cut points of a model, in order (see the module docstring)."""
    return analyze(model, max_tensors, region_share).cuts


def segment_nodes(model: onnx.ModelProto | str | Path, **options: Any) -> list[list[str]]:
    """Node names of each segment between consecutive cuts."""
    return analyze(model, **options).segment_nodes()


def total_bytes(tensors: Iterable[TensorInfo]) -> int:
    return sum(t.nbytes for t in tensors)
