"""`python -m partitioner solve INSTANCE.json`: read a planner instance, plan it, print the
plan as the DESIGN.md JSON on stdout. Loading and validation live in partitioner.instance, the
search in partitioner.algorithms; bad input and infeasible instances raise, and __main__ maps
both to exit code 2 with the reason."""

from __future__ import annotations

import argparse
import json
import sys

from formats.errors import InputError
from partitioner.algorithms import solve as plan_instance
from partitioner.instance import load_instance


def solve(args: argparse.Namespace) -> int:
    if args.time_limit is not None and args.time_limit <= 0:
        raise InputError(f"must be positive, got {args.time_limit}", field="--time-limit")
    instance = load_instance(args.instance)
    try:
        plan = plan_instance(instance, args.algorithm, args.time_limit, args.seed)
    except InputError as exc:
        if exc.file is not None or exc.field == "--algorithm":
            raise
        # the instance is too big (partitioner.algorithms.tables.check_size): name its file
        raise InputError(exc.reason, file=args.instance, field=exc.field) from exc
    json.dump(plan.to_json(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
