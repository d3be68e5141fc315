"""Per-run records of everything a run creates on the machine, and the one way to remove it.

Division of labour: `testbed.emulation.network` decides what to create and writes each item here
*before* creating it (so a `kill -9` at any point leaves a record that covers what exists);
this module keeps the record on disk and `undo()` removes what a record lists. The same
`undo()` ends every normal run and clears runs whose driver died, so the recovery path is
exercised all the time, not only after crashes.

Safety on a shared machine: nothing is removed by pattern or by process name. Interfaces,
bridges, cgroups and containers are removed only by recorded name (containers also by the
run's label), and only if the name starts with the run's id; processes are signalled through
a pidfd after checking that the PID is still the process we started (same start time) or
still sits in one of the run's cgroups or network namespaces; mounts are unmounted only if
they are still our tmpfs (source `edgepipe-<run>`).

Records are JSON files `<state dir>/<run id>.json`, the state dir being `/run/edgepipe/runs`
or `$EDGEPIPE_STATE_DIR`. They are replaced atomically (write + rename) on every change.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_ENV = "EDGEPIPE_STATE_DIR"
DEFAULT_STATE_DIR = Path("/run/edgepipe/runs")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory")
# Made only when a fault needs one (node.pause); recorded like the others.
FAULT_CONTROLLERS = ("freezer",)
# A Docker host's containers sit under a parent cgroup named after the host in every
# hierarchy runc joins (`--cgroup-parent`); runc makes the parents, the run removes them.
CONTAINER_CONTROLLERS = ("blkio", "devices", "freezer", "pids", "systemd", "unified")
RUN_ID = re.compile(r"[a-z][a-z0-9]{1,5}")
MOUNT_SOURCE = "edgepipe-{run_id}"


def state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR)


def process_start_time(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat), or
    None when it does not exist. Together with the PID it names one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and ')': split after its last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def process_gone(pid: int, start: int | None) -> bool:
    """Has the process (PID + start time) exited? A zombie counts as gone: it holds no
    resources, and its reaper (init, once the driver died) may take a moment."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0] == "Z" or (start is not None and int(fields[19]) != start)


