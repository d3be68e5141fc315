"""benchmarks/recovery.py's `armed` figure: when the first plan's warm standbys were all
loaded, read from the event log (no root)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from testbed.control import events as ev

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_recovery", ROOT / "benchmarks" / "recovery.py")
assert spec is not None and spec.loader is not None
recovery = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recovery)


def log(*standbys_ready: tuple[str, int, float]) -> list[dict[str, Any]]:
    events = [{"t": 100.0, "type": ev.PLAN_DEPLOYED, "epoch": 1},
              {"t": 103.0, "type": ev.CONTINGENCY_READY, "epoch": 1,
               "standbys": ["a:20001", "b:20001"]},
              {"t": 104.0, "type": ev.WORKER_READY, "host": "c", "port": 20000, "epoch": 1}]
    events += [{"t": t, "type": ev.WORKER_READY, "host": host, "port": port, "epoch": 0}
               for host, port, t in standbys_ready]
    return sorted(events, key=lambda e: e["t"])


def test_armed_when_the_last_listed_standby_is_loaded() -> None:
    events = log(("a", 20001, 105.0), ("b", 20001, 131.5), ("c", 20002, 140.0))
    assert recovery.armed_after(events, at=150.0) == 31.5


def test_not_armed_when_a_standby_is_loaded_after_the_fault() -> None:
    events = log(("a", 20001, 105.0), ("b", 20001, 131.5))
    assert recovery.armed_after(events, at=120.0) is None
    assert recovery.armed_after(log(("a", 20001, 105.0)), at=1e9) is None


def test_crash_each_runs_one_crash_per_host_of_the_first_plan_only_when_asked() -> None:
    specs = recovery.scenarios(["h0", "h1", "h2"], 25.0, 340.0,
                               ROOT / "topologies" / "star-6.yaml")
    per_host = sorted(name for name in specs if recovery.chosen(name, "crash-each"))
    assert per_host == ["crash-h0", "crash-h1", "crash-h2"]
    assert [s["target"] for s in specs["crash-h2"]["steps"]] == ["h2"]
    by_default = [name for name in specs if recovery.chosen(name, None)]
    assert by_default == ["crash", "crash-two", "crash-return", "partition", "update",
                          "k8s-wait"]
    assert [n for n in specs if recovery.chosen(n, "crash-two,crash-h1")] == ["crash-two",
                                                                               "crash-h1"]
