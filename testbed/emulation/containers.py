"""Docker hosts: a topology host of `kind: docker` runs as two containers of the stage image,
built the way Kubernetes builds a pod (Containernet cannot be installed here, and the
testbed's own wiring needs nothing from it):

- the *network holder* `<node>-net` (`--network none`, an idle `sleep`) owns the host's
  network namespace. The host's Mininet node is a shell in that namespace, so Mininet's veth,
  address and HTB shaping, and the netfilter delay and loss of `testbed.emulation.network`, apply
  to a
  Docker host exactly as to a process host;
- the *machine* `<node>` (`--network container:<node>-net`) is the emulated host: `--cpus`,
  `--memory` (and the same `--memory-swap`: no way out through swap), the run's tmpfs data
  directory bind-mounted at the path it has on the driver's side (so the agent's
  `--data-dir` and the io.* faults, which act on that tmpfs from the root namespace, are
  the same for both kinds of host), and the driver's shared directories (the results
  directory: worker logs). Its main process is an idle `sleep` under docker-init (which reaps
  orphans); the software (the agent) comes in by `docker exec`. So `docker kill` and
  `docker start` give back an empty machine whose network is still there, as after a power
  cut, and the driver starts its agent again.

Both containers sit under a parent cgroup named after the Mininet node (`--cgroup-parent`),
like a pod's cgroup: the host's CPU and memory use are read there (`testbed.emulation.hostmon`), the
parent carries the host's memory limit as well, and the run removes the parents at teardown.

Division of labour: `testbed.emulation.dockerd` runs the daemon; this module creates, drives and
inspects one run's containers; `testbed.emulation.network` wires them into the emulated network and
maps host faults onto the methods here; `testbed.emulation.records.undo` removes the containers
(also
those of a dead run, by name and by the run's label).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from formats.topology import HostSpec
from testbed.emulation import records
from testbed.emulation.dockerd import APP_LABEL, RUN_LABEL, Dockerd, docker_cli, image_label
from testbed.emulation.records import CGROUP_ROOT, RunRecord


def memory_group_bytes(spec: HostSpec) -> int:
    """A host's memory group limit: its memory and its disk. The disk is a tmpfs, whose pages
    are charged to the group of the process that writes them (the agent fetching models), so
    a group of `memory` alone left the host's workers that much less: on hetero-6, small1
    (256 MiB, a 128 MiB disk holding staged models) had a 37.5 MB stage's worker killed for
    memory the controller had counted as free. The disk's size still bounds its share."""
    return spec.memory_bytes + spec.disk_bytes

log = logging.getLogger(__name__)

HOST_LABEL = "edgepipe.host"
IDLE = ("sleep", "infinity")      # the machine's main process: nothing runs until exec'd
DOCKER_TIMEOUT_S = 60.0
EXEC_START_TIMEOUT_S = 10.0


class ContainerError(RuntimeError):
    """A Docker host could not be created or driven (the message says which and why)."""


@dataclass
class Container:
    """The machine container of one Docker host."""

    host: str                 # topology name
    node: str                 # Mininet node name: container name and cgroup parent
    id: str
    init_pid: int | None = None   # docker-init in the root PID namespace; None when stopped


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def _cmdline(pid: int) -> tuple[str, ...]:
    try:
        return tuple(Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1])
    except (OSError, UnicodeDecodeError):
        return ()


