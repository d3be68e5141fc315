"""Pipelines side by side (data parallelism): their cost (round-robin pace, the source's
shared link, an emulating machine's CPU budget), their validity, how many the planner runs
and on which nodes, and the scenario field that asks for them. No root needed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from formats.errors import InputError
from formats.scenario import load_scenario
from partitioner.algorithms import solve
from partitioner.instance import (
    Instance,
    Node,
    Plan,
    Segment,
    Stage,
    instance_from_json,
    plan_from_json,
    plan_problems,
)
from partitioner.profile import effective_speed, machine_budget
from partitioner.replicate import plan_pipelines, replicate
from testbed.control.policy import repair_candidates

ROOT = Path(__file__).resolve().parent.parent


def uniform(nodes: int, compute_ms: float = 100.0, speed: float = 1.0,
            source_mbps: float = 1000.0) -> Instance:
    """Two segments of `compute_ms` each, small frames, `nodes` identical nodes."""
    names = [f"e{i}" for i in range(nodes)]
    bandwidth = {("src", n): source_mbps for n in names}
    bandwidth.update({(a, b): 1000.0 for a in names for b in names if a < b})
    return Instance([Segment(compute_ms, 10, 1000), Segment(compute_ms, 10, 1000)], 1000,
                    [Node(n, speed, 100) for n in names], "src", bandwidth)


def single(instance: Instance) -> Plan:
    return solve(instance, "optimal", time_limit_s=5.0, seed=0)


def test_two_pipelines_halve_the_bottleneck() -> None:
    instance = uniform(4)
    stages = [Stage(0, 1, "e0"), Stage(1, 2, "e1"), Stage(0, 1, "e2"), Stage(1, 2, "e3")]
    one = Plan.of(instance, stages[:2], "given", False)
    two = Plan.of(instance, stages, "given", False, chains=(2, 2))
    assert one.bottleneck_ms == pytest.approx(100.0)
    assert two.bottleneck_ms == pytest.approx(50.0)
    assert two.predicted_throughput_rps == pytest.approx(2 * one.predicted_throughput_rps)
    assert two.latency_ms == pytest.approx(one.latency_ms)
    assert two.pipelines == [stages[:2], stages[2:]]
    assert two.heads == [0, 2]
    assert [two.next_stage(i) for i in range(4)] == [1, None, 3, None]
    assert one.heads == [0] and one.next_stage(1) is None


def test_the_slowest_pipeline_sets_the_pace() -> None:
    """Requests are dealt in turn: a slow pipeline holds the others back."""
    instance = uniform(3)
    instance.nodes[2] = Node("e2", 0.5, 100)
    plan = Plan.of(instance, [Stage(0, 1, "e0"), Stage(1, 2, "e1"), Stage(0, 2, "e2")],
                   "given", False, chains=(2, 1))
    assert plan.bottleneck_ms == pytest.approx(400.0 / 2)


def test_the_source_link_is_shared() -> None:
    # 1 MB of input a request over 80 Mbit: 100 ms on the source's link, whatever R is
    instance = uniform(4, compute_ms=10.0, source_mbps=80.0)
    instance.input_bytes = 1_000_000
    stages = [Stage(0, 2, f"e{i}") for i in range(4)]
    plan = Plan.of(instance, stages, "given", False, chains=(1, 1, 1, 1))
    assert plan.bottleneck_ms == pytest.approx(100.0)


def test_the_machine_budget_caps_pipelines_side_by_side() -> None:
    instance = uniform(4)
    stages = [Stage(0, 2, f"e{i}") for i in range(4)]
    free = Plan.of(instance, stages, "given", False, chains=(1, 1, 1, 1))
    assert free.bottleneck_ms == pytest.approx(50.0)
    instance.cpu_budget = 2.0      # the four nodes can only compute like two together
    capped = Plan.of(instance, stages, "given", False, chains=(1, 1, 1, 1))
    assert capped.bottleneck_ms == pytest.approx(100.0)


def test_machine_budget_rule() -> None:
    assert machine_budget([0.1] * 10, 0.5, 2.0) == 0.0          # 1.0 promised, 1.5 there
    budget = machine_budget([0.1] * 20, 0.5, 2.0)               # 2.0 promised, 1.5 there
    assert budget == pytest.approx(20 * effective_speed(0.1) * 1.5 / 2.0)


def test_validity_of_pipelines() -> None:
    instance = uniform(4)
    good = [Stage(0, 1, "e0"), Stage(1, 2, "e1"), Stage(0, 2, "e2")]
    assert plan_problems(instance, good, (2, 1)) == []
    reused = [Stage(0, 1, "e0"), Stage(1, 2, "e1"), Stage(0, 2, "e1")]
    assert "a node holds more than one stage" in plan_problems(instance, reused, (2, 1))
    short = [Stage(0, 1, "e0"), Stage(1, 2, "e1"), Stage(0, 1, "e2")]
    assert any(p.startswith("pipeline 1:") for p in plan_problems(instance, short, (2, 1)))
    assert plan_problems(instance, good, (2, 2))          # the counts do not add up


def test_plan_json_keeps_the_pipelines() -> None:
    instance = uniform(4)
    plan = Plan.of(instance, [Stage(0, 2, f"e{i}") for i in range(3)], "given", False,
                   chains=(1, 1, 1))
    data = plan.to_json()
    assert data["chains"] == [1, 1, 1]
    back = plan_from_json(instance, data)
    assert back.chains == (1, 1, 1) and back.bottleneck_ms == pytest.approx(plan.bottleneck_ms)
    assert "chains" not in single(instance).to_json()


def test_instance_json_carries_the_budget() -> None:
    instance = uniform(2)
    instance.cpu_budget = 1.5
    assert instance_from_json(instance.to_json()).cpu_budget == 1.5
    with pytest.raises(InputError) as caught:
        instance_from_json({**instance.to_json(), "cpu_budget": -1})
    assert caught.value.field == "cpu_budget"


def test_replicate_runs_as_many_pipelines_as_pay_off() -> None:
    # every node holds the whole model and each stage costs 10 ms of frame handling: four
    # one-stage pipelines (210 / 4 ms) beat two of two stages (110 / 2) and any single one
    instance = uniform(4)
    instance.frame_overhead_ms = 10.0
    plan = replicate(instance, single)
    assert plan.chains == (1, 1, 1, 1)
    assert plan.bottleneck_ms == pytest.approx(210.0 / 4)
    assert sorted(s.node for s in plan.stages) == ["e0", "e1", "e2", "e3"]
    assert not plan_problems(instance, plan.stages, plan.chains)
    assert replicate(instance, single, max_pipelines=2).chains == (2, 2)
    assert replicate(instance, single, max_pipelines=1).chains == ()


def test_replicate_keeps_one_pipeline_when_more_do_not_pay() -> None:
    # one fast node does everything in 20 ms; the slow ones would only slow the pace
    instance = uniform(3)
    instance.nodes = [Node("e0", 10.0, 100), Node("e1", 0.1, 100), Node("e2", 0.1, 100)]
    plan = replicate(instance, single)
    assert plan.chains == () and [s.node for s in plan.stages] == ["e0"]


def test_replicate_respects_the_budget_and_keeps_spares() -> None:
    instance = uniform(6)
    instance.cpu_budget = 3.0
    plan = replicate(instance, single)
    # two pipelines of two stages already reach the budget (200 ms of work a request on
    # 3 nodes' worth of CPU); more would only tie, so two nodes stay spare
    assert plan.bottleneck_ms == pytest.approx(200.0 / 3.0)
    assert plan.chains == (2, 2)


def test_replicate_under_memory_limits() -> None:
    # each node holds one segment only: pipelines of two stages, two of them on four nodes
    instance = uniform(4)
    instance.nodes = [Node(f"e{i}", 1.0, 10) for i in range(4)]
    plan = plan_pipelines(instance, "optimal", 5.0, 0, pipelines=0)
    assert plan.chains == (2, 2)
    assert not plan_problems(instance, plan.stages, plan.chains)


def test_repairs_keep_the_pipelines() -> None:
    instance = uniform(5)
    base = Plan.of(instance, [Stage(0, 1, "e0"), Stage(1, 2, "e1"), Stage(0, 1, "e2"),
                              Stage(1, 2, "e3")], "given", False, chains=(2, 2))
    live = uniform(5)
    live.nodes = [n for n in live.nodes if n.name != "e3"]
    (repair,) = repair_candidates(live, base)
    assert repair.chains == (2, 2)
    assert [s.node for s in repair.stages] == ["e0", "e1", "e2", "e4"]
    assert math.isclose(repair.bottleneck_ms, base.bottleneck_ms)


SCENARIO = f"""\
name: t
topology: {ROOT / "topologies" / "star-6.yaml"}
model: {{zoo: resnet18}}
planner: {{algorithm: auto, pipelines: PIPELINES}}
workload: {{mode: closed, concurrency: 2, duration: 10s}}
"""


@pytest.mark.parametrize("value,expected", [("auto", 0), ("3", 3), ("1", 1)])
def test_scenario_pipelines(tmp_path: Path, value: str, expected: int) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SCENARIO.replace("PIPELINES", value))
    assert load_scenario(path).pipelines == expected


@pytest.mark.parametrize("value", ["0", "many", "1.5"])
def test_scenario_pipelines_refused(tmp_path: Path, value: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SCENARIO.replace("PIPELINES", value))
    with pytest.raises(InputError) as caught:
        load_scenario(path)
    assert caught.value.field == "planner.pipelines" and caught.value.line == 4


def test_spare_keeps_nodes_out_of_the_plan() -> None:
    # 2 segments on 2 nodes: a plan over all uses both; spare 1 keeps one out (one stage)
    instance = uniform(2)
    assert len({s.node for s in plan_pipelines(instance, "optimal", 5.0, 0).stages}) == 2
    plan = plan_pipelines(instance, "optimal", 5.0, 0, spare=1)
    assert len(plan.stages) == 1 and plan.bottleneck_ms == pytest.approx(200.0)
    # a plan that already leaves nodes unused is kept as it is
    wide = uniform(4)
    assert plan_pipelines(wide, "optimal", 5.0, 0, spare=2).stages == single(wide).stages
    # the spare is the node with the most memory when the cost is the same
    bigger = Instance(wide.segments, wide.input_bytes,
                      [Node(n.name, 1.0, 1000 if n.name == "e1" else 100)
                       for n in uniform(2).nodes], "src", uniform(2).bandwidth_mbps)
    assert [s.node for s in plan_pipelines(bigger, "optimal", 5.0, 0, spare=1).stages] == ["e0"]
    # more spares than nodes can give: it serves with what is left, never with none
    assert len(plan_pipelines(instance, "optimal", 5.0, 0, spare=5).stages) == 1


def test_spare_field_is_read_and_bounded(tmp_path: Path) -> None:
    text = (ROOT / "scenarios" / "node_failure.yaml").read_text().replace(
        "topology: ../", f"topology: {ROOT}/").replace(
        "planner: {algorithm: auto}", "planner: {algorithm: auto, spare: 1}")
    path = tmp_path / "s.yaml"
    path.write_text(text)
    assert load_scenario(path).spare == 1
    path.write_text(text.replace("spare: 1", "spare: 6"))
    with pytest.raises(InputError) as err:
        load_scenario(path)
    assert err.value.field == "planner.spare"
