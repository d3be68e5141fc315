"""Stage extraction: chaining the stages with onnxruntime reproduces the full model (within
1e-4) at every cut point and at random subsets of cuts, on every zoo model and on hand-made
graphs; the stage files and stages.json keep the contract of docs/architecture.md."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import onnx
import pytest

from formats.errors import InputError
from partitioner import cuts, split, zoo
from partitioner.__main__ import main as cli
from tests.test_cuts import HANDMADE

TOLERANCE = 1e-4
SMALL = ("resnet18", "resnet50", "mobilenetv2", "bert_mini")


class Prepared:
    """A model loaded and shape-inferred once, its cuts, seeded inputs, reference outputs."""

    def __init__(self, model: onnx.ModelProto, **options) -> None:
        self.model = cuts.infer_shapes(model)
        self.analysis = cuts.analyze(self.model, **options)
        self.feeds = split.random_feeds(self.analysis, seed=7)
        self.full = split.run_full(self.model, self.feeds)

    def check(self, cut_indices: list[int]) -> list[split.StageSpec]:
        stages = split.extract_stages(self.model, cut_indices, self.analysis)
        chained = split.run_chain(stages, self.feeds)
        difference = split.max_difference(self.full, chained)
        assert difference <= TOLERANCE, f"cuts {cut_indices}: difference {difference:.3g}"
        return [spec for _, spec in stages]


@pytest.fixture(scope="session")
def prepared() -> dict[str, Prepared]:
    cache: dict[str, Prepared] = {}

    class Lookup(dict):
        def __missing__(self, name: str) -> Prepared:
            cache[name] = Prepared(onnx.load(zoo.ensure_model(name)))
            return cache[name]

    return Lookup()


def _subsets(count: int, seed: int, n: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [sorted(rng.sample(range(count), rng.randint(1, min(count, 6)))) for _ in range(n)]


@pytest.mark.parametrize("name", SMALL)
def test_zoo_chained_stages_match_the_model(prepared, name):
    p = prepared[name]
    count = len(p.analysis.cuts)
    specs = p.check(list(range(count)))           # every cut point at once
    assert len(specs) == count + 1
    for subset in _subsets(count, seed=count):
        p.check(subset)


@pytest.mark.slow
def test_vgg16_chained_stages_match_the_model(prepared):
    p = prepared["vgg16"]
    count = len(p.analysis.cuts)
    assert count == 36
    p.check(list(range(count)))       # one chain over every cut; subsets cost a minute more


@pytest.mark.parametrize("name", sorted(HANDMADE))
def test_handmade_graphs_chain_at_every_cut(name):
    for options in ({}, {"max_tensors": 4, "region_share": 0.0}):
        p = Prepared(HANDMADE[name](), **options)
        count = len(p.analysis.cuts)
        assert count > 0
        p.check(list(range(count)))
        for k in range(count):
            p.check([k])


def test_pass_through_tensors_follow_the_contract(prepared):
    p = prepared["bert_mini"]
    after = {p.analysis.order[c.position - 1]: c.index for c in p.analysis.cuts}
    stages = split.extract_stages(p.model, [after["encoder.0.ffn.norm"],
                                            after["encoder.2.ffn.norm"]], p.analysis)
    (s0, spec0), (s1, spec1), (s2, spec2) = stages
    assert spec0.inputs == ["input_ids", "attention_mask"]
    assert spec0.outputs == ["mask.bias", "encoder.0.ffn.norm"]
    assert spec1.inputs == spec0.outputs
    assert spec1.passthrough == ["mask.bias"]
    assert spec2.outputs == ["last_hidden_state", "pooler_output"]
    # The file of a pass-through stage takes every stage input but computes only the rest.
    assert [i.name for i in s1.graph.input] == spec1.inputs
    assert [o.name for o in s1.graph.output] == ["encoder.2.ffn.norm"]
    # Dropping a pass-through breaks the chain: the next stage misses its input.
    broken = [(s0, spec0), (s1, split.StageSpec(spec1.file, spec1.inputs, spec1.computed)),
              (s2, spec2)]
    with pytest.raises(AssertionError, match="did not send"):
        split.run_chain(broken, p.feeds)


def test_early_graph_output_passes_through_to_the_end():
    p = Prepared(HANDMADE["two_inputs"](), max_tensors=4, region_share=0.0)
    specs = p.check(list(range(len(p.analysis.cuts))))
    assert all("early" in s.outputs for s in specs)
    assert all("early" in s.passthrough for s in specs[1:])
    reader = p.analysis.node_segment["add_y"]      # every cut used: stage k = segment k
    assert all(("y" in s.inputs) == (k <= reader) for k, s in enumerate(specs))


def test_split_model_writes_stage_files(tmp_path):
    path = zoo.ensure_model("mobilenetv2")
    specs = split.split_model(path, [30, 10], tmp_path)
    assert [s.file for s in specs] == ["stage_00.onnx", "stage_01.onnx", "stage_02.onnx"]
    data = json.loads((tmp_path / "stages.json").read_text())
    assert data == [s.to_json() for s in specs]
    assert set(data[0]) == {"file", "inputs", "outputs"}
    assert split.load_stages(tmp_path) == specs
    for spec in specs:
        onnx.checker.check_model(onnx.load(tmp_path / spec.file))
    assert split.check_split(path, tmp_path) <= TOLERANCE
    # A later split with fewer stages leaves no stale stage file behind.
    split.split_model(path, [5], tmp_path)
    assert sorted(p.name for p in tmp_path.glob("stage_*.onnx")) == [
        "stage_00.onnx", "stage_01.onnx"]
    with pytest.raises(InputError, match="out of range"):
        split.split_model(path, [999], tmp_path)


def test_cut_indices_from_plan():
    analysis = cuts.analyze(zoo.ensure_model("resnet18"))
    n = analysis.segment_count
    plan = {"stages": [{"segments": [0, 4], "node": "a"}, {"segments": [4, 9], "node": "b"},
                       {"segments": [9, n], "node": "c"}],
            "model_sha256": "abc", "cuts": [analysis.cuts[3].names, analysis.cuts[8].names]}
    assert split.cut_indices_from_plan(plan, analysis, "abc") == [3, 8]
    with pytest.raises(InputError, match="another model"):
        split.cut_indices_from_plan(plan, analysis, "def")
    with pytest.raises(InputError, match="cut tensors"):
        split.cut_indices_from_plan({**plan, "cuts": [["x"], ["y"]]}, analysis, "abc")
    with pytest.raises(InputError, match="covers"):
        split.cut_indices_from_plan({"stages": plan["stages"][:2]}, analysis)
    with pytest.raises(InputError, match="no stages"):
        split.cut_indices_from_plan({"stages": []}, analysis)


def test_cli_split_by_cuts_and_by_plan(tmp_path, capsys):
    path = zoo.ensure_model("mobilenetv2")
    assert cli(["split", str(path), "--cuts", "4,20", "--out", str(tmp_path / "a")]) == 0
    assert "3 stages written" in capsys.readouterr().out
    assert split.check_split(path, tmp_path / "a") <= TOLERANCE
    assert cli(["split", "mobilenetv2", "--cuts", "4,x", "--out", str(tmp_path / "b")]) == 2
    analysis = cuts.analyze(path)
    plan = {"stages": [{"segments": [0, 12]}, {"segments": [12, analysis.segment_count]}],
            "cuts": [analysis.cuts[11].names]}
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    assert cli(["split", "mobilenetv2", "--plan", str(plan_file),
                "--out", str(tmp_path / "c")]) == 0
    specs = split.load_stages(tmp_path / "c")
    assert specs[0].outputs == analysis.cuts[11].names
    capsys.readouterr()
    assert cli(["cuts", "mobilenetv2", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed["cuts"]) == len(analysis.cuts)
    assert listed["cuts"][11]["bytes"] == analysis.cuts[11].nbytes
    assert cli(["cuts", str(Path(tmp_path / "missing.onnx"))]) == 2


def test_random_feeds_are_seeded():
    analysis = cuts.analyze(zoo.ensure_model("bert_mini"))
    a, b = split.random_feeds(analysis, 3), split.random_feeds(analysis, 3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["attention_mask"].dtype == np.int64 and a["attention_mask"][0, -1] == 0
