"""CLI handlers of the model verbs: zoo build/list, cuts, profile, split and plan.

Division of labour: these handlers only read arguments, call the library (`partitioner.zoo`,
`.cuts`, `.split`, `.profile`, `.algorithms`) and print tables; progress of long steps goes to
stderr, results to stdout. Errors are raised as InputError and mapped to exit code 2 by
`partitioner.__main__`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from formats.errors import EXIT_BAD_INPUT, InputError
from formats.units import format_size
from partitioner import cuts as cutlib
from partitioner import zoo


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(headers))]
    lines = []
    for row in cells:
        lines.append("  ".join(c.rjust(w) if num else c.ljust(w)
                               for c, w, num in zip(row, widths, numeric)).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _names(tensors: Sequence[cutlib.TensorInfo], limit: int = 60) -> str:
    text = ", ".join(t.name for t in tensors)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- zoo ------------------------------------------------------------------------------------
def zoo_build(args: argparse.Namespace) -> int:
    names = list(zoo.BUILDERS) if args.name == "all" else [args.name]
    if args.name != "all" and args.name not in zoo.BUILDERS:
        raise InputError(f"unknown zoo model; known: {', '.join(zoo.BUILDERS)} or 'all'",
                         field=args.name)
    if args.out and len(names) > 1:
        raise InputError("--out needs a single model name", field="--out")
    for name in names:
        path = zoo.ensure_model(name, Path(args.out) if args.out else None)
        print(path)
    return 0


def zoo_list(args: argparse.Namespace) -> int:
    rows = []
    for name, description in zoo.DESCRIPTIONS.items():
        path = zoo.zoo_path(name)
        cached = format_size(path.stat().st_size) if path.is_file() else "-"
        rows.append((name, description, cached))
    print(table(["model", "description", "cached"], rows))
    print(f"\ncache: {zoo.cache_dir() / 'zoo'} (set EDGEPIPE_CACHE to move it)")
    return 0


# -- cuts -----------------------------------------------------------------------------------
def _input_shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    """--input-shape values, or the zoo model's own shapes when none are given."""
    from partitioner.inputs import parse_shape_args

    return parse_shape_args(args.input_shape) or zoo.default_input_shapes(args.model)


def _prepare(args: argparse.Namespace) -> tuple[Path, cutlib.PreparedModel]:
    path = zoo.resolve_model(args.model)
    prepared = cutlib.prepare_model(path, _input_shapes(args))
    for note in prepared.notes:
        print(f"note: {note}", file=sys.stderr)
    return path, prepared


def _shapes_text(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items())


def cuts(args: argparse.Namespace) -> int:
    path, prepared = _prepare(args)
    analysis = prepared.analysis
    if args.json:
        print(json.dumps({"model": str(path), "segments": analysis.segment_count,
                          "input_shapes": {k: list(v) for k, v in prepared.shapes.items()},
                          "notes": prepared.notes,
                          "cuts": [c.to_json() for c in analysis.cuts]}, indent=1))
        return 0
    rows = [(c.index, c.kind, len(c.tensors), c.nbytes, analysis.order[c.position - 1],
             _names(c.tensors)) for c in analysis.cuts]
    print(table(["cut", "kind", "tensors", "bytes", "after node", "tensor names"], rows))
    print(f"\n{len(analysis.cuts)} cuts, {analysis.segment_count} segments, "
          f"{len(analysis.order)} nodes; input {cutlib.total_bytes(analysis.inputs)} bytes, "
          f"output {cutlib.total_bytes(analysis.outputs)} bytes (measured at "
          f"{_shapes_text(prepared.shapes)})")
    for note in prepared.notes:
        print(f"note: {note}")
    return 0


# -- profile --------------------------------------------------------------------------------
def _profile(args: argparse.Namespace, runs: int = 20, fresh: bool = False) -> Any:
    from partitioner.inputs import parse_shape_args
    from partitioner.profile import profile_model

    if runs < 1:
        raise InputError("must be at least 1", field="--runs")
    return profile_model(args.model, runs=runs, refresh=fresh,
                         input_shapes=parse_shape_args(args.input_shape) or None)


def _instance(profile: Any, topology_path: str) -> Any:
    from formats.topology import load_topology
    from partitioner.profile import instance_for_topology

    return instance_for_topology(profile, load_topology(topology_path))


def profile(args: argparse.Namespace) -> int:
    from partitioner.profile import RUNTIME_ALLOWANCE_BYTES

    prof = _profile(args, args.runs, args.fresh)
    rows = []
    for k, seg in enumerate(prof.segments):
        nodes = prof.segment_nodes[k]
        rows.append((k, seg.compute_ms, format_size(seg.memory_bytes), seg.output_bytes,
                     nodes[0] if nodes else "", nodes[-1] if nodes else ""))
    print(table(["segment", "compute ms", "memory", "output bytes", "first node", "last node"],
                rows))
    machine = prof.machine
    print(f"\ntotal {prof.total_ms:.2f} ms CPU (fully optimised, 1 thread, lower quartile of "
          f"{prof.runs} runs, {prof.attribution} attribution; taken at wall "
          f"{machine.get('contention', float('nan')):.2f}x CPU, load "
          f"{machine.get('loadavg', float('nan')):.1f} on {machine.get('cpus', '?')} CPUs); "
          f"input shapes {_shapes_text({k: tuple(v) for k, v in prof.input_shapes.items()})}; "
          f"input {prof.input_bytes} bytes; weights x copies "
          f"{format_size(sum(s.memory_bytes for s in prof.segments))}; per host: runtime "
          f"allowance {format_size(RUNTIME_ALLOWANCE_BYTES)} + activation reserve "
          f"{format_size(prof.activation_reserve_bytes)}")
    for note in prof.notes:
        print(f"note: {note}")
    if args.verify:
        _verify(args, prof)
    if args.topology:
        instance = _instance(prof, args.topology)
        out = Path(args.out or "instance.json")
        out.write_text(json.dumps(instance.to_json(), indent=1) + "\n")
        print(f"instance ({len(instance.nodes)} nodes) written to {out}")
    elif args.out:
        raise InputError("--out writes the planner instance and needs --topology",
                         field="--out")
    return 0