class DockerHosts:
    """The Docker hosts of one run, on one daemon. Every container is written to the run's
    record before it is created."""

    def __init__(self, daemon: Dockerd, record: RunRecord) -> None:
        self.daemon = daemon
        self.record = record
        self.containers: dict[str, Container] = {}

    def _docker(self, *args: str) -> str:
        return self.daemon.docker(*args, timeout=DOCKER_TIMEOUT_S).stdout.decode().strip()

    # -- images --------------------------------------------------------------------------

    def check_image(self, image: str, app_digest: str) -> None:
        """Refuse an image the daemon lacks, or one built from other agent/worker code than
        this checkout's (an image without the label, e.g. from a registry, is trusted)."""
        found = image_label(self.daemon, image, APP_LABEL)
        if found is None:
            raise ContainerError(f"image {image} is not in the Docker daemon at "
                                 f"{self.daemon.host}: build it with `make image` "
                                 "(python -m testbed.emulation.images)")
        if found and found != app_digest:
            raise ContainerError(f"image {image} was built from other stage_image/ code than "
                                 "this checkout's: rebuild it with `make image`")

    # -- lifecycle -----------------------------------------------------------------------

    def create(self, host: str, node: str, spec: HostSpec, image: str,
               binds: Sequence[Path]) -> int:
        """Start the host's two containers; returns the PID of the network holder, whose
        network namespace is the host's. `binds` are directories mounted read-write at the
        same path inside the machine."""
        common = ["--label", f"{RUN_LABEL}={self.record.run_id}", "--label",
                  f"{HOST_LABEL}={host}", "--init", "--log-driver", "none",
                  "--cgroup-parent", f"/{node}", "--cap-drop", "ALL",
                  "--security-opt", "no-new-privileges", "--entrypoint", IDLE[0]]
        holder = f"{node}-net"
        self.record.add("containers", holder)
        self._docker("run", "-d", "--name", holder, "--network", "none", *common, image,
                     *IDLE[1:])
        holder_pid = int(self._docker("inspect", "-f", "{{.State.Pid}}", holder))
        memory = ["--memory", str(memory_group_bytes(spec))]
        if (CGROUP_ROOT / "memory" / "memory.memsw.limit_in_bytes").exists():
            memory += ["--memory-swap", str(memory_group_bytes(spec))]
        mounts = [arg for path in binds
                  for arg in ("--mount", f"type=bind,source={path},target={path}")]
        self.record.add("containers", node)
        # Root in the container (with no capabilities): the data directory and the shared
        # directories belong to root, as on a process host.
        container_id = self._docker(
            "run", "-d", "--name", node, "--network", f"container:{holder}",
            "--cpus", f"{spec.cpu:g}", *memory, "--user", "0:0", *mounts, *common, image,
            *IDLE[1:])
        container = Container(host, node, container_id)
        self.containers[host] = container
        self._refresh(container)
        return holder_pid

    def _refresh(self, container: Container) -> None:
        """Read the machine's init PID again (it changes with every start)."""
        state = self._docker("inspect", "-f", "{{.State.Running}} {{.State.Pid}}",
                             container.node).split()
        container.init_pid = int(state[1]) if state[0] == "true" else None

    def running(self, host: str) -> bool:
        return self.containers[host].init_pid is not None

    def kill(self, host: str) -> None:
        """`docker kill`: every process of the machine dies at once (a paused machine too:
        the daemon thaws it to deliver the signal)."""
        container = self.containers[host]
        killed = self.daemon.docker("kill", container.node, check=False,
                                    timeout=DOCKER_TIMEOUT_S)
        self._refresh(container)
        if container.init_pid is not None:  # still running: the kill itself failed
            raise ContainerError(f"docker kill {container.node}: "
                                 f"{killed.stderr.decode(errors='replace').strip()}")

    def start(self, host: str) -> None:
        """`docker start` a killed machine (the idle init again, no software); nothing if
        it runs."""
        container = self.containers[host]
        self._refresh(container)
        if container.init_pid is None:
            self._docker("start", container.node)
            self._refresh(container)

    def pause(self, host: str) -> None:
        self._docker("pause", self.containers[host].node)

    def unpause(self, host: str) -> None:
        if self.paused(host):
            self._docker("unpause", self.containers[host].node)

    def paused(self, host: str) -> bool:
        state = CGROUP_ROOT / self.cgroup(host, "freezer") / "freezer.state"
        try:
            return state.read_text().strip() != "THAWED"
        except OSError:
            return False

    def cpus(self, host: str) -> float:
        """The machine's CPU limit in force (what `--cpus` / `docker update` set), in cores."""
        cpu = CGROUP_ROOT / self.cgroup(host, "cpu")
        quota = int((cpu / "cpu.cfs_quota_us").read_text())
        period = int((cpu / "cpu.cfs_period_us").read_text())
        return float(os.cpu_count() or 1) if quota < 0 else quota / period

    def set_cpus(self, host: str, cores: float) -> None:
        self._docker("update", "--cpus", f"{cores:g}", self.containers[host].node)

    # -- processes -----------------------------------------------------------------------

    def cgroup(self, host: str, controller: str) -> str:
        """The machine's own cgroup ("memory/<node>/<id>"), under the host's parent."""
        container = self.containers[host]
        return f"{controller}/{container.node}/{container.id}"

    def pids(self, host: str) -> list[int]:
        """The machine's software: its processes except the idle init and its `sleep`
        (orphans that docker-init adopted are software and count)."""
        init = self.containers[host].init_pid
        return [pid for pid in records.cgroup_pids(self.cgroup(host, "memory"))
                if pid != init and not (_ppid(pid) == init and _cmdline(pid) == IDLE)]

    def exec_argv(self, host: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
                  cwd: str | Path | None = None) -> list[str]:
        """The `docker exec` command line that runs `argv` in the machine, with `env` added
        to the image's environment."""
        if not self.running(host):
            raise ContainerError(f"docker host {host} is not running (crashed?)")
        options = [arg for key, value in (env or {}).items() for arg in ("-e", f"{key}={value}")]
        if cwd is not None:
            options += ["-w", str(cwd)]
        return [docker_cli(), "-H", self.daemon.host, "exec", *options,
                self.containers[host].node, *argv]

    def wait_exec(self, host: str, argv: Sequence[str], before: Collection[int],
                  client: subprocess.Popen[bytes]) -> None:
        """Return once `argv`, started by the docker client `client`, runs in the machine (a
        process not in `before` with that command line), or the client has exited. Until
        then runc's init for the exec sits in the container's cgroup: a `docker pause` then
        freezes it half-way and the daemon's lock on the container is never released (every
        later docker command on it hangs). So nothing pauses a host while an exec starts."""
        deadline = time.monotonic() + EXEC_START_TIMEOUT_S
        while client.poll() is None:
            if any(_cmdline(pid) == tuple(argv) for pid in self.pids(host)
                   if pid not in before):
                return
            if time.monotonic() > deadline:
                log.warning("%s in docker host %s not running after %.0f s", argv[0], host,
                            EXEC_START_TIMEOUT_S)
                return
            time.sleep(0.01)
