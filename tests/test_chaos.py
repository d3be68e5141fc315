"""Seeded chaos schedules (benchmarks/chaos.py): drawn schedules are valid scenarios and the
same for the same seed (no root); two short seeded schedules run on the real emulator (root):
nothing lost or wrong, each request delivered once."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from formats.scenario import load_scenario
from formats.topology import load_topology

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import chaos  # noqa: E402


@pytest.mark.parametrize("topology", chaos.TOPOLOGIES)
def test_drawn_schedules_are_valid_and_reproducible(tmp_path: Path, topology: str) -> None:
    topo = load_topology(ROOT / topology)
    kinds = set()
    for i in range(40):
        first = chaos.draw_schedule(random.Random(i), topo, 30.0)
        assert first == chaos.draw_schedule(random.Random(i), topo, 30.0)
        path = tmp_path / f"s{i}.yaml"
        chaos.write_schedule(path, f"s{i}", ROOT / topology, "resnet18", 30.0, first)
        scenario = load_scenario(path)          # refused (InputError) if not valid
        assert all(4 <= s.at_s <= 29 for s in scenario.steps)
        kinds |= {s.action for s in scenario.steps}
    assert {"node.crash", "node.restart", "node.pause", "link.partition", "node.cpu",
            "io.disk_full", "model.update", "model.rollback"} <= kinds


@pytest.mark.root
@pytest.mark.slow
def test_two_short_seeded_schedules_on_the_emulator(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "chaos.py"),
                             "--seed", "7", "--schedules", "2", "--duration", "short",
                             "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=900)
    report = json.loads((tmp_path / "chaos.json").read_text())
    assert len(report["runs"]) == 2, result.stdout + result.stderr[-3000:]
    for run in report["runs"]:
        assert "error" not in run, run
        assert (run["lost"], run["mismatched"]) == (0, 0), run
        assert run["faults"], run
        # a partition that heals delivers what was stuck behind it after its requests were
        # replayed on the same epoch: those extra copies are counted (`duplicates`), never
        # delivered: every request has one row, answered
        with (tmp_path / run["schedule"] / "requests.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        assert rows and len({r["rid"] for r in rows}) == len(rows), run["schedule"]
        assert {r["status"] for r in rows} == {"completed"}, run["schedule"]
    assert "kind" in result.stdout and "chaos-s7-01" in result.stdout
