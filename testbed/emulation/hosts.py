"""The two kinds of emulated host as classes: `ProcessHost` (a Mininet host: its own network
and mount namespaces, cpu and memory cgroups of its own, programs started with `cgexec ...
mnexec -a`) and `DockerHost` (the containers of testbed.emulation.containers, programs
started with `docker exec`). Each knows how to start a program in the host, list and signal
its processes, and the host faults: kill, crash and start again, pause and resume, the CPU
limit.

Division of labour: testbed.emulation.network builds the network (both kinds' Mininet nodes,
so links, shaping and partitions are the same code for both) and owns the run record; it
picks the host's class (`EmulatedNetwork.host`) and its public methods (`popen`,
`kill_host`, `pause_host`, ...) hand the work to it. Commands the driver runs for a fault go
through `mnexec -a` from the root namespace, outside the host's cgroups, so they land on time
whatever the host's CPU quota.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from formats.topology import MIN_CPU
from testbed.emulation import records
from testbed.emulation.containers import DockerHosts
from testbed.emulation.links import NetworkError
from testbed.emulation.records import CGROUP_ROOT, RunRecord

REPO_ROOT = Path(__file__).resolve().parents[2]
FREEZE_TIMEOUT_S = 5.0
# Warm standbys load inside the host's CPU quota (a real device pays for them too) but in a
# group of their own under it, whose quota the agent caps at the scenario's
# `control.standby_share` of the host's: the cap is what holds them back, since on a machine
# with several CPUs a loading standby and a serving stage run at once and draw on the same
# quota whatever their weights (measured: a busy loop in the group capped at a quarter, beside
# a busy serving loop, took 0.076 of a 0.3-core host; with equal weights it would take half).
# The lowest weight still lets the serving stage go first where both wait for one CPU.
STANDBY_CPU_WEIGHT = 2                  # cpu.shares: the kernel's minimum


class Network(Protocol):
    """What a host needs of testbed.emulation.network.EmulatedNetwork."""

    record: RunRecord | None
    names: dict[str, str]

    def node(self, name: str) -> Any: ...
    def in_host(self, host: str, argv: Sequence[str]) -> str: ...
    def containers(self) -> DockerHosts: ...
    def track(self, proc: subprocess.Popen[bytes], host: str, what: str) -> None: ...


def _write(path: Path, value: str | int) -> None:
    path.write_text(f"{value}\n")


def _cfs(group: Path, name: str) -> int:
    """A cpu group's CFS `quota` or `period`, in microseconds (quota -1: no limit)."""
    return int((group / f"cpu.cfs_{name}_us").read_text())


class EmulatedHost:
    """What both kinds share; the subclasses say how."""

    def __init__(self, network: Network, name: str) -> None:
        self.network, self.name = network, name

    @property
    def mn(self) -> str:
        """The Mininet node name (`<run id>h<i>`)."""
        return self.network.names[self.name]

    # -- programs --------------------------------------------------------------------------

    def command(self, argv: Sequence[str], env: Mapping[str, str] | None,
                cwd: str | Path | None) -> tuple[list[str], dict[str, str] | None,
                                                 str | Path | None]:
        """(argv, environment, cwd) of the process to start for `argv` in the host."""
        raise NotImplementedError

    def python(self, args: Sequence[str],
               env: Mapping[str, str] | None) -> tuple[list[str], dict[str, str]]:
        """argv and env of Python running the project's code in the host."""
        raise NotImplementedError

    def label(self, argv: Sequence[str]) -> str:
        return os.path.basename(argv[0])

    def popen(self, argv: Sequence[str], log_path: str | Path,
              env: Mapping[str, str] | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen[bytes]:
        """EmulatedNetwork.popen for this host (its docstring)."""
        before = self.before_start()
        command, full_env, cwd = self.command(argv, env, cwd)
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
                                    start_new_session=True)
        self.network.track(proc, self.name, self.label(argv))
        self.started(argv, before, proc)
        return proc

    def before_start(self) -> list[int]:
        """What `started` needs to know from before the start."""
        return []

    def started(self, argv: Sequence[str], before: list[int],
                proc: subprocess.Popen[bytes]) -> None:
        """After the start: wait until the program runs where it should."""

    def run(self, argv: Sequence[str],
            timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        command, _, _ = self.command(argv, None, None)
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False)

    # -- processes and faults --------------------------------------------------------------

    def pids(self) -> list[int]:
        raise NotImplementedError

    def memory_cgroup(self) -> str:
        raise NotImplementedError

    def signal(self, sig: int) -> int:
        cgroup = self.memory_cgroup()
        return sum(records.signal_verified(pid, sig, lambda p: records.in_cgroup(p, cgroup))
                   for pid in self.pids())

    def kill(self) -> int:
        raise NotImplementedError

    def crash(self) -> int:
        """Every process killed (the interface is the network's business)."""
        raise NotImplementedError

    def start(self) -> None:
        """After a crash, what the host needs before its interface comes up."""

    def paused(self) -> bool:
        raise NotImplementedError

    def pause(self) -> int:
        raise NotImplementedError

    def resume(self) -> None:
        raise NotImplementedError

    def cpu(self) -> float:
        raise NotImplementedError

    def set_cpu(self, cores: float) -> None:
        raise NotImplementedError

    def standby_cgroup(self) -> Path | None:
        """The cpu group for the host's standby workers, if it has one of its own."""
        return None

    def make_standby_cgroup(self) -> None:
        """Make the group standby_cgroup() names."""

    def _wait_gone(self, timeout_s: float = 3.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.01)


