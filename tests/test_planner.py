"""The planner against brute force: on small random instances (ties, missing links,
heterogeneous memory and speed) `optimal` must find exactly the best (bottleneck, latency) that
enumerating every plan finds, and prove it; every algorithm must return valid plans; `auto` must
never lose to the baselines; bad and infeasible instances must exit 2 through the CLI."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partitioner.algorithms import ALGORITHMS, optimal, solve
from partitioner.instance import (
    InfeasibleError,
    Instance,
    Node,
    Plan,
    Segment,
    Stage,
    instance_from_json,
    plan_cost,
    plan_problems,
    pure_bottleneck_ms,
)

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-9


@st.composite
def instances(draw: st.DrawFn, max_segments: int = 6, max_nodes: int = 4) -> Instance:
    """Small instances; values come from short lists so that ties are common."""
    n_seg = draw(st.integers(1, max_segments))
    segments = [Segment(draw(st.sampled_from([0.0, 1.0, 2.0, 5.0, 7.5])),
                        draw(st.sampled_from([1, 2, 3, 5])),
                        draw(st.sampled_from([0, 100, 1000, 5000])))
                for _ in range(n_seg)]
    n_nodes = draw(st.integers(1, max_nodes))
    nodes = [Node(f"e{i}", draw(st.sampled_from([0.5, 1.0, 2.0])),
                  draw(st.sampled_from([2, 4, 6, 100])))
             for i in range(n_nodes)]
    names = ["src", *(n.name for n in nodes)]
    bandwidth = {}
    for a, b in itertools.combinations(names, 2):
        # About one pair in six is missing: such a hop cannot be used.
        mbps = draw(st.sampled_from([None, 1.0, 1.0, 2.0, 10.0, 100.0]))
        if mbps is not None:
            bandwidth[(a, b)] = mbps
    # a stage's own per-frame CPU: none, fixed, or growing with what it receives (up to
    # ~5 ms for the 5000-byte cuts), so that it can change which cut is best
    return Instance(segments, draw(st.sampled_from([0, 100, 4000])), nodes, "src", bandwidth,
                    frame_overhead_ms=draw(st.sampled_from([0.0, 0.0, 0.5])),
                    frame_overhead_ms_per_mib=draw(st.sampled_from([0.0, 0.0, 1000.0])))


def brute_force(instance: Instance) -> tuple[float, float] | None:
    """Best (bottleneck, latency) over every plan, by enumeration; None if none is valid."""
    s, names = len(instance.segments), [n.name for n in instance.nodes]
    best = None
    for k in range(1, min(s, len(names)) + 1):
        for cuts in itertools.combinations(range(1, s), k - 1):
            bounds = [0, *cuts, s]
            for chosen in itertools.permutations(names, k):
                stages = [Stage(bounds[i], bounds[i + 1], chosen[i]) for i in range(k)]
                if plan_problems(instance, stages):
                    continue
                cost = plan_cost(instance, stages)
                key = (cost.bottleneck_ms, cost.latency_ms)
                if best is None or key < best:
                    best = key
    return best


def no_worse(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """a is at least as good as b in the (bottleneck, then latency) order, up to rounding."""
    if a[0] < b[0] * (1 - TOL) - TOL:
        return True
    return a[0] <= b[0] * (1 + TOL) + TOL and a[1] <= b[1] * (1 + TOL) + TOL


def key(plan: Plan) -> tuple[float, float]:
    return (plan.bottleneck_ms, plan.latency_ms)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_optimal_matches_brute_force(instance: Instance) -> None:
    assert_optimal_matches_brute_force(instance)


def assert_optimal_matches_brute_force(instance: Instance) -> None:
    """`optimal` is infeasible exactly when enumeration finds no plan, else proves a plan
    exactly as good (bottleneck, then latency) as the best enumerated one."""
    best = brute_force(instance)
    if best is None:
        with pytest.raises(InfeasibleError):
            solve(instance, "optimal")
        return
    plan = solve(instance, "optimal")
    assert plan_problems(instance, plan.stages) == []
    assert plan.optimal
    assert no_worse(key(plan), best) and no_worse(best, key(plan)), (key(plan), best)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(max_segments=5, max_nodes=4))
def test_milp_proofs_match_brute_force(instance: Instance) -> None:
    """The same, with the DP allowed no critical node: every proof then goes through the
    binary search and the HiGHS flow model."""
    with mock.patch.object(optimal, "MAX_CRITICAL", 0):
        assert_optimal_matches_brute_force(instance)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(max_segments=8, max_nodes=5), st.integers(0, 3))
def test_every_algorithm_returns_valid_plans(instance: Instance, seed: int) -> None:
    plans = {}
    for algorithm in ALGORITHMS:
        try:
            plans[algorithm] = solve(instance, algorithm, seed=seed)
        except InfeasibleError as exc:
            assert str(exc)        # a reason is always given
            continue
        assert plan_problems(instance, plans[algorithm].stages) == [], algorithm
        assert math.isfinite(plans[algorithm].bottleneck_ms)
    if "optimal" not in plans:
        assert not plans, "a heuristic found a plan where optimal found none"
        return
    for baseline in ("seifer", "greedy", "random"):
        if baseline in plans:
            assert no_worse(key(plans["auto"]), key(plans[baseline])), baseline
            assert no_worse(key(plans["optimal"]), key(plans[baseline])), baseline


def test_auto_reports_a_bound_when_not_proven() -> None:
    """With no time to prove, auto still answers: a valid plan and a lower bound below it."""
    instance = Instance(
        [Segment(5.0, 1, 1000) for _ in range(12)], 1000,
        [Node(f"e{i}", 1.0 + i / 10, 4) for i in range(8)], "src",
        {(a, b): 10.0 + i for i, (a, b) in enumerate(itertools.combinations(
            ["src", *(f"e{i}" for i in range(8))], 2))})
    plan = solve(instance, "auto", time_limit_s=1e-6)
    assert plan_problems(instance, plan.stages) == []
    if not plan.optimal:
        assert plan.lower_bound_ms is not None
        assert plan.lower_bound_ms <= plan.bottleneck_ms * (1 + TOL)
        assert plan.to_json()["gap"] >= 0


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "partitioner", "solve", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def write(tmp_path: Path, data: object, name: str = "instance.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


SMALL = {
    "segments": [{"compute_ms": 4.0, "memory_bytes": 100, "output_bytes": 1000},
                 {"compute_ms": 6.0, "memory_bytes": 100, "output_bytes": 500}],
    "input_bytes": 2000,
    "nodes": [{"name": "edge1", "speed": 1.0, "memory_bytes": 150},
              {"name": "edge2", "speed": 0.5, "memory_bytes": 150}],
    "source": "dispatcher",
    "bandwidth_mbps": [["dispatcher", "edge1", 100.0], ["dispatcher", "edge2", 100.0],
                       ["edge1", "edge2", 50.0]],
}


def test_cli_prints_the_plan(tmp_path: Path) -> None:
    done = run_cli(write(tmp_path, SMALL), "--algorithm", "optimal")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["optimal"] is True and out["algorithm"] == "optimal"
    # The slow node takes the light segment (4 ms at half speed), the fast one the heavy one.
    assert [(s["segments"], s["node"]) for s in out["stages"]] == [([0, 1], "edge2"),
                                                                   ([1, 2], "edge1")]
    assert out["bottleneck_ms"] == pytest.approx(8.0)
    assert {"compute_ms", "in_ms", "node"} <= set(out["stages"][0]) and "out_ms" in out


def test_cli_infeasible_exits_2_with_reason(tmp_path: Path) -> None:
    too_big = json.loads(json.dumps(SMALL))
    too_big["segments"][1]["memory_bytes"] = 1000
    done = run_cli(write(tmp_path, too_big))
    assert done.returncode == 2
    assert "segment 1 needs 1000 bytes" in done.stderr

    unlinked = json.loads(json.dumps(SMALL))
    unlinked["bandwidth_mbps"] = [["edge1", "edge2", 50.0]]
    done = run_cli(write(tmp_path, unlinked))
    assert done.returncode == 2 and "no bandwidth" in done.stderr


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda d: d.pop("nodes"), "nodes"),
    (lambda d: d["segments"][0].update(compute_ms=-1), "segments[0].compute_ms"),
    (lambda d: d["bandwidth_mbps"].append(["edge1", "nowhere", 5.0]), "nowhere"),
])
def test_cli_invalid_instance_exits_2(tmp_path: Path, mutate: Callable[[dict], object],
                                      expected: str) -> None:
    data = json.loads(json.dumps(SMALL))
    mutate(data)
    done = run_cli(write(tmp_path, data))
    assert done.returncode == 2 and expected in done.stderr, done.stderr


def test_cli_bad_json_and_algorithm_exit_2(tmp_path: Path) -> None:
    done = run_cli(write(tmp_path, "{not json"))
    assert done.returncode == 2 and "not valid JSON" in done.stderr
    done = run_cli(write(tmp_path, SMALL), "--algorithm", "magic")
    assert done.returncode == 2 and "unknown algorithm" in done.stderr


def test_pure_bottleneck_leaves_out_only_the_per_frame_overhead() -> None:
    """benchmarks/pipeline.py judges a run against the plan's pure limit: the same stages
    and hops with no per-frame CPU. Compute-bound, the overhead's share is removed; a hop
    that is the bottleneck either way stays; pipelines side by side share the limit."""
    segments = [Segment(10.0, 0, 1000), Segment(30.0, 0, 1000)]
    nodes = [Node("a", 0.5, 1 << 30), Node("b", 0.25, 1 << 30)]
    instance = Instance(segments, 1000, nodes, "src",
                        {("src", "a"): 100.0, ("src", "b"): 100.0, ("a", "b"): 100.0},
                        frame_overhead_ms=2.0)
    stages = [Stage(0, 1, "a"), Stage(1, 2, "b")]
    assert plan_cost(instance, stages).bottleneck_ms == pytest.approx((30 + 2) / 0.25)
    assert pure_bottleneck_ms(instance, stages) == pytest.approx(30 / 0.25)
    assert instance.frame_overhead_ms == 2.0          # the instance itself is left alone
    slow_link = Instance(segments, 1000, nodes, "src",
                         {("src", "a"): 100.0, ("src", "b"): 100.0, ("a", "b"): 0.05},
                         frame_overhead_ms=2.0)
    assert pure_bottleneck_ms(slow_link, stages) == pytest.approx(
        plan_cost(slow_link, stages).bottleneck_ms) == pytest.approx(1000 * 8 / 50)
    side_by_side = [Stage(0, 2, "a"), Stage(0, 2, "b")]
    assert pure_bottleneck_ms(instance, side_by_side, (1, 1)) == pytest.approx(40 / 0.25 / 2)


def test_overhead_per_mib_charges_a_stage_for_what_it_receives() -> None:
    """A stage's per-frame CPU is the fixed part plus the per-MiB part of the cut before it:
    plan_cost and the solver's tables agree, it moves the best cut to the smaller tensor,
    the pure limit leaves it out, and it survives the instance JSON."""
    mib = 2**20
    # the cut after segment 0 carries 4 MiB, the one after segment 1 a few bytes: the first
    # balances the compute best (13 | 15 ms), the second costs no 20 ms to receive (17 | 11)
    segments = [Segment(12.0, 0, 4 * mib), Segment(4.0, 0, 100), Segment(10.0, 0, 100)]
    nodes = [Node("a", 1.0, 1 << 40), Node("b", 1.0, 1 << 40)]
    links = {("src", "a"): 1e5, ("src", "b"): 1e5, ("a", "b"): 1e5}
    plain = Instance(segments, 1000, nodes, "src", links, frame_overhead_ms=1.0)
    charged = Instance(segments, 1000, nodes, "src", links, frame_overhead_ms=1.0,
                       frame_overhead_ms_per_mib=5.0)
    after_big = [Stage(0, 1, "a"), Stage(1, 3, "b")]
    assert charged.stage_overhead_ms(1) == pytest.approx(1.0 + 5.0 * 4)
    assert plan_cost(charged, after_big).compute_ms == pytest.approx(
        [12 + 1 + 5 * 1000 / mib, 14 + 1 + 20])
    assert [(s.first, s.end) for s in solve(plain, "optimal").stages] == [(0, 1), (1, 3)]
    best = solve(charged, "optimal")
    assert [(s.first, s.end) for s in best.stages] == [(0, 2), (2, 3)]
    assert best.bottleneck_ms == pytest.approx(plan_cost(charged, best.stages).bottleneck_ms)
    assert pure_bottleneck_ms(charged, after_big) == pytest.approx(14.0)
    again = instance_from_json(json.loads(json.dumps(charged.to_json())))
    assert again.frame_overhead_ms_per_mib == 5.0 and again == charged


@pytest.mark.parametrize("algorithm", ["seifer", "greedy", "random"])
def test_baselines_place_stages_on_disks_that_hold_their_models(algorithm: str) -> None:
    """Eight nodes whose disks hold one segment's model each: the only plans put one segment
    on each node. Blind to disk, greedy and seifer put the whole model on one node (its
    memory holds it) and random drew that one plan in 8! only."""
    segments = [Segment(10.0, 10, 100, model_bytes=40) for _ in range(8)]
    nodes = [Node(f"e{i}", 1.0, 1000, disk_bytes=50) for i in range(8)]
    names = ["src", *(n.name for n in nodes)]
    bandwidth = {pair: 1000.0 for pair in itertools.combinations(names, 2)}
    instance = Instance(segments, 100, nodes, "src", bandwidth)
    plan = solve(instance, algorithm, seed=1)
    assert plan_problems(instance, plan.stages) == []
    assert [s.end - s.first for s in plan.stages] == [1] * 8
