"""Stage extraction: cut a model at chosen cut points into `stage_NN.onnx` + `stages.json`.

Division of labour: `partitioner.cuts` says where a model may be cut and what crosses each
cut; this module writes the stages and checks them (chaining the stages with onnxruntime must
reproduce the full model). Deploying and running stages is the controller's and worker's job.

Contract (docs/architecture.md): stage i receives exactly `inputs` and sends exactly
`outputs`, tensor names as in the original model. An output that is also an input is passed
through by the worker unchanged (the attention mask of a transformer, a graph output made
early); the stage ONNX file computes only the other outputs. Every stage input is an input of
the stage file, even one it only passes through, so a worker can feed the file everything it
received. Stages are cut with `onnx.utils.Extractor` from the shape-inferred model, which
copies into each stage the initializers and constant nodes it reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.utils

from formats.errors import InputError, read_json
from partitioner import cuts as cutlib

STAGES_FILE = "stages.json"


@dataclass(frozen=True)
class StageSpec:
    file: str                   # relative to the stage directory
    inputs: list[str]
    outputs: list[str]

    @property
    def passthrough(self) -> list[str]:
        return [name for name in self.outputs if name in self.inputs]

    @property
    def computed(self) -> list[str]:
        return [name for name in self.outputs if name not in self.inputs]

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "inputs": list(self.inputs), "outputs": list(self.outputs)}


def _check_indices(analysis: cutlib.CutAnalysis, cut_indices: list[int]) -> list[int]:
    indices = sorted(set(int(i) for i in cut_indices))
    bad = [i for i in indices if not 0 <= i < len(analysis.cuts)]
    if bad:
        raise InputError(f"cut index {bad[0]} out of range: the model has "
                         f"{len(analysis.cuts)} cuts (0..{len(analysis.cuts) - 1})",
                         field="cuts")
    return indices


def stage_boundaries(analysis: cutlib.CutAnalysis,
                     cut_indices: list[int]) -> list[tuple[list[str], list[str]]]:
    """(inputs, outputs) of each stage when cutting at `cut_indices` (sorted, unique)."""
    indices = _check_indices(analysis, cut_indices)
    segments = [0, *[i + 1 for i in indices], analysis.segment_count]
    return [([t.name for t in analysis.boundary(a)], [t.name for t in analysis.boundary(b)])
            for a, b in zip(segments, segments[1:])]


def extract_stages(model: onnx.ModelProto, cut_indices: list[int],
                   analysis: cutlib.CutAnalysis | None = None,
                   ) -> list[tuple[onnx.ModelProto, StageSpec]]:
    """Stage models and specs, in memory. `model` should be shape-inferred already (the
    extractor takes the stage inputs' and outputs' types from its value_info)."""
    if analysis is None:
        analysis = cutlib.analyze(model)
    extractor = onnx.utils.Extractor(model)
    stages = []
    for k, (inputs, outputs) in enumerate(stage_boundaries(analysis, cut_indices)):
        spec = StageSpec(f"stage_{k:02d}.onnx", inputs, outputs)
        stage = extractor.extract_model(inputs, spec.computed)
        stage.graph.name = f"{model.graph.name or 'model'} stage {k}"
        stages.append((stage, spec))
    return stages


def prepare(model_path: str | os.PathLike[str],
            **options: Any) -> tuple[onnx.ModelProto, cutlib.CutAnalysis]:
    """Load + shape-infer a model once and analyse its cuts (shared by split and checks).
    Symbolic axes stay symbolic: stage files run at any length the model runs at, and where
    the cuts lie does not depend on what they carry."""
    model = cutlib.infer_shapes(cutlib.load(model_path))
    return model, cutlib.analyze(model, require_sizes=False, **options)


def write_stages(stages: list[tuple[onnx.ModelProto, StageSpec]],
                 out_dir: str | os.PathLike[str]) -> list[StageSpec]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("stage_*.onnx"):     # a previous split with more stages
        old.unlink()
    for stage, spec in stages:
        onnx.save(stage, out / spec.file)
    specs = [spec for _, spec in stages]
    (out / STAGES_FILE).write_text(json.dumps([s.to_json() for s in specs], indent=2) + "\n")
    return specs


def split_model(model_path: str | os.PathLike[str], cut_indices: list[int],
                out_dir: str | os.PathLike[str], **options: Any) -> list[StageSpec]:
    """Cut `model_path` at `cut_indices` (indices into `find_cuts`) and write the stages."""
    model, analysis = prepare(model_path, **options)
    return write_stages(extract_stages(model, cut_indices, analysis), out_dir)


def load_stages(stage_dir: str | os.PathLike[str]) -> list[StageSpec]:
    path = Path(stage_dir) / STAGES_FILE
    data = read_json(path)
    if not isinstance(data, list):
        raise InputError("expected a list of stages", file=path)
    return [StageSpec(str(s["file"]), list(s["inputs"]), list(s["outputs"])) for s in data]


def cut_indices_from_plan(plan: dict[str, Any], analysis: cutlib.CutAnalysis,
                          model_sha256: str | None = None,
                          file: str = "<plan>") -> list[int]:
    """Cut where the stages of a plan end. A plan written by `plan` records the model hash
    and the tensors of each cut it uses; both are checked, so a plan made for another model
    (or with other cut options) is refused instead of silently cutting elsewhere. A plan of
    pipelines side by side (`chains`) is cut like its first pipeline."""
    stages = plan.get("stages")
    if not isinstance(stages, list) or not stages:
        raise InputError("the plan has no stages", file=file, field="stages")
    chains = plan.get("chains")
    if chains:
        if not isinstance(chains, list) or not all(isinstance(c, int) and c > 0
                                                   for c in chains):
            raise InputError("chains must list each pipeline's stage count", file=file,
                             field="chains")
        stages = stages[:chains[0]]
    if model_sha256 and plan.get("model_sha256") not in (None, model_sha256):
        raise InputError("the plan was made for another model (SHA-256 differs)",
                         file=file, field="model_sha256")
    try:
        ends = [int(s["segments"][1]) for s in stages]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise InputError("each stage needs segments [first, end)", file=file,
                         field="stages") from exc
    if ends[-1] != analysis.segment_count:
        raise InputError(f"the plan covers {ends[-1]} segments, the model has "
                         f"{analysis.segment_count}", file=file, field="stages")
    indices = [end - 1 for end in ends[:-1]]
    _check_indices(analysis, indices)
    recorded = plan.get("cuts")
    if recorded is not None:
        actual = [analysis.cuts[i].names for i in indices]
        if [list(c) for c in recorded] != actual:
            raise InputError(f"the plan's cut tensors {recorded} are not this model's "
                             f"cuts {actual}", file=file, field="cuts")
    return indices


# -- checking: run the chain and compare with the full model ---------------------------------
def _session(model: onnx.ModelProto | str | os.PathLike[str]) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def random_feeds(analysis: cutlib.CutAnalysis, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for a model: normal floats; ids below 1000 for integer inputs whose name
    says ids or indices, ones for masks, small non-negative integers otherwise."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in analysis.inputs:
        shape = tuple(d if isinstance(d, int) else 1 for d in t.shape)
        dtype = np.dtype(t.dtype)
        if dtype.kind == "f":
            feeds[t.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[t.name] = np.ones(shape, dtype)
        elif "mask" in t.name:
            # A realistic mask: attend to a prefix, pad the rest, so masking is exercised.
            mask = np.ones(shape, dtype)
            if mask.ndim and shape[-1] > 1:
                mask[..., shape[-1] * 3 // 4:] = 0
            feeds[t.name] = mask
        else:
            feeds[t.name] = rng.integers(0, 1000, shape).astype(dtype)
    return feeds


def run_chain(stages: list[tuple[onnx.ModelProto | str | os.PathLike[str], StageSpec]],
              feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run stages one after the other the way the workers do: each stage gets exactly its
    inputs and hands on exactly its outputs (pass-throughs forwarded unchanged)."""
    carried = dict(feeds)
    for k, (model, spec) in enumerate(stages):
        missing = [n for n in spec.inputs if n not in carried]
        if missing:
            raise AssertionError(f"stage {k} needs {missing}, the previous stage did not send it")
        received = {n: carried[n] for n in spec.inputs}
        session = _session(model)
        names = [o.name for o in session.get_outputs()]
        if sorted(names) != sorted(spec.computed):
            raise AssertionError(f"stage {k} file computes {names}, spec says {spec.computed}")
        results = dict(zip(names, session.run(names, received)))
        carried = {n: results[n] if n in results else received[n] for n in spec.outputs}
    return carried


