"""testbed/control/core/backoff.py: the one back-off rule."""

from __future__ import annotations

from formats.control import UNHEALTHY_CAP_S
from testbed.control.core.backoff import backoff_s


def test_doubles_per_failure_from_the_first() -> None:
    assert [backoff_s(5.0, n) for n in range(5)] == [5.0, 5.0, 10.0, 20.0, 40.0]


def test_capped() -> None:
    assert backoff_s(10.0, 20) == UNHEALTHY_CAP_S
    assert backoff_s(10.0, 3, cap_s=25.0) == 25.0
