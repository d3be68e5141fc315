"""The planner's limits on big instances (issue 15): the cost tables are built a block at a
time and stop at the deadline, the baselines compare plans without building them, the binary
search over candidate bottlenecks samples instead of sorting them all and stops at the
deadline, and an instance whose tables would not fit the machine is refused (exit 2) before
anything is allocated. No test here is timed (the wall times vs the limit are
benchmarks/solver_limits.py's): each asserts what the deadline or the size must change.

The instances are small on purpose: the block size, the sample and the listed window are
shrunk so that small tables take the paths that big ones take."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from partitioner.__main__ import main as partitioner_main
from partitioner.algorithms import optimal, relaxed, solve, tables
from partitioner.algorithms.chains import Chain, chain_search
from partitioner.algorithms.greedy import greedy
from partitioner.algorithms.tables import Candidates, OutOfTime, Tables, key_of
from partitioner.instance import Instance, Node, Segment, plan_problems
from tests.test_planner import brute_force, instances

TOL = 1e-9


def random_instance(segments: int, nodes: int, seed: int, disk: bool = False) -> Instance:
    """Heterogeneous speeds, memory and links, some pairs missing; with `disk`, model files
    and node disks that rule some stages out."""
    rng = random.Random(seed)
    names = [f"e{i}" for i in range(nodes)]
    return Instance(
        [Segment(rng.uniform(0.5, 20), rng.randint(1, 50), rng.choice([0, 100, 5000, 40_000]),
                 rng.randint(1, 100) if disk else 0) for _ in range(segments)],
        rng.randint(100, 10_000),
        [Node(name, rng.choice([0.25, 0.5, 1.0, 2.0]), rng.randint(50, 400),
              rng.choice([0, 300, 2000]) if disk else 0) for name in names],
        "src",
        {(a, b): rng.choice([1.0, 10.0, 100.0]) for a, b in itertools.combinations(
            ["src", *names], 2) if rng.random() < 0.85},
        frame_overhead_ms=0.5, frame_overhead_ms_per_mib=rng.choice([0.0, 100.0]))


def reference_tables(t: Tables) -> tuple[np.ndarray, np.ndarray]:
    """The cost tables by their definition, all at once (what Tables built before it built
    them in blocks)."""
    instance, s = t.instance, t.n_segments
    work = t.prefix_compute[None, :] - t.prefix_compute[:, None]
    need = t.prefix_memory[None, :] - t.prefix_memory[:, None]
    upper = np.triu(np.ones((s + 1, s + 1), dtype=bool), k=1)
    received = np.array([instance.input_bytes, *(g.output_bytes for g in instance.segments)])
    overhead = instance.frame_overhead_ms + \
        instance.frame_overhead_ms_per_mib * received[:, None, None] / 2**20
    costs = (work[:, :, None] + overhead) / t.speed[None, None, :]
    fits = upper[:, :, None] & (need[:, :, None] <= t.memory[None, None, :])
    disk = np.array([n.disk_bytes for n in instance.nodes])
    files = np.concatenate([[0], np.cumsum([g.model_bytes for g in instance.segments])])
    on_disk = files[None, :] - files[:, None]
    fits &= (disk[None, None, :] == 0) | (on_disk[:, :, None] <= disk[None, None, :])
    stage = np.where(fits, costs, math.inf)
    endpoints = [*t.names, instance.source]
    hop = np.full((s + 1, len(endpoints), len(endpoints)), math.inf)
    for (u, a), (v, b) in itertools.permutations(enumerate(endpoints), 2):
        for boundary, nbytes in enumerate([instance.input_bytes,
                                           *(g.output_bytes for g in instance.segments)]):
            hop[boundary, u, v] = instance.hop_ms(nbytes, a, b)
    return stage, hop


@pytest.mark.parametrize("disk", [False, True])
def test_tables_built_in_blocks_are_the_tables(monkeypatch, disk):
    instance = random_instance(9, 5, seed=3, disk=disk)
    expected_stage, expected_hop = reference_tables(Tables.of(instance))
    for block in (1, 7, 10**9):    # a row in several blocks, blocks of rows, one block
        monkeypatch.setattr(tables, "CHUNK_ENTRIES", block)
        built = Tables.of(instance)
        assert np.array_equal(built.stage, expected_stage)
        np.testing.assert_allclose(built.hop, expected_hop, rtol=1e-12)


def test_baselines_compare_plans_without_the_tables():
    """greedy and random rank hundreds of plans with Tables.key before the search builds the
    tables; key must agree exactly with the tables it does not build."""
    instance = random_instance(12, 6, seed=5, disk=True)
    t = Tables.of(instance)
    path = greedy(t)
    assert "stage" not in t.__dict__ and "hop" not in t.__dict__
    rng = random.Random(1)
    paths = [path]
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, 12), rng.randint(0, 5)))
        bounds = [0, *cuts, 12]
        nodes = rng.sample(range(6), len(bounds) - 1)
        paths.append([(bounds[i], bounds[i + 1], nodes[i]) for i in range(len(nodes))])
    for p in paths:
        assert t.key(p) == key_of(t.stage, t.hop, p)


def test_a_passed_deadline_stops_building_the_tables():
    t = Tables.of(random_instance(9, 5, seed=3))
    t.deadline = time.monotonic() - 1
    with pytest.raises(OutOfTime):
        _ = t.stage
    with pytest.raises(OutOfTime):
        _ = t.hop
    t.deadline = None
    assert t.stage.shape == (10, 10, 5)


def test_solve_out_of_time_before_the_tables_answers_unproven(monkeypatch):
    """A deadline that has passed by the time the tables are due (a stand-in for a huge
    instance under a short limit): auto still answers with a valid plan, not proven, with a
    lower bound that holds."""
    instance = random_instance(10, 6, seed=8)
    proven = solve(instance, "optimal")
    assert proven.optimal
    stopped: list[str] = []
    original = Tables.check_time

    def deadline_passed(self: Tables) -> None:
        # the clock has passed the deadline once the search asks for the tables
        if "stage" not in self.__dict__:
            stopped.append("stage")
            raise OutOfTime("the time limit ran out")
        original(self)

    monkeypatch.setattr(Tables, "check_time", deadline_passed)
    plan = solve(instance, "auto", time_limit_s=60)
    assert stopped
    assert plan_problems(instance, plan.stages) == []
    assert not plan.optimal
    assert 0 < plan.lower_bound_ms <= proven.bottleneck_ms * (1 + TOL)


def test_quick_bound_holds():
    for seed in range(20):
        instance = random_instance(random.Random(seed).randint(1, 8), 4, seed)
        best = brute_force(instance)
        if best is not None:
            assert Tables.of(instance).quick_bound() <= best[0] * (1 + TOL)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(max_segments=7, max_nodes=5))
def test_sampled_bisection_proves_the_same_optimum(instance: Instance):
    """With a tiny sample and window, the binary search picks its thresholds from the sample
    (as on 18 M candidates) and still ends on the optimum, proven."""
    t = Tables.of(instance)
    best = brute_force(instance)
    try:
        plan = solve(instance, "greedy")
        incumbent = t.path_of(plan.stages)
    except optimal.InfeasibleError:
        incumbent = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tables, "SAMPLE", 3)
        patch.setattr(tables, "WINDOW", 1)
        if best is None:
            if incumbent is None:
                with pytest.raises(optimal.InfeasibleError):
                    optimal._bisect(t.stage, t.hop, 0.0, None, optimal._Clock(None))
            return
        for start in (incumbent, None):
            result = optimal._bisect(t.stage, t.hop, 0.0, start, optimal._Clock(None))
            assert result.proven
            assert result.lower_bound_ms == pytest.approx(best[0], rel=TOL, abs=TOL)
            assert t.key(result.path)[0] <= result.lower_bound_ms * (1 + TOL)


def test_useful_arcs_in_blocks_and_past_the_deadline(monkeypatch):
    t = Tables.of(random_instance(9, 5, seed=4))
    bounds = relaxed.reach(t.stage, t.hop, 30.0, "sum")
    whole = relaxed.useful_arcs(t.stage, t.hop, 30.0, "sum", 200.0, bounds)
    assert len(whole.stage) and len(whole.hop)
    monkeypatch.setattr(relaxed, "CHUNK_ENTRIES", 7)
    blocks = relaxed.useful_arcs(t.stage, t.hop, 30.0, "sum", 200.0, bounds)
    assert np.array_equal(whole.stage, blocks.stage) and np.array_equal(whole.hop, blocks.hop)
    late = time.monotonic() - 1
    with pytest.raises(OutOfTime):
        relaxed.useful_arcs(t.stage, t.hop, 30.0, "sum", 200.0, bounds, deadline=late)
    assert relaxed.best_path(t.stage, t.hop, "sum", deadline=late) is None
    with pytest.raises(OutOfTime):
        relaxed.reach(t.stage, t.hop, 30.0, "sum", deadline=late)
    # past the deadline the chain search knows nothing: neither a plan nor a proof of none
    assert chain_search(t.stage, t.hop, 30.0, deadline=late) == Chain(None, False)
    assert chain_search(t.stage, t.hop, 1e-9) == Chain(None, True)


def test_candidates_pick_and_list_exactly():
    t = Tables.of(random_instance(8, 4, seed=2))
    every = np.unique(np.concatenate([a[np.isfinite(a)] for a in (t.stage, t.hop)]))
    values = Candidates(t.stage, t.hop)
    low, high = float(every[3]), float(every[40])
    assert np.array_equal(values.within(low, high), every[3:41])
    # the middle of the untested ones below high, and the next candidate after it
    assert values.pick(low, high) == (float(every[3 + 37 // 2]), float(every[4 + 37 // 2]))
    assert values.pick(np.nextafter(low, 0), high, first=True)[0] == low
    assert values.pick(float(every[40]), float(every[40])) == (None, float(every[40]))
    assert values.at_least(np.nextafter(high, 0)) == high


def test_a_passed_deadline_stops_the_candidate_search():
    t = Tables.of(random_instance(8, 4, seed=2))
    late = Candidates(t.stage, t.hop, deadline=time.monotonic() - 1)
    with pytest.raises(OutOfTime):
        late.at_least(0.0)
    incumbent = t.path_of(solve(t.instance, "random").stages)
    result = optimal._bisect(t.stage, t.hop, 0.0, incumbent, optimal._Clock(0.0))
    assert not result.proven and result.path == incumbent and result.lower_bound_ms == 0.0


def test_an_instance_too_big_for_the_tables_is_exit_2(tmp_path: Path):
    """1000 segments x 200 nodes: about 4 GiB of tables, over the planner's 1 GiB cap on any
    machine; refused before any table is allocated, naming the file and the sizes."""
    names = [f"e{i}" for i in range(200)]
    data = {"segments": [{"compute_ms": 1.0, "memory_bytes": 1, "output_bytes": 10}] * 1000,
            "input_bytes": 10, "source": "d",
            "nodes": [{"name": n, "speed": 1.0, "memory_bytes": 10**6} for n in names],
            "bandwidth_mbps": [["d", n, 100.0] for n in names]}
    path = tmp_path / "big.json"
    path.write_text(json.dumps(data))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = partitioner_main(["solve", str(path), "--time-limit", "2"])
    assert code == 2
    assert "big.json" in err.getvalue()
    assert "too big for the planner: 1000 segments x 200 nodes" in err.getvalue()
    assert "Traceback" not in err.getvalue()
