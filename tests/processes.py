"""Finding an agent's worker processes: children of its own (started as processes) and
children of its launcher (forked; stage_image.launcher), which go by `worker_PORT_...`."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _children(pid: int | str) -> list[str]:
    return subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                          text=True).stdout.split()


def _read(path: str) -> str:
    try:
        return Path(path).read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def agent_workers(agent_pid: int) -> list[str]:
    """PIDs of an agent's workers (its launcher is not one: the workers it forks are its
    children, the agent's grandchildren)."""
    found = []
    for child in _children(agent_pid):
        if "stage_image.launcher" in _read(f"/proc/{child}/cmdline"):
            found += _children(child)
        else:
            found.append(child)
    return found


def serves_port(pid: str, port: int) -> bool:
    """Is this the worker of that data port (by its name, or its command line)?"""
    return any(f"worker_{port}_" in _read(f"/proc/{pid}/{what}") for what in ("comm", "cmdline"))
