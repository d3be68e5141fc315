"""testbed/control/core/reconcile.py: a host's heartbeat against the workers we want there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from testbed.control.core import reconcile
from testbed.control.core.records import Slot
from testbed.control.planning import StageFile

FILE = StageFile(Path("/m/s0.onnx"), "a" * 64, 10, ["x"], ["y"])


def slot(port: int, routes: dict[int, int], standby: bool = False,
         sent: dict[int, float] | None = None) -> Slot:
    return Slot("e1", port, 1, 0, 1, FILE, standby, routes=dict(routes), sent=sent or {})


def entry(port: int, routes: list[list[int]], state: str = "ready",
          sha: str = "a" * 64) -> dict[str, Any]:
    return {"port": port, "sha256": sha, "state": state, "routes": routes, "standby": False,
            "load": [3, 1.5]}


def test_missing_routes_are_asked_again_after_resend_s_in_live_epochs_only() -> None:
    wanted = slot(20000, {3: 0, 4: 0}, sent={3: 9.5, 4: 0.0})
    steps = reconcile.compare([wanted], {20000: entry(20000, [])}, {3: "active", 4: "retired"},
                              now=10.0, resend_s=1.0)
    observed = [s for s in steps if isinstance(s, reconcile.Observed)]
    assert observed and observed[0].confirmed == frozenset() and observed[0].load == [3, 1.5]
    assert not [s for s in steps if isinstance(s, reconcile.Resend)]  # 3: asked 0.5 s ago
    steps = reconcile.compare([wanted], {20000: entry(20000, [])}, {3: "active", 4: "retired"},
                              now=11.0, resend_s=1.0)
    assert [(s.epoch) for s in steps if isinstance(s, reconcile.Resend)] == [3]


def test_confirmed_failed_and_standby() -> None:
    serving = slot(20000, {3: 0})
    failed = slot(20001, {3: 1})
    standby = slot(20002, {}, standby=True)
    steps = reconcile.compare([serving, failed, standby],
                              {20000: entry(20000, [[3, 0], [2, 0]]),
                               20001: entry(20001, [], state="exited")},
                              {3: "active"}, now=5.0, resend_s=1.0)
    kinds = [(type(s).__name__, s.slot.port) for s in steps]
    assert kinds == [("Observed", 20000), ("Failed", 20001), ("Reprepare", 20002)]
    assert steps[0].confirmed == frozenset({3})          # 2 is not ours to confirm


def test_unwanted_workers_and_routes() -> None:
    mine = {20000: slot(20000, {3: 0})}
    asks = reconcile.unwanted(mine, [entry(20000, [[3, 0], [1, 0]]),
                                     entry(20009, []), entry(20010, [], state="failed"),
                                     entry(20000, [], sha="b" * 64)], live_epochs={3})
    assert asks == [reconcile.Withdraw(20000, 1), reconcile.Unwanted(20009),
                    reconcile.Unwanted(20000)]