class ProcessHost(EmulatedHost):
    """A Mininet host: namespaces, cgroups of its own, a freezer cgroup made on first use."""

    def prefix(self) -> list[str]:
        return ["cgexec", "-g", f"cpu,cpuacct:/{self.mn}", "-g", f"memory:/{self.mn}",
                "mnexec", "-a", str(self.network.node(self.name).pid)]

    def command(self, argv: Sequence[str], env: Mapping[str, str] | None,
                cwd: str | Path | None) -> tuple[list[str], dict[str, str] | None,
                                                 str | Path | None]:
        # cgexec and mnexec exec() into argv: the PID is the program's own.
        return [*self.prefix(), *argv], {**os.environ, **(env or {})}, cwd

    def python(self, args: Sequence[str],
               env: Mapping[str, str] | None) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, *args], {**(env or {}), "PYTHONPATH": str(REPO_ROOT)}

    def pids(self) -> list[int]:
        shell = self.network.node(self.name).pid
        return [pid for pid in records.cgroup_pids(self.memory_cgroup()) if pid != shell]

    def memory_cgroup(self) -> str:
        return f"memory/{self.mn}"

    def kill(self) -> int:
        killed = self.signal(signal.SIGKILL)
        if self.paused():  # a frozen task dies only once thawed
            self.resume()
        self._wait_gone()
        return killed

    def crash(self) -> int:
        return self.kill()

    def freezer(self) -> Path:
        return CGROUP_ROOT / "freezer" / self.mn

    def paused(self) -> bool:
        state = self.freezer() / "freezer.state"
        return state.exists() and state.read_text().strip() != "THAWED"

    def pause(self) -> int:
        record = self.network.record
        assert record is not None
        freezer = self.freezer()
        cgroup = f"freezer/{self.mn}"
        if not freezer.exists():
            record.add("cgroups", cgroup)
            freezer.mkdir()
        for _ in range(10):  # a process may fork between listing and moving its parent
            outside = [pid for pid in self.pids() if not records.in_cgroup(pid, cgroup)]
            if not outside:
                break
            for pid in outside:
                with contextlib.suppress(ProcessLookupError):
                    _write(freezer / "cgroup.procs", pid)
        _write(freezer / "freezer.state", "FROZEN")
        self._wait_freezer(freezer, "FROZEN")
        return len(records.cgroup_pids(cgroup))

    def resume(self) -> None:
        freezer = self.freezer()
        if freezer.exists():
            _write(freezer / "freezer.state", "THAWED")
            self._wait_freezer(freezer, "THAWED")

    @staticmethod
    def _wait_freezer(freezer: Path, state: str) -> None:
        deadline = time.monotonic() + FREEZE_TIMEOUT_S
        while (freezer / "freezer.state").read_text().strip() != state:
            if time.monotonic() > deadline:
                raise NetworkError(f"{freezer} did not reach {state}")
            time.sleep(0.005)

    def cpu_cgroup(self) -> Path:
        return CGROUP_ROOT / "cpu" / self.mn

    def cpu(self) -> float:
        cpu = self.cpu_cgroup()
        quota, period = _cfs(cpu, "quota"), _cfs(cpu, "period")
        return float(os.cpu_count() or 1) if quota < 0 else quota / period

    def set_cpu(self, cores: float) -> None:
        cpu, standby = self.cpu_cgroup(), self.standby_cgroup()
        period = _cfs(cpu, "period")
        # the standbys' cap keeps its share of the host's quota; a child's quota may never
        # exceed its parent's (EINVAL), so the one that shrinks goes first
        share = 1.0
        if standby.is_dir():
            share = min(1.0, max(0, _cfs(standby, "quota")) / max(1, _cfs(cpu, "quota")))
        order = [(cpu, 1.0), (standby, share)]
        if cores < self.cpu():
            order.reverse()
        for group, part in order:
            if group.is_dir():
                _write(group / "cpu.cfs_period_us", period)
                _write(group / "cpu.cfs_quota_us", max(1000, int(cores * part * period)))

    def standby_cgroup(self) -> Path:
        """The cpu group, under the host's, that the agent moves standby workers to."""
        return self.cpu_cgroup() / "standby"

    def make_standby_cgroup(self) -> None:
        """Make the standbys' group, at first with the host's quota (the agent narrows it;
        removed with the host's group: records.remove_cgroup)."""
        cpu, group = self.cpu_cgroup(), self.standby_cgroup()
        group.mkdir(exist_ok=True)
        _write(group / "cpu.shares", STANDBY_CPU_WEIGHT)
        _write(group / "cpu.cfs_period_us", _cfs(cpu, "period"))
        _write(group / "cpu.cfs_quota_us", _cfs(cpu, "quota"))


