"""Shared test plumbing: the `root` marker skips loudly when not root or Mininet is missing."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def _root_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CI runs as root)"
    if shutil.which("mnexec") is None:
        return "needs Mininet's mnexec (make setup installs it)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problem = _root_problem()
    if problem is None:
        return
    skipped = [item for item in items if "root" in item.keywords]
    for item in skipped:
        item.add_marker(pytest.mark.skip(reason=f"ROOT TEST SKIPPED: {problem}"))
    if skipped:
        print(f"\n*** {len(skipped)} root/Mininet tests will be SKIPPED: {problem} ***",
              file=sys.stderr)


def fresh_run_id(prefix: str) -> str:
    """`prefix` + 3 random base-36 characters: a run id no other test or run is using."""
    return prefix + "".join(secrets.choice("0123456789abcdefghijklmnopqrstuvwxyz")
                            for _ in range(3))


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private run-record directory: clear_stale_runs() in it only ever sees this module's
    runs (and clears whatever a failed test left behind)."""
    from testbed import records
    from testbed.network import clear_stale_runs

    path = tmp_path_factory.mktemp("state")
    old = os.environ.get(records.STATE_ENV)
    os.environ[records.STATE_ENV] = str(path)
    yield path
    clear_stale_runs()
    if old is None:
        del os.environ[records.STATE_ENV]
    else:
        os.environ[records.STATE_ENV] = old
