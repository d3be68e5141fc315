"""testbed/control/core/versions.py: target, rollout, rollback, switches."""

from __future__ import annotations

import pytest

from testbed.control.core.versions import VersionError, Versions


def test_auto_rollout_of_a_newer_version() -> None:
    versions = Versions(1)
    assert versions.ready(1) == []
    out = versions.ready(2)
    assert [e.kind for e in out] == ["rollout.requested"] and versions.target == 2
    manual = Versions(1, auto_rollout=False)
    manual.ready(1)
    assert manual.ready(2) == [] and manual.target == 1
    assert manual.rollout(2)[0].fields == {"version": 2, "previous": 1,
                                           "reason": "requested by the driver"}
    with pytest.raises(VersionError, match="not known"):
        manual.rollout(7)


def test_switches_and_rollback() -> None:
    versions = Versions(1)
    with pytest.raises(VersionError, match="nothing to roll back"):
        versions.rollback(None)
    assert versions.served(1, 1) == [] and versions.served(1, 2) == []
    switched = versions.served(2, 3)
    assert switched[0].fields == {"version": 2, "previous": 1, "epoch": 3}
    previous, out = versions.rollback(2)
    assert previous == 1 and versions.target == 1
    assert [e.kind for e in out] == ["version.rollback", "rollout.requested"]