class DockerHost(EmulatedHost):
    """A host of `kind: docker`: its machine container (testbed.emulation.containers)."""

    @property
    def docker(self) -> DockerHosts:
        return self.network.containers()

    def command(self, argv: Sequence[str], env: Mapping[str, str] | None,
                cwd: str | Path | None) -> tuple[list[str], dict[str, str] | None,
                                                 str | Path | None]:
        # the docker client runs with the driver's environment; `env` goes into the exec
        return self.docker.exec_argv(self.name, argv, env, cwd), None, None

    def python(self, args: Sequence[str],
               env: Mapping[str, str] | None) -> tuple[list[str], dict[str, str]]:
        return ["python3", *args], dict(env or {})

    def label(self, argv: Sequence[str]) -> str:
        return f"docker exec {os.path.basename(argv[0])}"

    def before_start(self) -> list[int]:
        return self.pids()

    def started(self, argv: Sequence[str], before: list[int],
                proc: subprocess.Popen[bytes]) -> None:
        self.docker.wait_exec(self.name, argv, before, proc)

    def pids(self) -> list[int]:
        return self.docker.pids(self.name)

    def memory_cgroup(self) -> str:
        return self.docker.cgroup(self.name, "memory")

    def kill(self) -> int:
        """The container killed and started again (its network stays: the container's
        netns is held by its holder)."""
        killed = len(self.pids())
        self.docker.kill(self.name)
        self.docker.start(self.name)
        return killed

    def crash(self) -> int:
        killed = len(self.pids())
        self.docker.kill(self.name)
        return killed

    def start(self) -> None:
        self.docker.start(self.name)

    def paused(self) -> bool:
        return self.docker.paused(self.name)

    def pause(self) -> int:
        self.docker.pause(self.name)
        return len(self.pids())

    def resume(self) -> None:
        self.docker.unpause(self.name)

    def cpu(self) -> float:
        return self.docker.cpus(self.name)

    def set_cpu(self, cores: float) -> None:
        self.docker.set_cpus(self.name, cores)


def check_cores(cores: float) -> None:
    machine = os.cpu_count() or 1
    if not MIN_CPU <= cores <= machine:
        raise ValueError(f"cpu {cores:g} must be between {MIN_CPU} and {machine} cores")