@dataclass
class RunRecord:
    """What one run created. List fields are appended to as things are created."""

    run_id: str
    driver_pid: int
    driver_start: int
    run_dir: str
    topology: str = ""
    created: float = 0.0
    status: str = "building"          # building | up | stopping | dirty
    nodes: dict[str, str] = field(default_factory=dict)   # mininet name -> topology name
    bridges: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)   # veth ends, either namespace
    cgroups: list[str] = field(default_factory=list)      # "memory/h3abch1"
    netns: dict[str, int] = field(default_factory=dict)  # mininet host -> netns inode
    mounts: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)         # created by us: rmdir if empty
    trees: list[str] = field(default_factory=list)        # created by us: removed whole
    forward_rules: list[str] = field(default_factory=list)  # bridges with an ACCEPT rule
    containers: list[str] = field(default_factory=list)   # Docker hosts' containers
    docker_host: str = ""                                  # the daemon they run on
    processes: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    # -- file ------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return state_dir() / f"{self.run_id}.json"

    @classmethod
    def claim(cls, run_id: str, run_dir: Path, topology: str = "") -> RunRecord:
        """Create the record of a new run; FileExistsError if the id is taken."""
        if not RUN_ID.fullmatch(run_id):
            raise ValueError(f"run id {run_id!r} must be 2-6 lowercase letters/digits, "
                             "starting with a letter")
        pid = os.getpid()
        record = cls(run_id=run_id, driver_pid=pid, driver_start=process_start_time(pid) or 0,
                     run_dir=str(run_dir), topology=topology, created=time.time())
        record.path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two drivers picking the same id cannot both own it.
        fd = os.open(record.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        record.save()
        return record

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        data = json.loads(path.read_text())
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self) -> None:
        tmp = self.path.with_name(f".{self.run_id}.json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, self.path)

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # -- adding --------------------------------------------------------------------------

    def add(self, kind: str, *values: str) -> None:
        """Append names to one of the list fields (bridges, interfaces, cgroups, mounts, dirs,
        trees, forward_rules, containers) and save, before the things themselves are
        created."""
        items: list[str] = getattr(self, kind)
        for value in values:
            self.check_owned(kind, value)
            if value not in items:
                items.append(value)
        self.save()

    def add_process(self, pid: int, start: int | None, host: str, what: str) -> None:
        self.processes.append({"pid": pid, "start": start, "host": host, "what": what})
        self.save()

    def set_status(self, status: str) -> None:
        self.status = status
        self.save()

    def check_owned(self, kind: str, value: str) -> None:
        """Refuse to record a name the run does not own: undo() must never touch others'."""
        name = value.split("/", 1)[1] if kind == "cgroups" else value
        if kind in ("bridges", "interfaces", "cgroups", "forward_rules", "containers"):
            if not name.startswith(self.run_id) or "/" in name or name in (".", ".."):
                raise ValueError(f"{kind} entry {value!r} is not named after run {self.run_id}")
        if kind == "cgroups" and value.split("/", 1)[0] not in (
                *CGROUP_CONTROLLERS, *FAULT_CONTROLLERS, *CONTAINER_CONTROLLERS):
            raise ValueError(f"unknown cgroup controller in {value!r}")
        if kind in ("mounts", "dirs", "trees") and not Path(value).is_absolute():
            raise ValueError(f"{kind} entry {value!r} must be an absolute path")
        if kind == "trees" and self.run_id not in Path(value).parts:
            raise ValueError(f"trees entry {value!r} has no component named after run "
                             f"{self.run_id}")

    # -- state ---------------------------------------------------------------------------

    def driver_alive(self) -> bool:
        """Is the process that built this run still the same running process?"""
        return process_start_time(self.driver_pid) == self.driver_start


def list_records() -> list[RunRecord]:
    """Every readable run record in the state dir (unreadable ones are skipped)."""
    records = []
    directory = state_dir()
    if not directory.is_dir():
        return records
    for path in sorted(directory.glob("*.json")):
        with contextlib.suppress(OSError, ValueError, TypeError):
            records.append(RunRecord.load(path))
    return records


# -- removal -------------------------------------------------------------------------------


def signal_verified(pid: int, sig: int, check: Any) -> bool:
    """Send `sig` to `pid` only if `check(pid)` holds once a pidfd pins the process (so the
    PID cannot be reused between the check and the signal)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not check(pid):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def cgroup_pids(cgroup: str) -> list[int]:
    """PIDs in a cgroup ("memory/h3abch1"), [] if it does not exist."""
    try:
        text = (CGROUP_ROOT / cgroup / "cgroup.procs").read_text()
    except OSError:
        return []
    return [int(word) for word in text.split()]


def in_cgroup(pid: int, cgroup: str) -> bool:
    controller, name = cgroup.split("/", 1)
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(",") and path == f"/{name}":
            return True
    return False


def _netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def in_run_netns(pid: int, inodes: set[int], run_id: str) -> bool:
    """The process is in one of the run's network namespaces. Namespace inode numbers can be
    reused once a namespace dies, so also require an interface named after the run in it.
    The root namespace (which holds our bridges, so would pass that test) never counts."""
    inode = _netns_inode(pid)
    if inode is None or inode not in inodes or inode in (_netns_inode(1),
                                                         _netns_inode(os.getpid())):
        return False
    try:
        devices = Path(f"/proc/{pid}/net/dev").read_text()
    except OSError:
        return False
    names = [line.split(":", 1)[0].strip() for line in devices.splitlines()[2:]]
    return any(name.startswith(run_id) for name in names)


def kill_recorded(record: RunRecord, timeout_s: float = 3.0) -> list[str]:
    """SIGKILL every recorded process that is still the one we started, and wait for them."""
    signalled = []
    for proc in record.processes:
        pid, start = proc["pid"], proc.get("start")
        if start is None:
            continue
        if signal_verified(pid, signal.SIGKILL, lambda p, s=start: process_start_time(p) == s):
            signalled.append((pid, start))
    deadline = time.monotonic() + timeout_s
    while signalled and time.monotonic() < deadline:
        signalled = [(pid, start) for pid, start in signalled if not process_gone(pid, start)]
        time.sleep(0.02)
    return [f"process {pid} of run {record.run_id} survived SIGKILL" for pid, _ in signalled]


def kill_cgroup_members(record: RunRecord, timeout_s: float = 5.0) -> list[str]:
    """SIGKILL everything in the run's cgroups and namespaces until they are empty."""
    deadline = time.monotonic() + timeout_s
    inodes = set(record.netns.values())
    while True:
        victims = 0
        for cgroup in record.cgroups:
            for pid in cgroup_pids(cgroup):
                if signal_verified(pid, signal.SIGKILL, lambda p, c=cgroup: in_cgroup(p, c)):
                    victims += 1
        if inodes:
            for entry in os.scandir("/proc"):
                if entry.name.isdigit() and int(entry.name) != os.getpid():
                    pid = int(entry.name)
                    if signal_verified(pid, signal.SIGKILL, lambda p: in_run_netns(
                            p, inodes, record.run_id)):
                        victims += 1
        if victims == 0:
            return []
        if time.monotonic() > deadline:
            return [f"processes of run {record.run_id} survived SIGKILL for {timeout_s:.0f}s"]
        time.sleep(0.05)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def delete_interface(name: str) -> str | None:
    """Delete a root-namespace interface (veth or bridge) if it exists; a problem or None."""
    if not Path("/sys/class/net", name).exists():
        return None
    result = _run(["ip", "link", "del", "dev", name])
    if result.returncode != 0 and Path("/sys/class/net", name).exists():
        return f"could not delete interface {name}: {result.stderr.strip()}"
    return None


def _our_mount(path: str, source: str) -> bool:
    """Is `path` a mountpoint of our tmpfs in this (the root) mount namespace?"""
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            before, _, after = line.partition(" - ")
            fields, tail = before.split(), after.split()
            if len(fields) > 4 and fields[4] == path and tail[:2] == ["tmpfs", source]:
                return True
    return False


def our_mount(path: str, run_id: str) -> bool:
    """Is `path` the tmpfs of run `run_id` (seen from the root mount namespace)?"""
    return _our_mount(path, MOUNT_SOURCE.format(run_id=run_id))


def thaw(cgroup: str) -> str | None:
    """Thaw a freezer cgroup and the groups under it (a paused container's, whose state
    its parent's does not override): a frozen task does not die of SIGKILL until thawed,
    and a container frozen while runc set up an exec blocks its daemon until thawed."""
    path = CGROUP_ROOT / cgroup
    if not path.is_dir():
        return None
    for group in [path, *(Path(entry.path) for entry in os.scandir(path) if entry.is_dir())]:
        try:
            (group / "freezer.state").write_text("THAWED\n")
        except FileNotFoundError:
            continue
        except OSError as exc:
            return f"could not thaw {group.relative_to(CGROUP_ROOT)}: {exc.strerror}"
    return None


def unmount(path: str, run_id: str) -> str | None:
    source = MOUNT_SOURCE.format(run_id=run_id)
    for _ in range(10):  # a path may carry the same mount more than once
        if not _our_mount(path, source):
            return None
        result = _run(["umount", path])
        if result.returncode != 0:
            # Busy means a process (of ours, just killed) still has it open; detach it.
            result = _run(["umount", "-l", path])
            if result.returncode != 0:
                return f"could not unmount {path}: {result.stderr.strip()}"
    return f"{path} is still mounted after 10 unmounts"


def remove_cgroup(cgroup: str, timeout_s: float = 3.0) -> str | None:
    """rmdir a cgroup; EBUSY is retried, since a killed task leaves it a moment later.
    Empty child groups go first: a container's group that its daemon could not remove
    (the daemon died) sits under our parent and is ours to clear."""
    path = CGROUP_ROOT / cgroup
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            # deepest first: an emulated Kubernetes node nests its pods' groups below
            for directory, _, _ in sorted(os.walk(path), key=lambda w: -len(w[0])):
                if directory != str(path):
                    with contextlib.suppress(OSError):  # busy: the parent's rmdir says so
                        os.rmdir(directory)
            path.rmdir()
            return None
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                return f"could not remove cgroup {cgroup}: {exc.strerror}"
            time.sleep(0.05)


def remove_forward_rules(record: RunRecord) -> str | None:
    if not record.forward_rules:
        return None
    from testbed.emulation.dockerd import remove_forward_rules as remove_tagged

    try:
        remove_tagged(tag=record.run_id)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not remove iptables rules of {record.run_id}: {exc}"
    return None


def remove_containers(record: RunRecord) -> list[str]:
    """`docker rm -f` the run's containers: those recorded and any labelled with the run id
    (so one created a moment before a kill -9 is not missed). Problems, or []."""
    if not record.containers:
        return []
    from testbed.emulation.dockerd import Dockerd, DockerError, ping, run_containers

    if record.docker_host.startswith("unix://") and not ping(record.docker_host):
        # A dead daemon runs nothing: what its containers' processes left is killed by
        # kill_cgroup_members (they are in the run's network namespaces) and their cgroups
        # go with ours. Its store may keep the stopped containers; they hold nothing.
        return []
    names = sorted({*record.containers, *run_containers(record.docker_host, record.run_id)})
    names = [name for name in names if name.startswith(record.run_id)]
    try:
        Dockerd(host=record.docker_host).docker("rm", "-f", *names, check=False, timeout=60)
    except (DockerError, OSError, subprocess.SubprocessError) as exc:
        return [f"docker rm of run {record.run_id}: {exc}"]
    left = run_containers(record.docker_host, record.run_id)
    return [f"containers of run {record.run_id} survived docker rm: {', '.join(left)}"] \
        if left else []


def release_docker(record: RunRecord) -> str | None:
    """The run no longer needs the daemon: stop it if it was started for runs and no run's
    container is left on it (testbed.emulation.dockerd.release_for_runs)."""
    if not record.docker_host:
        return None
    from testbed.emulation.dockerd import DockerError, release_for_runs

    try:
        release_for_runs(record.docker_host)
    except (DockerError, OSError, subprocess.SubprocessError) as exc:
        return f"could not stop the Docker daemon of run {record.run_id}: {exc}"
    return None


def undo(record: RunRecord) -> list[str]:
    """Remove everything the record lists; returns the problems (empty when all is gone).

    Order matters: frozen cgroups thawed (a frozen task cannot die), containers removed
    (their daemon kills their processes and removes their cgroups), processes next (they
    hold namespaces, mounts and cgroups), then network devices in the root namespace,
    mounts, directories, cgroups (they must be empty), and the Docker daemon if nothing
    needs it any more.
    The record file is deleted only when nothing is left; otherwise it stays, marked dirty,
    so a later `clear_stale_runs()` tries again.
    """
    problems = [problem for cgroup in record.cgroups if cgroup.startswith("freezer/")
                for problem in [thaw(cgroup)] if problem]
    problems += remove_containers(record)
    problems += kill_recorded(record)
    problems += kill_cgroup_members(record)
    problems += filter(None, [remove_forward_rules(record)])
    # Bridges before veths: deleting a bridge releases its ports; a veth whose peer sat in a
    # host namespace already vanished with that namespace.
    for name in [*record.bridges, *record.interfaces]:
        if name.startswith(record.run_id):
            problems += filter(None, [delete_interface(name)])
    for path in record.mounts:
        problems += filter(None, [unmount(path, record.run_id)])
    for path in record.trees:
        # a directory of the run's own (the emulated cluster's PKI, node stores): after the
        # containers and processes that used it, and only by its recorded name
        shutil.rmtree(path, ignore_errors=True)
        if os.path.exists(path):
            problems.append(f"could not remove {path}")
    for path in reversed(record.dirs):
        with contextlib.suppress(OSError):
            os.rmdir(path)
    # Children before parents would matter for nested groups; ours are flat.
    for cgroup in record.cgroups:
        problems += filter(None, [remove_cgroup(cgroup)])
    problems += filter(None, [release_docker(record)])
    if problems:
        record.problems = problems
        record.set_status("dirty")
    else:
        record.delete()
    return problems
