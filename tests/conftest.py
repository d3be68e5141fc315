"""Shared test plumbing: the `root` marker skips loudly when not root or Mininet is missing."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from testbed.emulation.dockerd import Dockerd


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
    from testbed.emulation import records
    from testbed.emulation.network import clear_stale_runs

    path = tmp_path_factory.mktemp("state")
    old = os.environ.get(records.STATE_ENV)
    os.environ[records.STATE_ENV] = str(path)
    yield path
    clear_stale_runs()
    if old is None:
        del os.environ[records.STATE_ENV]
    else:
        os.environ[records.STATE_ENV] = old


# --- the image tests (tests/test_image.py, tests/test_controller_image.py) ------------------

RunInImage = Callable[..., "subprocess.CompletedProcess[bytes]"]


@pytest.fixture(scope="module")
def daemon() -> Iterator[Dockerd]:
    """The project's Docker daemon: started if nothing answers, stopped by PID at the end of
    the module only if started here."""
    from testbed.emulation.dockerd import Dockerd

    missing = [tool for tool in ("dockerd", "debootstrap") if shutil.which(tool) is None]
    if missing:
        message = f"needs {', '.join(missing)}: apt-get install docker.io debootstrap"
        if os.environ.get("CI"):
            pytest.fail(message)        # in CI a missing install step must not pass silently
        pytest.skip(message)
    dockerd = Dockerd().start()         # owned only if nothing answered already
    yield dockerd
    dockerd.stop()


@pytest.fixture
def run_in(daemon: Dockerd) -> Iterator[RunInImage]:
    """`run_in(image, *argv, entrypoint=, mounts=)`: a throw-away container with no network.
    Every container is labelled with this test's id and removed at the end."""
    label = f"edgepipe.test={uuid.uuid4().hex[:12]}"

    def _run(image: str, *argv: str, entrypoint: str = "python3",
             mounts: tuple[str, ...] = ()) -> subprocess.CompletedProcess[bytes]:
        volume_args = [arg for m in mounts for arg in ("-v", m)]
        return daemon.docker("run", "--rm", "--network", "none", "--label", label,
                             *volume_args, "--entrypoint", entrypoint, image, *argv,
                             check=False, timeout=120)

    yield _run
    leftover = daemon.docker("ps", "-aq", "--filter", f"label={label}").stdout.split()
    if leftover:
        daemon.docker("rm", "-f", *[c.decode() for c in leftover], check=False)
