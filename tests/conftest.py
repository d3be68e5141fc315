"""Shared test plumbing: the `root` marker skips loudly when not root or Mininet is missing."""

from __future__ import annotations

import os
import shutil
import sys

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
