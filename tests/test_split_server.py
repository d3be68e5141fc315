"""The warm splitter the controller uses: the same stages as `partitioner split`, the model
parsed once, and the one-shot child when it cannot serve."""

from __future__ import annotations

import json
import time
from pathlib import Path

from partitioner import zoo
from testbed.control import planning


def test_warm_splits_match_and_a_broken_server_falls_back(tmp_path: Path) -> None:
    model = zoo.resolve_model("resnet18")
    started = time.monotonic()
    planning.split_model(model, [8, 15], tmp_path / "a")
    first = time.monotonic() - started
    started = time.monotonic()
    planning.split_model(model, [7, 12], tmp_path / "b")
    second = time.monotonic() - started
    for name, count in (("a", 3), ("b", 3)):
        specs = json.loads((tmp_path / name / "stages.json").read_text())
        assert len(specs) == count
        assert all((tmp_path / name / s["file"]).stat().st_size > 0 for s in specs)
    print(f"split: first {first:.2f} s (start + parse), second {second:.2f} s (warm)")
    # a bad request is an error reply, not a dead server; a dead server is replaced
    assert planning.SPLITTER.split(tmp_path / "missing.onnx", [1], tmp_path / "c") is not None
    assert planning.SPLITTER.proc is not None
    planning.SPLITTER.proc.kill()
    planning.SPLITTER.proc.wait()
    planning.split_model(model, [8, 15], tmp_path / "d")
    assert (tmp_path / "d" / "stages.json").read_text() == \
        (tmp_path / "a" / "stages.json").read_text()
    assert not list(tmp_path.glob(".*tmp"))