def _verify(args: argparse.Namespace, prof: Any) -> None:
    from partitioner.profile import VERIFY_TARGET, verify_profile

    print("\nverifying: each stage of 2-4 way splits timed alone (CPU ms, as a worker runs it)",
          file=sys.stderr, flush=True)
    checks = verify_profile(args.model, prof)
    rows = [(f"{c.stages}-way", c.stage, f"{c.segments[0]}-{c.segments[1] - 1}",
             c.predicted_share, c.measured_share, c.measured_ms, f"{c.error:.1%}")
            for c in checks]
    print(table(["split", "stage", "segments", "predicted share", "measured share",
                 "measured ms", "error"], rows))
    worst = max((c.error for c in checks), default=0.0)
    print(f"\nlargest error {worst:.1%} (target: every stage within {VERIFY_TARGET:.0%})")


# -- split ----------------------------------------------------------------------------------
def _parse_cut_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise InputError("expected comma-separated cut indices, e.g. 3,7", field="--cuts",
                         ) from exc


def split(args: argparse.Namespace) -> int:
    from partitioner import split as splitlib
    from partitioner.profile import model_sha256

    path = zoo.resolve_model(args.model)
    model, analysis = splitlib.prepare(path)
    if args.plan:
        try:
            plan = json.loads(Path(args.plan).read_text())
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror}", file=args.plan) from exc
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON: {exc.msg}", file=args.plan,
                             line=exc.lineno) from exc
        if not isinstance(plan, dict):
            raise InputError("a plan is a JSON object", file=args.plan)
        indices = splitlib.cut_indices_from_plan(plan, analysis, model_sha256(path), args.plan)
    elif args.cuts is not None:
        indices = _parse_cut_list(args.cuts)
    else:
        indices = list(range(len(analysis.cuts)))
    print(f"splitting {path.name} into {len(set(indices)) + 1} stages ...", file=sys.stderr,
          flush=True)
    specs = splitlib.write_stages(splitlib.extract_stages(model, indices, analysis), args.out)
    out = Path(args.out)
    rows = [(s.file, format_size((out / s.file).stat().st_size), ", ".join(s.inputs),
             ", ".join(s.outputs)) for s in specs]
    print(table(["file", "size", "inputs", "outputs"], rows))
    print(f"\n{len(specs)} stages written to {out} ({splitlib.STAGES_FILE}); each stage file "
          f"self-contained (weights inline), symbolic axes kept")
    return 0


# -- plan -----------------------------------------------------------------------------------
def plan(args: argparse.Namespace) -> int:
    if args.measure:
        print("error: --measure (bandwidth measured in the emulator) is not supported outside "
              "the emulator yet; plan from the topology's link bandwidths instead",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    from partitioner.replicate import plan_pipelines  # the solvers load only when planning

    prof = _profile(args)
    instance = _instance(prof, args.topology)
    print(f"planning with {args.algorithm} over {len(instance.nodes)} nodes, "
          f"{len(instance.segments)} segments ...", file=sys.stderr, flush=True)
    result = plan_pipelines(instance, args.algorithm, args.time_limit, 0, args.pipelines)
    for note in prof.notes:
        print(f"note: {note}")
    cost = result.cost
    rows = []
    pipeline_of = [i for i, p in enumerate(result.pipelines) for _ in p]
    for k, stage in enumerate(result.stages):
        first = prof.segment_nodes[stage.first]
        last = prof.segment_nodes[stage.end - 1]
        memory = prof.stage_memory_bytes(stage.first, stage.end)
        node = instance.node(stage.node)
        rows.append((f"{pipeline_of[k]}.{k}" if result.chains else k,
                     f"{stage.first}-{stage.end - 1}: {first[0] if first else ''} .. "
                        f"{last[-1] if last else ''}", stage.node,
                     cost.compute_ms[k] if cost else float("nan"),
                     cost.in_ms[k] if cost else float("nan"),
                     f"{format_size(memory)} of "
                     f"{format_size(node.memory_bytes + prof.activation_reserve_bytes)}"))
    print(table(["stage", "layers (segments: first .. last node)", "node", "compute ms",
                 "transfer ms", "memory"], rows))
    if result.chains:
        print(f"\n{len(result.chains)} pipelines side by side (stage = pipeline.stage); "
              "requests are dealt to them in turn")
    print(f"\nback to {instance.source}: {cost.out_ms if cost else float('nan'):.2f} ms; "
          f"bottleneck {result.bottleneck_ms:.2f} ms = "
          f"{result.predicted_throughput_rps:.2f} inferences/s; latency "
          f"{result.latency_ms:.2f} ms ({result.algorithm}, "
          f"{'optimal' if result.optimal else 'not proven optimal'})")
    data = result.to_json()
    data.update({"model": str(prof.model), "model_sha256": prof.sha256,
                 "cuts": [prof.cuts[s.end - 1].names for s in result.pipelines[0][:-1]]})
    out = Path(args.out)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"plan written to {out}")
    return 0
