"""A model's inputs as a user states them: shapes for symbolic dimensions, the range of token
ids, and seeded feeds for one real run.

Division of labour: this module only reads a model's declared inputs and the user's shapes
(`--input-shape NAME=1x128`, scenario `model.input_shapes`); `partitioner.cuts` runs the model
once on these feeds to measure what crosses each cut, `partitioner.profile` times it, the
dispatcher draws its requests with the same vocabulary rule (`vocab_sizes`).

Rules. A fixed dimension is what the file says (a stated shape must agree with it). A symbolic
or unknown dimension takes the stated value; the first (batch) dimension defaults to 1 and
the caller says so (`ResolvedShapes.notes`); any other symbolic dimension without a value is
an error naming the input and the dimension: guessing 1 would price a 128-token model as a
1-token one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from formats.errors import InputError

# Ops an index tensor can pass through on its way to an embedding Gather without its values
# changing range (exporters reshape ids to [-1, seq], cast int32 <-> int64, add axes).
INDEX_PASSTHROUGH = ("Reshape", "Cast", "Unsqueeze", "Squeeze", "Flatten", "Identity")


@dataclass(frozen=True)
class ModelInput:
    name: str
    dtype: str                                  # numpy dtype name
    shape: tuple[int | str, ...]                # ints, dim_param names, or "?" (unknown)


@dataclass
class ResolvedShapes:
    shapes: dict[str, tuple[int, ...]]
    dims: dict[str, int] = field(default_factory=dict)       # symbolic dim name -> value
    notes: list[str] = field(default_factory=list)            # defaults the user should see


def model_inputs(model: onnx.ModelProto) -> list[ModelInput]:
    """The graph inputs a caller feeds (initializers listed as inputs excluded)."""
    initializers = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        ttype = vi.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type)).name
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                      for d in ttype.shape.dim)
        out.append(ModelInput(vi.name, dtype, shape))
    return out


def parse_shape_arg(text: str) -> tuple[str, tuple[int, ...]]:
    """`NAME=1x128` (the --input-shape syntax) -> ("NAME", (1, 128))."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d < 1 for d in shape):
        raise InputError(f"expected NAME=DxDx... with positive sizes (e.g. input_ids=1x128), "
                         f"got {text!r}", field="--input-shape")
    return name, shape


def parse_shape_args(texts: list[str] | None) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for text in texts or []:
        name, shape = parse_shape_arg(text)
        if name in shapes:
            raise InputError(f"input {name!r} given twice", field="--input-shape")
        shapes[name] = shape
    return shapes


def resolve_shapes(model: onnx.ModelProto,
                   given: dict[str, tuple[int, ...]] | None = None,
                   field_name: str = "--input-shape") -> ResolvedShapes:
    """Concrete shapes of every model input (see the module docstring for the rules)."""
    given = dict(given or {})
    inputs = model_inputs(model)
    unknown = sorted(set(given) - {i.name for i in inputs})
    if unknown:
        raise InputError(f"the model has no input {unknown[0]!r} (inputs: "
                         f"{', '.join(i.name for i in inputs)})", field=field_name)
    resolved = ResolvedShapes({})
    for spec in inputs:                       # dims named by stated inputs hold everywhere
        stated = given.get(spec.name)
        if stated is not None and len(stated) == len(spec.shape):
            for dim, value in zip(spec.shape, stated):
                if isinstance(dim, str) and dim != "?":
                    resolved.dims.setdefault(dim, value)
    for spec in inputs:
        stated = given.get(spec.name)
        if stated is not None and len(stated) != len(spec.shape):
            raise InputError(f"input {spec.name!r} has {len(spec.shape)} dimensions "
                             f"{_show(spec.shape)}, {len(stated)} given", field=field_name)
        shape = []
        for axis, dim in enumerate(spec.shape):
            if stated is not None:
                if isinstance(dim, int) and dim > 0 and stated[axis] != dim:
                    raise InputError(f"input {spec.name!r} dimension {axis} is fixed at {dim} "
                                     f"in the model, {stated[axis]} given", field=field_name)
                value = stated[axis]
            elif isinstance(dim, int) and dim > 0:
                value = dim
            elif str(dim) in resolved.dims:          # named by a stated input
                value = resolved.dims[str(dim)]
            elif axis == 0:
                value = 1
                resolved.notes.append(f"input {spec.name}: batch dimension {dim!r} set to 1 "
                                      f"(state it with {field_name} {spec.name}=...)")
            else:
                raise InputError(f"input {spec.name!r} dimension {axis} ({dim!r}) is symbolic "
                                 f"and has no value: give the shape, e.g. {field_name} "
                                 f"{spec.name}={_example(spec.shape)}", field=field_name)
            if isinstance(dim, str) and dim != "?":
                if resolved.dims.setdefault(dim, value) != value:
                    raise InputError(f"dimension {dim!r} is {resolved.dims[dim]} in one input "
                                     f"and {value} in {spec.name!r}", field=field_name)
            shape.append(value)
        resolved.shapes[spec.name] = tuple(shape)
    return resolved


def _show(shape: tuple[int | str, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _example(shape: tuple[int | str, ...]) -> str:
    return "x".join(str(d) if isinstance(d, int) and d > 0 else ("1" if i == 0 else "128")
                    for i, d in enumerate(shape))


def with_input_shapes(model: onnx.ModelProto,
                      shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of `model` whose graph inputs have the given concrete shapes (what shape
    inference and the one measuring run then work from)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        if vi.name not in shapes:
            continue
        dims = vi.type.tensor_type.shape.dim
        for dim, value in zip(dims, shapes[vi.name]):
            dim.Clear()
            dim.dim_value = value
    return out


def vocab_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Range of every integer input used as Gather indices into an initializer (an embedding
    table), found through the ops that keep index values (`INDEX_PASSTHROUGH`): token ids
    must stay below the table's size along the gathered axis."""
    graph = model.graph
    tables = {t.name: list(t.dims) for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    sizes: dict[str, int] = {}
    for spec in model_inputs(model):
        frontier, seen = [spec.name], {spec.name}
        while frontier:
            tensor = frontier.pop()
            for node in consumers.get(tensor, []):
                if (node.op_type == "Gather" and len(node.input) == 2
                        and node.input[1] == tensor and tables.get(node.input[0])):
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    dims = tables[node.input[0]]
                    size = dims[axis % len(dims)]
                    sizes[spec.name] = min(sizes.get(spec.name, size), size)
                elif node.op_type in INDEX_PASSTHROUGH and node.input[0] == tensor:
                    for out in node.output:
                        if out and out not in seen:
                            seen.add(out)
                            frontier.append(out)
    return sizes


def make_feeds(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
               seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs of the given shapes: normal floats; masks attending to a prefix; token
    ids below the embedding's vocabulary (`vocab_sizes`); other integers 0 or 1."""
    rng = np.random.default_rng(seed)
    vocab = vocab_sizes(model)
    feeds = {}
    for spec in model_inputs(model):
        shape = shapes[spec.name]
        dtype = np.dtype(spec.dtype)
        lower = spec.name.lower()
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = np.ones(shape, dtype)
        elif "mask" in lower:
            mask = np.ones(shape, dtype)
            if mask.ndim and shape[-1] > 1:       # attend to a prefix: masking is exercised
                mask[..., shape[-1] * 3 // 4:] = 0
            feeds[spec.name] = mask
        else:
            feeds[spec.name] = rng.integers(0, vocab.get(spec.name, 2), shape).astype(dtype)
    return feeds
