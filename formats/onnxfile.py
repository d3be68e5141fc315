"""The input boundary for ONNX model files: `load_model(path)` returns a ModelProto that
onnxruntime and the partitioner can take without crashing, or raises InputError naming the
file (and the tensor or node at fault).

Division of labour: this module only decides whether a file is a usable model; cutting it is
partitioner.cuts', profiling partitioner.profile's. Checks, in order, each a refusal the user
can act on:
- the file is readable, not empty, at most formats.limits.MAX_MODEL_FILE_BYTES;
- it parses as an ONNX protobuf;
- external data stays beside the model: a relative location inside the model's folder (an
  absolute path or `../` would make us read any file the driver, running as root, can read);
- onnx's checker passes (a cycle, a node input nothing produces, an unknown operator);
- no declared tensor (graph input, output, value_info, initializer) is larger than
  formats.limits.MAX_TENSOR_BYTES (a dimension of 1e12 made numpy try to allocate 7 TiB).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from formats.errors import InputError
from formats.limits import MAX_MODEL_FILE_BYTES, MAX_TENSOR_BYTES

# Bytes per element of the ONNX element types (strings and unknowns count as 1: the check is
# about absurd shapes, not exact sizes).
_ITEM_BYTES = {onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.INT64: 8,
               onnx.TensorProto.UINT64: 8, onnx.TensorProto.COMPLEX64: 8,
               onnx.TensorProto.COMPLEX128: 16, onnx.TensorProto.FLOAT: 4,
               onnx.TensorProto.INT32: 4, onnx.TensorProto.UINT32: 4,
               onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
               onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2}


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """A checked model with its external data loaded (module docstring); InputError if not."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", file=path) from exc
    if size == 0:
        raise InputError("the model file is empty", file=path)
    if size > MAX_MODEL_FILE_BYTES:
        raise InputError(f"the model file has {size} bytes, more than an ONNX protobuf can "
                         f"({MAX_MODEL_FILE_BYTES})", file=path)
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", file=path) from exc
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InputError(f"not an ONNX model: {exc}", file=path) from exc
    if not model.graph.output:
        raise InputError("not an ONNX model: the graph has no outputs", file=path)
    _check_external_data(model, path)
    try:
        external_data_helper.load_external_data_for_model(model, os.fspath(path.parent))
    except OSError as exc:
        raise InputError(f"cannot read the model's external data: {exc.strerror or exc}",
                         file=path) from exc
    try:
        # By path: the checker reads the file in C++, twice as fast as handing it the loaded
        # model (which it would serialise again: 6 s for vgg16's 553 MB).
        onnx.checker.check_model(os.fspath(path))
    except (onnx.checker.ValidationError, ValueError) as exc:
        said = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise InputError(f"not a valid ONNX model: {said}", file=path) from exc
    _check_sizes(model, path)
    return model


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    folder = path.parent.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        field = f"initializer {tensor.name}"
        if not location:
            raise InputError("external data without a location", file=path, field=field)
        if os.path.isabs(location):
            raise InputError(f"external data at an absolute path ({location}); it must be a "
                             "file beside the model", file=path, field=field)
        target = (folder / location).resolve()
        if not target.is_relative_to(folder):
            raise InputError(f"external data {location!r} is outside the model's folder "
                             f"{folder}", file=path, field=field)
        if not target.is_file():
            raise InputError(f"external data file {location!r} does not exist", file=path,
                             field=field)


def _declared(model: onnx.ModelProto) -> Iterable[tuple[str, int, list[int]]]:
    """(name, element type, known dims) of every tensor the file declares a shape for."""
    graph = model.graph
    for info in [*graph.input, *graph.output, *graph.value_info]:
        kind = info.type.tensor_type
        if info.type.HasField("tensor_type") and kind.HasField("shape"):
            yield info.name, kind.elem_type, [d.dim_value for d in kind.shape.dim
                                              if d.HasField("dim_value")]
    for tensor in graph.initializer:
        yield tensor.name, tensor.data_type, list(tensor.dims)


def _check_sizes(model: onnx.ModelProto, path: Path) -> None:
    for name, elem_type, dims in _declared(model):
        if any(d < 0 for d in dims):
            raise InputError(f"negative dimension {dims}", file=path, field=f"tensor {name}")
        nbytes = math.prod(dims) * _ITEM_BYTES.get(elem_type, 1)
        if nbytes > MAX_TENSOR_BYTES:
            raise InputError(f"declares shape {dims} ({nbytes:.3g} bytes), more than the "
                             f"{MAX_TENSOR_BYTES // 1024**3} GiB a tensor may have",
                             file=path, field=f"tensor {name}")