def run_full(model: onnx.ModelProto | str | os.PathLike[str],
             feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def max_difference(full: dict[str, np.ndarray], chained: dict[str, np.ndarray]) -> float:
    """Largest absolute difference, relative to the output's scale when that exceeds 1."""
    if sorted(full) != sorted(chained):
        raise AssertionError(f"chained outputs {sorted(chained)} != model outputs {sorted(full)}")
    worst = 0.0
    for name, ref in full.items():
        got = chained[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise AssertionError(f"{name}: {got.dtype}{got.shape} != {ref.dtype}{ref.shape}")
        if ref.size == 0:
            continue
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        scale = max(1.0, float(np.max(np.abs(ref))))
        worst = max(worst, float(np.max(diff)) / scale)
    return worst


def check_split(model_path: str | os.PathLike[str], stage_dir: str | os.PathLike[str],
                seed: int = 0, input_shapes: dict[str, tuple[int, ...]] | None = None,
                ) -> float:
    """Chain the stages written in `stage_dir` against the full model on seeded inputs at
    `input_shapes` (`partitioner.inputs` rules); returns the largest (scaled) difference.
    Raises AssertionError when the stages break the contract."""
    from partitioner import inputs as inputlib

    model = cutlib.load(model_path)
    shapes = inputlib.resolve_shapes(model, input_shapes).shapes
    feeds = inputlib.make_feeds(model, shapes, seed)
    specs = load_stages(stage_dir)
    chained = run_chain([(Path(stage_dir) / s.file, s) for s in specs], feeds)
    return max_difference(run_full(model, feeds), chained)
