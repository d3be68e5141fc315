"""A `Topology` built as a Mininet network on this machine, with the limits of each host.

Division of labour (Mininet style): Mininet creates the namespaces, veth pairs, Linux-bridge
switches, the CPU cgroups of `CPULimitedHost` and the HTB qdiscs of `TCLink`. This module
adds what Mininet lacks and keeps everything safe on a shared machine:
- names: every Mininet node is `<run id>h<i>` / `<run id>s<j>` (interfaces `<node>-eth<k>`,
  at most 15 characters), so concurrent runs never collide and everything is traceable;
- limits: CPU in cores (CFS quota = cores x period, like `docker --cpus`), a memory cgroup
  per host (`memory.limit_in_bytes` and `memory.memsw.limit_in_bytes`, so swap is no way
  out; memory plus disk, as the disk is a tmpfs charged to it: `memory_group_bytes`), a
  size-limited tmpfs data directory per host at `<run dir>/hosts/<host>/data`;
- processes: `popen()` starts a program inside a host's network and mount namespaces *and*
  its cpu and memory cgroups (`cgexec ... mnexec -a`); children inherit all of them;
- records: every item is written to `testbed.emulation.records` before it is created, and teardown
is
  `records.undo()`, the same code that `clear_stale_runs()` uses after a driver was killed.

Host kinds are classes (testbed.emulation.hosts: `ProcessHost`, `DockerHost`), and the
links' state and shaping are their own object (testbed.emulation.links.LinkShaping), the way
Mininet gives Intf/TCIntf and Link their own jobs; this class builds, names, records and
tears down, and its public methods hand host and link work to them.

Docker hosts (`kind: docker`): two containers of the stage image per host
(`testbed.emulation.containers`, which says why two). The Mininet node of such a host is a shell in
the containers' network namespace (`_DockerHost`), so links, shaping, delay, loss and
partitions are built and changed by the same code as for process hosts, and the data
directory is the same tmpfs, bind-mounted into the container. What differs is in the
methods that start software (`popen`, `run`, `popen_python`: `docker exec`) and the host
faults (`docker kill/start/pause/unpause/update`). The project's dockerd is started when a
topology has Docker hosts and stopped at teardown once no run needs it
(`testbed.emulation.dockerd.start_for_runs` / `release_for_runs`). The dispatcher must be a process
host: the controller and load generator are not in the stage image.

Links: bandwidth by HTB on both ends (Mininet's TCLink). Mininet refuses HTB above 1000 Mbit,
so such links are left unshaped (a veth carries several Gbit/s here); `link_report()` says so.
Delay, jitter and loss use netem where the kernel has it (probed in a throwaway namespace).
Without netem (this machine) they are emulated by netfilter at the receiver
(`testbed.emulation.netfilter`):
in each host's namespace, per source host, an `iptables ... -m statistic --mode random` rule
drops what the path from that source would lose, and an NFQUEUE rule hands what it would delay
to the host's `testbed.emulation.delayshim` process (started on demand, outside the host's cgroups;
its
PID is recorded). Links' losses compound and delays add up along a path; each direction is
handled by its receiver, so a link's delay and loss still apply once per direction (netem's
semantics: a 20 ms link adds 40 ms to a round trip across it). A topology asking for what no
mechanism can do is refused before anything is created, naming the file, line and field.

Faults the scenario steps use (`testbed.experiment.faults` maps actions onto these):
- links: `set_link_bandwidth`, `set_link_delay`, `set_link_loss`, `link_down/up` (the switch
  end goes down, so the host keeps its address and route and only loses carrier, as with a
  pulled cable), `partition`/`heal_partition` (DROP between two groups of hosts);
- hosts: `signal_host` (kill or stop a host's processes, never its Mininet shell),
  `crash_host`/`host_up` (processes killed, interface down; Docker: `docker kill`, and
  `docker start`), `pause_host`/`resume_host` (a freezer cgroup per host, made on first use
  and recorded; Docker: `docker pause`), `set_host_cpu` (the CFS quota, live; Docker:
  `docker update --cpus`), `reset_connections` (`ss -K` in the host's namespace);
- the data directory: `fill_disk`/`free_disk`, `remount_data_dir` (read-only and back),
  `corrupt_models` (flip bytes in the cached stage models).
Commands the driver runs in a host for these go through `mnexec -a` from the root namespace,
outside the host's cgroups: a fault must land on time even when the host has used up its CPU
quota (Mininet's shell sits in the host's cgroups and would wait for it).

Mount namespaces: each host gets a private copy of the mount table when its shell starts, so
the tmpfs directories are mounted first. Remounting one from the root namespace (`size=`,
`ro`) acts on the shared superblock and takes effect inside the host; a *new* mount made
over the path after the build would not be seen by the host.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from formats.errors import InputError
from formats.topology import Topology
from testbed.emulation import records
from testbed.emulation.containers import DockerHosts, memory_group_bytes
from testbed.emulation.hosts import DockerHost, EmulatedHost, ProcessHost, check_cores
from testbed.emulation.links import (
    LinkShaping,
    NetworkError,
    htb_burst,
    iptables_statistic_available,
    netem_available,
)
from testbed.emulation.netfilter import nfqueue_available
from testbed.emulation.records import CGROUP_ROOT, CONTAINER_CONTROLLERS, MOUNT_SOURCE, RunRecord

log = logging.getLogger(__name__)

RUN_PREFIX = "ep"
MAX_IFNAME = 15            # IFNAMSIZ - 1
TOOLS = ("mnexec", "cgexec", "brctl", "tc", "ip", "ethtool", "ifconfig", "mount", "umount")
DOCKER_TOOLS = ("dockerd", "nsenter")
FILLER = ".edgepipe-disk-full"   # the file io.disk_full writes into a data directory
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def new_run_id(prefix: str = RUN_PREFIX) -> str:
    """A fresh run id: the prefix and 3 random base-36 characters, e.g. 'ep4k9'."""
    return prefix + "".join(secrets.choice(_BASE36) for _ in range(3))


def _bridge_netfilter() -> bool:
    """Does bridged traffic pass iptables (br_netfilter)? Then a FORWARD policy of DROP (set
    by a dockerd) would cut our switches, so each bridge gets an ACCEPT rule."""
    try:
        return Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text().strip() == "1"
    except OSError:
        return False


def _write(path: Path, value: str | int) -> None:
    path.write_text(f"{value}\n")


class EmulatedNetwork:
    """One run's emulated network. Use as `with EmulatedNetwork(topology) as net: ...`
    (build on enter, stop on exit), or call `build()` and `stop()` yourself.

    `run_dir` holds the hosts' data directories (default: `<state dir>/<run id>`).
    `shared_dirs` are directories of the driver's that Docker hosts see at the same path,
    read-write (the results directory, where agents write their workers' logs); process
    hosts see the whole file system anyway.
    Not thread-safe: Mininet talks to each node through one shell, so call it from one
    thread (or hold a lock around calls).
    """

    # The emulated Kubernetes cluster's dispatcher is a node container too (its control
    # plane runs beside it, testbed.emulation.kubecontrol); an embedded run's cannot be.
    docker_dispatcher = False

    def __init__(self, topology: Topology, run_id: str | None = None,
                 run_dir: str | Path | None = None,
                 shared_dirs: Iterable[str | Path] = ()) -> None:
        self.topology = topology
        self.shared_dirs = [Path(d).resolve() for d in shared_dirs]
        self._fixed_id = run_id is not None
        self.run_id = run_id or new_run_id()
        if not records.RUN_ID.fullmatch(self.run_id):
            raise ValueError(f"run id {self.run_id!r} must be 2-6 lowercase letters/digits "
                             "starting with a letter")
        self._run_dir = Path(run_dir) if run_dir is not None else None
        self.record: RunRecord | None = None
        self.net: Any = None                        # mininet.net.Mininet once built
        self.names: dict[str, str] = {}             # topology name -> Mininet node name
        self.nodes: dict[str, Any] = {}             # topology name -> Mininet node
        self._procs: list[subprocess.Popen[bytes]] = []
        self.docker: DockerHosts | None = None       # once built, if there are Docker hosts
        self.links = LinkShaping(self, topology)     # link state, shaping, partitions
        self.state = "new"
        self.build_seconds = 0.0
        self.stop_seconds = 0.0

    # -- naming ------------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return self._run_dir or records.state_dir() / self.run_id

    def data_dir(self, host: str) -> Path:
        """The host's private tmpfs (inside the host it is the same path)."""
        self._spec(host)
        return self.run_dir / "hosts" / host / "data"

    def _plan_names(self) -> dict[str, list[str]]:
        """Mininet names for nodes and interfaces, checked against the 15-character limit."""
        self.names = {}
        for i, host in enumerate(self.topology.hosts, start=1):
            self.names[host] = f"{self.run_id}h{i}"
        for j, switch in enumerate(self.topology.switches, start=1):
            self.names[switch] = f"{self.run_id}s{j}"
        ports: dict[str, int] = {}
        interfaces: dict[str, list[str]] = {}
        for link in self.topology.links:
            pair = []
            for end in (link.a, link.b):
                node = self.names[end]
                # Hosts number from eth0 (their only port), switches from eth1 (Mininet).
                port = ports.get(node, 0 if self.topology.is_host(end) else 1)
                ports[node] = port + 1
                pair.append(f"{node}-eth{port}")
            interfaces[link.name] = pair
        too_long = [n for pair in interfaces.values() for n in pair if len(n) > MAX_IFNAME]
        if too_long:
            raise NetworkError(f"interface names too long for Linux ({too_long[0]}); use a "
                               "shorter run id or fewer ports per switch")
        return interfaces

    def _spec(self, host: str) -> Any:
        if host not in self.topology.hosts:
            raise KeyError(f"{host!r} is not a host of topology {self.topology.name}")
        return self.topology.hosts[host]

    def node(self, name: str) -> Any:
        """The Mininet node (host or switch) of a topology name."""
        if name not in self.nodes:
            raise KeyError(f"{name!r} is not a built node of topology {self.topology.name}")
        return self.nodes[name]

    # -- checks before anything exists ------------------------------------------------------

    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise NetworkError("building the emulated network needs root")
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            raise NetworkError(f"missing tools: {', '.join(missing)} (run `make setup`)")
        dispatcher = self.topology.dispatcher()
        if dispatcher.kind == "docker" and not self.docker_dispatcher:
            raise InputError(f"the dispatcher {dispatcher.name} cannot be a Docker host: the "
                             "controller and load generator are not in the stage image",
                             file=self.topology.path, line=dispatcher.line,
                             field=f"hosts.{dispatcher.name}.kind")
        if self.docker_hosts():
            missing = [tool for tool in DOCKER_TOOLS if shutil.which(tool) is None]
            if missing:
                raise NetworkError(f"Docker hosts need {', '.join(missing)} (apt-get install "
                                   "docker.io util-linux)")
            for path in self.shared_dirs:
                if not path.is_dir() or any(c.isspace() or c == "," for c in str(path)):
                    raise NetworkError(f"shared dir {path} must be an existing directory "
                                       "without whitespace or commas in its path")
        self.links.impairment = self._choose_impairment()
        if any(c.isspace() for c in str(self.run_dir)):
            raise NetworkError(f"run dir {self.run_dir} must not contain whitespace")

    def _choose_impairment(self) -> str | None:
        """netem if the kernel has it; else netfilter (iptables statistic for loss, the
        NFQUEUE shim for delay and jitter); a link asking for what neither can do is refused."""
        impaired = [link for link in self.topology.links if link.impaired()]
        if not impaired:
            return None
        if netem_available():
            return "netem"
        for link in impaired:
            if (link.delay_ms > 0 or link.jitter_ms > 0) and not nfqueue_available():
                key = "delay" if link.delay_ms > 0 else "jitter"
                raise InputError(
                    f"link {link.name} asks for {key} {getattr(link, key + '_ms'):g}ms; this "
                    "kernel has no netem and the NFQUEUE delay shim cannot run here (it needs "
                    "PyPI netfilterqueue in this interpreter and the iptables NFQUEUE target)",
                    file=self.topology.path, line=link.line, field=f"links[{link.index}].{key}")
            if link.loss_pct > 0 and not iptables_statistic_available():
                raise InputError(f"link {link.name} asks for loss {link.loss_pct:g}%; this "
                                 "kernel has neither netem nor iptables' statistic match",
                                 file=self.topology.path, line=link.line,
                                 field=f"links[{link.index}].loss")
        return "iptables"

    def docker_hosts(self) -> list[str]:
        """The topology's hosts of kind docker."""
        return [name for name, spec in self.topology.hosts.items() if spec.kind == "docker"]

    def is_docker(self, host: str) -> bool:
        return self._spec(host).kind == "docker"

    def _claim(self) -> RunRecord:
        for _ in range(20):
            # Someone else's leftovers under this id (a record is not the only trace).
            clash = (Path("/sys/class/net", f"{self.run_id}s1").exists()
                     or any((CGROUP_ROOT / c / f"{self.run_id}h1").exists()
                            for c in records.CGROUP_CONTROLLERS))
            if not clash:
                try:
                    return RunRecord.claim(self.run_id, self.run_dir, str(self.topology.path))
                except FileExistsError:
                    pass
            if self._fixed_id:
                raise NetworkError(f"run id {self.run_id} is in use (a record, interface or "
                                   "cgroup of that name exists); clear_stale_runs() or pick "
                                   "another")
            self.run_id = new_run_id()
        raise NetworkError("could not find a free run id")

    # -- build -------------------------------------------------------------------------------

    def build(self) -> EmulatedNetwork:
        """Create everything; on any failure, remove what was created and re-raise."""
        if self.state != "new":
            raise NetworkError(f"network {self.run_id} is already {self.state}")
        self._preflight()
        started = time.monotonic()
        self.record = self._claim()
        try:
            self._build()
        except BaseException:
            self.stop()
            raise
        self.record.set_status("up")
        self.state = "up"
        self.build_seconds = time.monotonic() - started
        return self

    def _build(self) -> None:
        from mininet.link import Link, TCIntf, TCLink
        from mininet.net import Mininet
        from mininet.node import CPULimitedHost, Host
        from mininet.nodelib import LinuxBridge
        from mininet.util import numCores

        class _Host(CPULimitedHost):
            """Mininet's CPU host without its own cgroup deletion (records.undo() removes
            cpu, cpuacct, cpuset and memory groups alike, after the processes are gone)."""

            def cleanup(self) -> None:
                super(CPULimitedHost, self).cleanup()

        class _DockerHost(Host):
            """A Docker host's node: Mininet starts a node's shell with `mnexec -cdn`
            (new network and mount namespaces); this shell joins the network namespace of
            the host's containers instead (`netns_pid`), and stays in the root mount
            namespace, where Mininet's tools (ip, tc, ifconfig) are."""

            def _popen(self, cmd: list[str], **params: Any) -> Any:
                if cmd[:2] == ["mnexec", "-cdn"]:
                    netns = f"/proc/{self.params['netns_pid']}/ns/net"
                    cmd = ["mnexec", "-cd", "nsenter", f"--net={netns}", *cmd[2:]]
                return super()._popen(cmd, **params)

        class _ShapedIntf(TCIntf):
            """Mininet's HTB with our burst and quantum (`htb_burst`)."""

            def bwCmds(self, bw: float | None = None, **params: Any) -> Any:
                cmds, parent = super().bwCmds(bw=bw, **params)
                if bw:
                    cmds = [c.replace(" burst 15k", f" {htb_burst(bw)}") for c in cmds]
                return cmds, parent

        assert self.record is not None
        record = self.record
        interfaces = self._plan_names()
        forward = _bridge_netfilter()
        self._record_plan(record, interfaces, forward)
        # Our cgroup layout (v1, one hierarchy per controller) needs no mounting by Mininet,
        # and we checked brctl ourselves; Mininet's own check would only warn about
        # br_netfilter, which the ACCEPT rules below take care of.
        CPULimitedHost.inited = True
        LinuxBridge.isSetup = True

        self._make_data_dirs()
        if self.docker_hosts():
            self._start_docker(record)
        self.net = Mininet(topo=None, switch=LinuxBridge, controller=None, link=TCLink,
                           host=_Host, build=False)
        cores = numCores()
        for name, spec in self.topology.hosts.items():
            mn = self.names[name]
            # The host's memory limit; for a Docker host this is the parent of its
            # containers' groups (a pod's limit), which also carry `--memory` themselves.
            memory = CGROUP_ROOT / "memory" / mn
            memory.mkdir()
            _write(memory / "memory.limit_in_bytes", memory_group_bytes(spec))
            if (memory / "memory.memsw.limit_in_bytes").exists():
                _write(memory / "memory.memsw.limit_in_bytes", memory_group_bytes(spec))
            if spec.kind == "docker":
                assert self.docker is not None
                holder = self.docker.create(name, mn, spec, self.image(name),
                                            [self.data_dir(name), *self.shared_dirs])
                node = self.net.addHost(mn, cls=_DockerHost, netns_pid=holder)
            else:
                # cpu is a fraction of the whole machine in Mininet: quota = f x cores x period.
                node = self.net.addHost(mn, cpu=spec.cpu / cores)
                _write(memory / "cgroup.procs", node.pid)
            self.nodes[name] = node
            inode = os.stat(f"/proc/{node.pid}/ns/net").st_ino
            if inode == os.stat("/proc/self/ns/net").st_ino:
                raise NetworkError(f"host {name} did not get its own network namespace")
            record.netns[mn] = inode
            record.add_process(node.pid, records.process_start_time(node.pid), name, "shell")
        for name in self.topology.switches:
            self.nodes[name] = self.net.addSwitch(self.names[name])
        for link in self.topology.links:
            name1, name2 = interfaces[link.name]
            params = self.links.params_for(link)
            self.links.links[frozenset((link.a, link.b))] = self.net.addLink(
                self.nodes[link.a], self.nodes[link.b], cls=Link, intfName1=name1,
                intfName2=name2, cls1=_ShapedIntf, cls2=_ShapedIntf, params1=params,
                params2=params)
        self.net.build()
        if forward:
            from testbed.emulation.dockerd import allow_bridge_forwarding

            for name in self.topology.switches:
                allow_bridge_forwarding(self.names[name], tag=self.run_id)
        self.net.start()
        for edge in self.topology.edge_hosts():
            self.host(edge.name).make_standby_cgroup()
        self.links.check()
        if self.impairment == "iptables":
            self.links.apply_loss_rules()
            self.links.apply_delay_rules()

    def _record_plan(self, record: RunRecord, interfaces: dict[str, list[str]],
                     forward: bool) -> None:
        """Every name the build will create, saved once before any of it exists: removal
        tolerates absent items, so a kill at any later point is covered."""
        record.nodes = {mn: name for name, mn in self.names.items()}
        hosts = [self.names[h] for h in self.topology.hosts]
        switches = [self.names[s] for s in self.topology.switches]
        record.cgroups = [f"{c}/{mn}" for mn in hosts for c in records.CGROUP_CONTROLLERS]
        # runc makes a Docker host's parent group in every hierarchy it joins.
        record.cgroups += [f"{c}/{self.names[h]}" for h in self.docker_hosts()
                           for c in CONTAINER_CONTROLLERS if (CGROUP_ROOT / c).is_dir()]
        record.bridges = switches
        record.interfaces = [name for pair in interfaces.values() for name in pair]
        record.forward_rules = switches if forward else []
        record.mounts = [str(self.data_dir(h)) for h in self.topology.hosts]
        dirs: list[str] = []
        for mount in record.mounts:
            missing, path = [], Path(mount)
            while not path.exists():
                missing.append(str(path))
                path = path.parent
            dirs += [d for d in reversed(missing) if d not in dirs]
        record.dirs = dirs
        for kind in ("cgroups", "bridges", "interfaces", "forward_rules", "mounts", "dirs"):
            for value in getattr(record, kind):
                record.check_owned(kind, value)
        record.save()

    def image(self, host: str) -> str:
        """The image a Docker host runs (the topology's, else the stage image)."""
        from testbed.emulation.images import DEFAULT_TAG

        return self._spec(host).image or DEFAULT_TAG

    def _start_docker(self, record: RunRecord) -> None:
        """The daemon up (started for runs if nothing answers) and every image checked,
        before any container exists."""
        from testbed.emulation.dockerd import Dockerd, start_for_runs
        from testbed.emulation.images import app_digest

        daemon = Dockerd()
        record.docker_host = daemon.host   # saved before the daemon starts: undo releases it
        record.save()
        start_for_runs(daemon)
        self.docker = DockerHosts(daemon, record)
        digest = app_digest()
        for image in sorted({self.image(host) for host in self.docker_hosts()}):
            self.docker.check_image(image, digest)

    def _make_data_dirs(self) -> None:
        """A tmpfs per host, mounted before the host's mount namespace is copied."""
        for name, spec in self.topology.hosts.items():
            path = self.data_dir(name)
            path.mkdir(parents=True, exist_ok=True)
            result = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={spec.disk_bytes},mode=0755",
                 MOUNT_SOURCE.format(run_id=self.run_id), str(path)],
                capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise NetworkError(f"cannot mount the data dir of {name}: {result.stderr}")

    def __enter__(self) -> EmulatedNetwork:
        if self.state == "new":
            self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- hosts and processes ---------------------------------------------------------------

    def ip(self, host: str) -> str:
        self._spec(host)
        return self.node(host).IP()

    def host(self, host: str) -> EmulatedHost:
        """The host as an object of its kind (testbed.emulation.hosts)."""
        kind = DockerHost if self._spec(host).kind == "docker" else ProcessHost
        return kind(self, host)

    def track(self, proc: subprocess.Popen[bytes], host: str, what: str) -> None:
        """A process started in a host: recorded (before anyone can lose track of it)."""
        assert self.record is not None
        self.record.add_process(proc.pid, records.process_start_time(proc.pid), host, what)
        self._procs.append(proc)

    def containers(self) -> DockerHosts:
        if self.docker is None:
            raise NetworkError(f"network {self.run_id} has no Docker hosts up")
        return self.docker

    def cgroups(self, host: str) -> list[str]:
        """The host's cgroups, as paths under /sys/fs/cgroup ("memory/ep4k9h2")."""
        self._spec(host)
        return [f"{c}/{self.names[host]}" for c in ("cpu", "cpuacct", "memory")]

    def popen(self, host: str, argv: Sequence[str], log_path: str | Path,
              env: Mapping[str, str] | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen[bytes]:
        """Start `argv` in the host (network and mount namespace, cpu and memory cgroups),
        stdout and stderr appended to `log_path`. `env` is added to the driver's environment.
        The process leads its own session, so it survives the driver's terminal; its PID is
        in the run record before this returns.

        In a Docker host `argv` runs inside the container (`docker exec`): paths and the
        interpreter are the image's, `env` is added to the image's environment, and the
        process returned (and recorded) is the docker client, which lives as long as the
        program and carries its output (see `popen_python` for Python with our code). It
        returns once the program runs in the container."""
        if self.state != "up" or self.record is None:
            raise NetworkError(f"network {self.run_id} is not up ({self.state})")
        return self.host(host).popen(argv, log_path, env, cwd)

    def popen_python(self, host: str, args: Sequence[str], log_path: str | Path,
                     env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """`popen` of Python running the project's code in the host, e.g. `args = ["-m",
        "stage_image.agent", ...]`: a process host runs the driver's interpreter on this
        checkout; a Docker host runs the image's python3 on the image's code (so what runs
        there is the image under test). This sets PYTHONPATH; `env` must not."""
        if env and "PYTHONPATH" in env:
            raise ValueError("popen_python sets PYTHONPATH for the host's kind itself")
        argv, full_env = self.host(host).python(args, env)
        return self.popen(host, argv, log_path, full_env)

    def run(self, host: str, argv: Sequence[str],
            timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run a short command in the host (namespaces and cgroups; a Docker host: in its
        container) and wait for it."""
        return self.host(host).run(argv, timeout)

    def cmd(self, name: str, *args: str) -> str:
        """Mininet's `node.cmd`: a command through the node's shell (in its cgroups too)."""
        return self.node(name).cmd(*args)

    def host_pids(self, host: str) -> list[int]:
        """Live processes of the host: everything in its memory cgroup except Mininet's shell
        (children of popen'd processes included, wherever their session is); in a Docker
        host, everything in its container but the idle init."""
        return self.host(host).pids()

    def signal_host(self, host: str, sig: int = signal.SIGKILL) -> int:
        """Signal every process of the host (not its Mininet shell); returns how many."""
        return self.host(host).signal(sig)

    # -- host faults -------------------------------------------------------------------------

    def kill_host(self, host: str) -> int:
        """SIGKILL every process of the host (not its shell) and wait until they are gone;
        returns how many were signalled. A Docker host's container is killed and started
        again (its network stays: the container's netns is held by its holder)."""
        return self.host(host).kill()

    def crash_host(self, host: str) -> int:
        """A power cut: every process of the host is killed and its interface goes down
        (the host side, so peers see the machine vanish). Returns how many were killed.
        The data directory survives, like a disk. A Docker host: `docker kill`."""
        killed = self.host(host).crash()
        self.in_host(host, ["ip", "link", "set", "dev", self.node(host).defaultIntf().name,
                            "down"])
        return killed

    def host_up(self, host: str) -> None:
        """The interface of a crashed host up again (its connected route comes back with
        it), and a Docker host's container started (`docker start`: the idle init only);
        starting its software is the driver's business."""
        self.host(host).start()
        self.in_host(host, ["ip", "link", "set", "dev", self.node(host).defaultIntf().name,
                            "up"])

    def is_paused(self, host: str) -> bool:
        return self.host(host).paused()

    def pause_host(self, host: str) -> int:
        """Freeze every process of the host (not its Mininet shell, which the driver still
        talks through): they are moved into a freezer cgroup of the host's name, made on
        first use and recorded, then frozen. Returns how many processes are frozen.
        A Docker host: `docker pause` (the whole container, its idle init included)."""
        return self.host(host).pause()

    def resume_host(self, host: str) -> None:
        self.host(host).resume()

    def host_cpu(self, host: str) -> float:
        """The host's CPU limit in force, in cores."""
        return self.host(host).cpu()

    def set_host_cpu(self, host: str, cores: float) -> None:
        """Change the host's CPU limit while it runs (a straggler): the CFS quota (a Docker
        host: `docker update --cpus`, which sets the same quota on its container)."""
        check_cores(cores)
        self.host(host).set_cpu(cores)

    def reset_connections(self, host: str) -> int:
        """Destroy the host's TCP connections (`ss -K`, the kernel's socket destroy), as a
        middlebox reset would; listening sockets stay. Returns how many were destroyed."""
        output = self.in_host(host, ["ss", "-K", "-t", "-n", "-H", "state", "connected"])
        return len([line for line in output.splitlines() if line.strip()])

    # -- data directory faults ------------------------------------------------------------

    def fill_disk(self, host: str) -> int:
        """Fill the host's data directory until ENOSPC (one file, written from the root
        namespace, so its pages are not charged to the host's memory limit). Returns the
        bytes written."""
        path = self.data_dir(host) / FILLER
        chunk = bytes(1 << 20)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            stats = os.statvfs(self.data_dir(host))
            with contextlib.suppress(OSError):  # ENOSPC: the writes below finish the job
                os.posix_fallocate(fd, os.fstat(fd).st_size, stats.f_bavail * stats.f_frsize)
            for size in (len(chunk), 4096):  # big writes, then the last pages
                try:
                    while True:
                        os.write(fd, chunk[:size])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
        finally:
            os.close(fd)
        return path.stat().st_size

    def free_disk(self, host: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir(host) / FILLER).unlink()

    def remount_data_dir(self, host: str, read_only: bool) -> None:
        """Remount the host's data directory read-only (or back to read-write). Done from the
        root namespace: it acts on the tmpfs itself, so the host sees it at once. Linux
        refuses (EBUSY) while a file is open for writing; retried for a moment."""
        path = str(self.data_dir(host))
        if not records.our_mount(path, self.run_id):
            raise NetworkError(f"{path} is not this run's data directory mount")
        deadline = time.monotonic() + 2.0
        while True:
            result = subprocess.run(["mount", "-o", f"remount,{'ro' if read_only else 'rw'}",
                                     path], capture_output=True, text=True, check=False)
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise NetworkError(f"remount of {path} failed: {result.stderr.strip()}")
            time.sleep(0.02)

    def corrupt_models(self, host: str, flips: int = 16) -> list[str]:
        """Flip `flips` bytes, spread over each cached stage model of the host
        (`<data dir>/models/*.onnx`), in place: the agent's SHA-256 check must catch it at
        the next start. Returns the files changed."""
        changed = []
        for path in sorted((self.data_dir(host) / "models").glob("*.onnx")):
            size = path.stat().st_size
            if size == 0:
                continue
            fd = os.open(path, os.O_RDWR)
            try:
                for i in range(flips):
                    offset = (2 * i + 1) * size // (2 * flips)
                    byte = os.pread(fd, 1, offset)
                    os.pwrite(fd, bytes([byte[0] ^ 0xFF]), offset)
            finally:
                os.close(fd)
            changed.append(path.name)
        return changed

    # -- links (testbed.emulation.links does the work) ---------------------------------------

    @property
    def impairment(self) -> str | None:
        """How delay and loss are made: "netem" | "iptables" | None (none asked for yet)."""
        return self.links.impairment

    def in_host(self, host: str, argv: Sequence[str]) -> str:
        """A short command in the host's namespaces but outside its cgroups (the driver's
        work, not the host's): its stdout; NetworkError if it fails."""
        self._spec(host)
        return self.links.in_node(self.node(host), argv)

    def set_link_bandwidth(self, a: str, b: str, mbps: float) -> None:
        self.links.set_link_bandwidth(a, b, mbps)

    def set_link_delay(self, a: str, b: str, delay_ms: float, jitter_ms: float = 0.0) -> None:
        self.links.set_link_delay(a, b, delay_ms, jitter_ms)

    def set_link_loss(self, a: str, b: str, pct: float) -> None:
        self.links.set_link_loss(a, b, pct)

    def link_state(self, a: str, b: str) -> dict[str, float]:
        return self.links.link_state(a, b)

    def link_down(self, a: str, b: str) -> None:
        self.links.link_down(a, b)

    def link_up(self, a: str, b: str) -> None:
        self.links.link_up(a, b)

    def prepare_delay(self) -> None:
        self.links.prepare_delay()

    def start_delay_shims(self, hosts: Iterable[str] | None = None) -> None:
        self.links.start_delay_shims(hosts)

    def path_loss_pct(self, src: str, dst: str) -> float:
        return self.links.path_loss_pct(src, dst)

    def path_delay_ms(self, src: str, dst: str) -> tuple[float, float]:
        return self.links.path_delay_ms(src, dst)

    def partition(self, group_a: Iterable[str], group_b: Iterable[str]) -> None:
        self.links.partition(group_a, group_b)

    def heal_partition(self, group_a: Iterable[str], group_b: Iterable[str]) -> None:
        self.links.heal_partition(group_a, group_b)

    def link_report(self) -> list[dict[str, Any]]:
        return self.links.link_report()

    # -- teardown ----------------------------------------------------------------------------

    def stop(self, grace_s: float = 2.0) -> list[str]:
        """Stop processes (SIGTERM, then SIGKILL after `grace_s`), Mininet, and remove all
        the run created. Idempotent. Returns the problems (also logged); an incomplete
        teardown keeps the run's record so `clear_stale_runs(run_id)` can retry."""
        if self.record is None or self.state == "stopped":
            return []
        started = time.monotonic()
        self.state = "stopping"
        self.record.set_status("stopping")
        problems: list[str] = []
        if self.docker is not None:
            # A frozen process cannot act on SIGTERM: thaw paused containers first, through
            # their freezer groups (no daemon call that could hang; `docker rm -f` copes
            # with the daemon still thinking them paused). Process hosts' freezers are
            # thawed by undo(), after their processes were killed.
            for host in self.docker.containers:
                problems += filter(None, [records.thaw(self.docker.cgroup(host, "freezer"))])
        self._terminate_processes(grace_s)
        for shim in self.links.shims.values():  # no state; undo() kills any that linger
            shim.close()
            log_file = self.run_dir / "shims" / f"{shim.host}.log"
            if log_file.exists() and log_file.stat().st_size == 0:  # keep only what says why
                log_file.unlink()
        self.links.shims.clear()
        if self.net is not None:
            try:
                self.net.stop()
            except Exception as exc:  # keep going: undo() removes what Mininet left
                problems.append(f"mininet stop: {exc}")
        problems += records.undo(self.record)
        for proc in [*self._procs, *self.links.procs]:  # reap: no zombie outlives the run
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        self.state = "stopped"
        self.stop_seconds = time.monotonic() - started
        for problem in problems:
            log.warning("run %s teardown: %s", self.run_id, problem)
        return problems

    def _terminate_processes(self, grace_s: float) -> None:
        """SIGTERM every process in the hosts (not the Mininet shells), wait for them."""
        shells = {proc["pid"] for proc in self.record.processes if proc["what"] == "shell"} \
            if self.record else set()
        hosts = [h for h in self.topology.hosts if h in self.nodes]

        def remaining() -> list[int]:
            return [pid for h in hosts for pid in self.host_pids(h) if pid not in shells]

        for pid in remaining():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while remaining() and time.monotonic() < deadline:
            for proc in [*self._procs, *self.links.procs]:
                proc.poll()
            time.sleep(0.05)


def clear_stale_runs(run_id: str | None = None) -> list[str]:
    """Remove everything recorded for runs whose driver is dead, or for the given run (even
    if its driver lives: the caller says it is abandoned). Returns the run ids cleared; runs
    that could not be cleared completely keep their record and are logged."""
    cleared = []
    for record in records.list_records():
        if run_id is not None and record.run_id != run_id:
            continue
        if run_id is None and record.driver_alive():
            continue
        problems = records.undo(record)
        if problems:
            for problem in problems:
                log.warning("clearing run %s: %s", record.run_id, problem)
        else:
            cleared.append(record.run_id)
    return cleared


def leftovers(run_id: str, names: Iterable[str] = ()) -> list[str]:
    """What of a run still exists on the machine (for tests and for `--check` tools):
    interfaces, cgroups, mounts and containers named after the run, and the run's record."""
    from testbed.emulation.dockerd import Dockerd, run_containers

    found = [f"interface {n}" for n in os.listdir("/sys/class/net") if n.startswith(run_id)]
    for controller in dict.fromkeys((*records.CGROUP_CONTROLLERS, *CONTAINER_CONTROLLERS)):
        directory = CGROUP_ROOT / controller
        if directory.is_dir():
            found += [f"cgroup {controller}/{n}" for n in os.listdir(directory)
                      if n.startswith(run_id)]
    source = MOUNT_SOURCE.format(run_id=run_id)
    with open("/proc/self/mountinfo") as mountinfo:
        found += [f"mount {line.split()[4]}" for line in mountinfo if f" {source} " in line]
    if (records.state_dir() / f"{run_id}.json").exists():
        found.append(f"record {run_id}.json")
    found += [f"container {n}" for n in run_containers(Dockerd().host, run_id)]
    found += [f"name {n}" for n in names if Path("/sys/class/net", n).exists()]
    return found
