"""Finding an agent's worker processes: children of its own (started as processes) and
children of its launcher (forked; stage_image.launcher), which go by `worker_PORT_...`."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _children(pid: int | str) -> list[str]:
    return subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                          text=True).stdout.split()


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def agent_workers(agent_pid: int) -> list[str]:
    """PIDs of an agent's workers (its launcher is not one)."""
    found = []
    for child in _children(agent_pid):
        if "stage_image.launcher" in _cmdline(child) and \
                not _name(child).startswith("worker_"):
            found += _children(child)
        else:
            found.append(child)
    return found


def _name(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def serves_port(pid: str, port: int) -> bool:
    """Is this the worker of that data port (by its name, or its command line)?"""
    return _name(pid).startswith(f"worker_{port}_") or f"worker_{port}_" in _cmdline(pid)
