"""Command line of the partitioner: one verb per job (zoo, cuts, profile, solve, split, plan).
Each verb lives in its own module; this file only parses arguments and maps errors to exit
codes (2: bad input or infeasible instance)."""

from __future__ import annotations

import argparse
import sys

from formats.errors import EXIT_BAD_INPUT, InputError
from formats.scenario import parse_pipelines
from partitioner.instance import InfeasibleError


def build_parser(prog: str = "python -m partitioner") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    zoo = verbs.add_parser("zoo", help="build the seeded model zoo (no downloads)")
    zoo_verbs = zoo.add_subparsers(dest="zoo_verb", required=True)
    zoo_build = zoo_verbs.add_parser("build", help="build a zoo model as ONNX (cached)")
    zoo_build.add_argument("name", help="resnet18|resnet50|mobilenetv2|vgg16|bert_mini or 'all'")
    zoo_build.add_argument("--out", help="output file (default: the zoo cache)")
    zoo_verbs.add_parser("list", help="list the zoo models")

    cuts = verbs.add_parser("cuts", help="list the valid cut points of a model")
    cuts.add_argument("model", help="ONNX file or zoo name")
    cuts.add_argument("--json", action="store_true", help="JSON instead of a table")
    _shape_option(cuts)

    profile = verbs.add_parser("profile", help="per-segment compute, memory and bytes")
    profile.add_argument("model", help="ONNX file or zoo name")
    profile.add_argument("--topology", help="topology YAML: also write the planner instance")
    profile.add_argument("--out", help="instance JSON to write (with --topology)")
    profile.add_argument("--runs", type=int, default=20, help="profiled runs (default 20)")
    profile.add_argument("--fresh", action="store_true",
                         help="profile again even if a cached profile checks out")
    profile.add_argument("--verify", action="store_true",
                         help="split 2-4 ways, time each stage alone, compare with the "
                              "profile's shares")
    _shape_option(profile)

    solve = verbs.add_parser("solve", help="solve a planner instance (DESIGN.md contract)")
    solve.add_argument("instance", help="planner instance JSON")
    solve.add_argument("--algorithm", default="auto",
                       help="auto|optimal|seifer|greedy|random (default auto)")
    solve.add_argument("--time-limit", type=float, default=None,
                       help="seconds to search: auto's budget (default 2), optimal's limit "
                            "(default: none, capped at 300)")
    solve.add_argument("--seed", type=int, default=0, help="seed for randomised algorithms")

    split = verbs.add_parser("split", help="cut a model into stage_NN.onnx + stages.json")
    split.add_argument("model", help="ONNX file or zoo name")
    split.add_argument("--out", required=True, help="output directory")
    group = split.add_mutually_exclusive_group()
    group.add_argument("--cuts", help="comma-separated cut indices (default: every cut)")
    group.add_argument("--plan", help="plan.json: cut where its stages end")

    plan = verbs.add_parser("plan", help="profile + plan a model on a topology")
    plan.add_argument("model", help="ONNX file or zoo name")
    plan.add_argument("--topology", required=True, help="topology YAML")
    plan.add_argument("--algorithm", default="auto")
    plan.add_argument("--time-limit", type=float, default=None,
                      help="seconds to search (as for solve)")
    plan.add_argument("--pipelines", type=parse_pipelines, default=1,
                      help="most pipelines side by side: a number, or auto (as many as pay "
                           "off; default 1)")
    plan.add_argument("--out", default="plan.json", help="where to write plan.json")
    plan.add_argument("--measure", action="store_true",
                      help="measure bandwidth in the emulator instead of reading the topology")
    _shape_option(plan)
    return parser


def _shape_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", action="append", metavar="NAME=DxD...",
                        help="shape of a model input, e.g. input_ids=1x128 (repeat per input); "
                             "needed for symbolic dimensions other than the batch (default 1)")


def main(argv: list[str] | None = None, prog: str = "python -m partitioner") -> int:
    """`prog`: the name in usage lines (`edgepipe` when called by its console command)."""
    args = build_parser(prog).parse_args(argv)
    from partitioner import commands

    handler = {
        ("zoo", "build"): commands.zoo_build, ("zoo", "list"): commands.zoo_list,
        ("cuts", None): commands.cuts, ("profile", None): commands.profile,
        ("solve", None): commands.solve, ("split", None): commands.split,
        ("plan", None): commands.plan,
    }[(args.verb, getattr(args, "zoo_verb", None))]
    try:
        return handler(args) or 0
    except (InputError, InfeasibleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
