"""A `Topology` built as a Mininet network on this machine, with the limits of each host.

Division of labour (Mininet style): Mininet creates the namespaces, veth pairs, Linux-bridge
switches, the CPU cgroups of `CPULimitedHost` and the HTB qdiscs of `TCLink`. This module
adds what Mininet lacks and keeps everything safe on a shared machine:
- names: every Mininet node is `<run id>h<i>` / `<run id>s<j>` (interfaces `<node>-eth<k>`,
  at most 15 characters), so concurrent runs never collide and everything is traceable;
- limits: CPU in cores (CFS quota = cores x period, like `docker --cpus`), a memory cgroup
  per host (`memory.limit_in_bytes` and `memory.memsw.limit_in_bytes`, so swap is no way
  out), a size-limited tmpfs data directory per host at `<run dir>/hosts/<host>/data`;
- processes: `popen()` starts a program inside a host's network and mount namespaces *and*
  its cpu and memory cgroups (`cgexec ... mnexec -a`); children inherit all of them;
- records: every item is written to `testbed.records` before it is created, and teardown is
  `records.undo()`, the same code that `clear_stale_runs()` uses after a driver was killed.

Links: bandwidth by HTB on both ends (Mininet's TCLink). Mininet refuses HTB above 1000 Mbit,
so such links are left unshaped (a veth carries several Gbit/s here); `link_report()` says so.
Delay, jitter and loss use netem where the kernel has it (probed in a throwaway namespace).
Without netem (this machine), loss is emulated by netfilter at the receiver: in each host's
namespace an `iptables ... -m statistic --mode random` rule per source host drops what the
path from that source would lose (links' losses compound; each direction is dropped by its
receiver, so a link's loss still applies once per direction). Delay and jitter need the
NFQUEUE shim, which is not implemented yet: a topology asking for them is refused before
anything is created, naming the file, line and field.

Faults the scenario steps use: `set_link_bandwidth`, `set_link_loss`, `link_down/up` (the
switch end goes down, so the host keeps its address and route and only loses carrier, as with
a pulled cable), `signal_host` (kill or stop a host's processes, never its Mininet shell).

Mount namespaces: each host gets a private copy of the mount table when its shell starts, so
the tmpfs directories are mounted first. Remounting one from the root namespace (`size=`,
`ro`) acts on the shared superblock and takes effect inside the host; a *new* mount made
over the path after the build would not be seen by the host.
"""

from __future__ import annotations

import contextlib
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

from testbed import records
from testbed.errors import InputError
from testbed.records import CGROUP_ROOT, MOUNT_SOURCE, RunRecord
from testbed.topology import LinkSpec, Topology

log = logging.getLogger(__name__)

RUN_PREFIX = "ep"
LOSS_CHAIN = "EDGEPIPE-LOSS"  # per host namespace: dies with it, nothing to record
MAX_IFNAME = 15            # IFNAMSIZ - 1
HTB_MAX_MBPS = 1000.0      # Mininet's TCIntf.bwParamMax
TOOLS = ("mnexec", "cgexec", "brctl", "tc", "ip", "ethtool", "ifconfig", "mount", "umount")
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


class NetworkError(RuntimeError):
    """Building or operating the emulated network failed (the message says what)."""


def new_run_id(prefix: str = RUN_PREFIX) -> str:
    """A fresh run id: the prefix and 3 random base-36 characters, e.g. 'ep4k9'."""
    return prefix + "".join(secrets.choice(_BASE36) for _ in range(3))


def netem_available() -> bool:
    """Can this kernel attach a netem qdisc? Probed on the loopback of a namespace that
    exists only for this one command, so nothing is left behind."""
    if shutil.which("unshare") is None:
        return False
    result = subprocess.run(["unshare", "--net", "tc", "qdisc", "add", "dev", "lo", "root",
                             "netem", "delay", "1ms"], capture_output=True, check=False)
    return result.returncode == 0


def iptables_statistic_available() -> bool:
    """Can a namespace use iptables' `statistic` match? Probed in a throwaway namespace."""
    if shutil.which("unshare") is None or shutil.which("iptables") is None:
        return False
    result = subprocess.run(["unshare", "--net", "iptables", "-w", "-A", "INPUT", "-m",
                             "statistic", "--mode", "random", "--probability", "0.5", "-j",
                             "DROP"], capture_output=True, check=False)
    return result.returncode == 0


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
    Not thread-safe: Mininet talks to each node through one shell, so call it from one
    thread (or hold a lock around calls).
    """

    def __init__(self, topology: Topology, run_id: str | None = None,
                 run_dir: str | Path | None = None) -> None:
        self.topology = topology
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
        self._links: dict[frozenset[str], Any] = {}  # {a, b} (topology names) -> TCLink
        self._procs: list[subprocess.Popen[bytes]] = []
        self.mechanisms: dict[str, dict[str, str]] = {}
        self.impairment: str | None = None           # "netem" | "iptables" | None
        # Current bandwidth and loss per link (scenario steps change them).
        self._bw = {frozenset((link.a, link.b)): link.bandwidth_mbps for link in topology.links}
        self._loss = {frozenset((link.a, link.b)): link.loss_pct for link in topology.links}
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
        for host in self.topology.hosts.values():
            if host.kind != "process":
                raise InputError(f"host {host.name} has kind {host.kind}; this network builds "
                                 "only kind: process hosts so far", file=self.topology.path,
                                 line=host.line, field=f"hosts.{host.name}.kind")
        self.impairment = self._choose_impairment()
        if any(c.isspace() for c in str(self.run_dir)):
            raise NetworkError(f"run dir {self.run_dir} must not contain whitespace")

    def _choose_impairment(self) -> str | None:
        """netem if the kernel has it; else iptables for loss; delay/jitter refused."""
        impaired = [link for link in self.topology.links if link.impaired()]
        if not impaired:
            return None
        if netem_available():
            return "netem"
        for link in impaired:
            for key, value, what in (("delay", link.delay_ms, f"delay {link.delay_ms:g}ms"),
                                     ("jitter", link.jitter_ms, f"jitter {link.jitter_ms:g}ms")):
                if value > 0:
                    raise InputError(
                        f"link {link.name} asks for {what}; this kernel has no netem and no "
                        "other delay mechanism is available yet (loss works, by iptables)",
                        file=self.topology.path, line=link.line, field=f"links[{link.index}].{key}")
        if not iptables_statistic_available():
            link = impaired[0]
            raise InputError(f"link {link.name} asks for loss {link.loss_pct:g}%; this kernel "
                             "has neither netem nor iptables' statistic match",
                             file=self.topology.path, line=link.line,
                             field=f"links[{link.index}].loss")
        return "iptables"

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
        from mininet.node import CPULimitedHost
        from mininet.nodelib import LinuxBridge
        from mininet.util import numCores

        class _Host(CPULimitedHost):
            """Mininet's CPU host without its own cgroup deletion (records.undo() removes
            cpu, cpuacct, cpuset and memory groups alike, after the processes are gone)."""

            def cleanup(self) -> None:
                super(CPULimitedHost, self).cleanup()

        class _ShapedIntf(TCIntf):
            """Mininet's HTB, with a burst that lets 1 Gbit through (15 KB is 0.1 ms of
            it, shorter than a timer tick) and an explicit quantum: the default (rate/10)
            is over HTB's maximum above ~16 Mbit and every link printed a warning."""

            def bwCmds(self, bw: float | None = None, **params: Any) -> Any:
                cmds, parent = super().bwCmds(bw=bw, **params)
                if bw:
                    burst = max(15_000, int(bw * 1e6 / 8 * 0.001))  # >= 1 ms at line rate
                    cmds = [c.replace(" burst 15k", f" burst {burst} quantum 60000")
                            for c in cmds]
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
        self.net = Mininet(topo=None, switch=LinuxBridge, controller=None, link=TCLink,
                           host=_Host, build=False)
        cores = numCores()
        for name, spec in self.topology.hosts.items():
            mn = self.names[name]
            memory = CGROUP_ROOT / "memory" / mn
            memory.mkdir()
            _write(memory / "memory.limit_in_bytes", spec.memory_bytes)
            if (memory / "memory.memsw.limit_in_bytes").exists():
                _write(memory / "memory.memsw.limit_in_bytes", spec.memory_bytes)
            # cpu is a fraction of the whole machine in Mininet: quota = f x cores x period.
            node = self.net.addHost(mn, cpu=spec.cpu / cores)
            self.nodes[name] = node
            _write(memory / "cgroup.procs", node.pid)
            inode = os.stat(f"/proc/{node.pid}/ns/net").st_ino
            if inode == os.stat("/proc/self/ns/net").st_ino:
                raise NetworkError(f"host {name} did not get its own network namespace")
            record.netns[mn] = inode
            record.add_process(node.pid, records.process_start_time(node.pid), name, "shell")
        for name in self.topology.switches:
            self.nodes[name] = self.net.addSwitch(self.names[name])
        for link in self.topology.links:
            name1, name2 = interfaces[link.name]
            params = self._link_params(link)
            self._links[frozenset((link.a, link.b))] = self.net.addLink(
                self.nodes[link.a], self.nodes[link.b], cls=Link, intfName1=name1,
                intfName2=name2, cls1=_ShapedIntf, cls2=_ShapedIntf, params1=params,
                params2=params)
        self.net.build()
        if forward:
            from testbed.dockerd import allow_bridge_forwarding

            for name in self.topology.switches:
                allow_bridge_forwarding(self.names[name], tag=self.run_id)
        self.net.start()
        self._check_links()
        if self.impairment == "iptables":
            self._apply_loss_rules()

    def _record_plan(self, record: RunRecord, interfaces: dict[str, list[str]],
                     forward: bool) -> None:
        """Every name the build will create, saved once before any of it exists: removal
        tolerates absent items, so a kill at any later point is covered."""
        record.nodes = {mn: name for name, mn in self.names.items()}
        hosts = [self.names[h] for h in self.topology.hosts]
        switches = [self.names[s] for s in self.topology.switches]
        record.cgroups = [f"{c}/{mn}" for mn in hosts for c in records.CGROUP_CONTROLLERS]
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

    def _link_params(self, link: LinkSpec) -> dict[str, Any]:
        params: dict[str, Any] = {}
        mechanism = {"bandwidth": "htb", "delay": "none", "loss": "none"}
        if link.bandwidth_mbps <= HTB_MAX_MBPS:
            params["bw"] = link.bandwidth_mbps
        else:
            mechanism["bandwidth"] = "none (above 1000 Mbit: unshaped veth)"
            log.info("link %s: %g Mbit is above what HTB is set up for; left unshaped",
                     link.name, link.bandwidth_mbps)
        if link.impaired() and self.impairment == "netem":
            if link.delay_ms > 0:
                params["delay"] = f"{link.delay_ms:g}ms"
                mechanism["delay"] = "netem"
            if link.jitter_ms > 0:
                params["jitter"] = f"{link.jitter_ms:g}ms"
            if link.loss_pct > 0:
                params["loss"] = link.loss_pct
                mechanism["loss"] = "netem"
        elif link.loss_pct > 0:
            mechanism["loss"] = "iptables statistic at the receiving hosts"
        self.mechanisms[link.name] = mechanism
        return params

    def _check_links(self) -> None:
        """Mininet prints tc errors and carries on; make sure every qdisc we asked for is
        really there."""
        for link in self.topology.links:
            wanted = []
            if link.bandwidth_mbps <= HTB_MAX_MBPS:
                wanted.append("htb")
            if link.impaired() and self.impairment == "netem":
                wanted.append("netem")
            for intf in (self._links[frozenset((link.a, link.b))].intf1,
                         self._links[frozenset((link.a, link.b))].intf2):
                shown = intf.node.cmd(f"tc qdisc show dev {intf.name}")
                for kind in wanted:
                    if f"qdisc {kind}" not in shown:
                        raise NetworkError(f"link {link.name}: no {kind} qdisc on {intf.name} "
                                           f"(tc says: {shown.strip()})")

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

    def cgroups(self, host: str) -> list[str]:
        """The host's cgroups, as paths under /sys/fs/cgroup ("memory/ep4k9h2")."""
        self._spec(host)
        return [f"{c}/{self.names[host]}" for c in ("cpu", "cpuacct", "memory")]

    def _prefix(self, host: str) -> list[str]:
        mn = self.names[host]
        return ["cgexec", "-g", f"cpu,cpuacct:/{mn}", "-g", f"memory:/{mn}",
                "mnexec", "-a", str(self.node(host).pid)]

    def popen(self, host: str, argv: Sequence[str], log_path: str | Path,
              env: Mapping[str, str] | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen[bytes]:
        """Start `argv` in the host (network and mount namespace, cpu and memory cgroups),
        stdout and stderr appended to `log_path`. `env` is added to the driver's environment.
        The process leads its own session, so it survives the driver's terminal; its PID is
        in the run record before this returns."""
        if self.state != "up" or self.record is None:
            raise NetworkError(f"network {self.run_id} is not up ({self.state})")
        self._spec(host)
        full_env = dict(os.environ)
        full_env.update(env or {})
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen([*self._prefix(host), *argv], stdin=subprocess.DEVNULL,
                                    stdout=log_file, stderr=subprocess.STDOUT, env=full_env,
                                    cwd=cwd, start_new_session=True)
        # cgexec and mnexec exec() into argv: the PID is the program's own.
        self.record.add_process(proc.pid, records.process_start_time(proc.pid), host,
                                os.path.basename(argv[0]))
        self._procs.append(proc)
        return proc

    def run(self, host: str, argv: Sequence[str],
            timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run a short command in the host (namespaces and cgroups) and wait for it."""
        self._spec(host)
        return subprocess.run([*self._prefix(host), *argv], capture_output=True, text=True,
                              timeout=timeout, check=False)

    def cmd(self, name: str, *args: str) -> str:
        """Mininet's `node.cmd`: a command through the node's shell (in its cgroups too)."""
        return self.node(name).cmd(*args)

    def host_pids(self, host: str) -> list[int]:
        """Live processes of the host: everything in its memory cgroup except Mininet's shell
        (children of popen'd processes included, wherever their session is)."""
        self._spec(host)
        shell = self.node(host).pid
        return [pid for pid in records.cgroup_pids(f"memory/{self.names[host]}")
                if pid != shell]

    def signal_host(self, host: str, sig: int = signal.SIGKILL) -> int:
        """Signal every process of the host (not its Mininet shell); returns how many."""
        cgroup = f"memory/{self.names[host]}"
        return sum(records.signal_verified(pid, sig, lambda p: records.in_cgroup(p, cgroup))
                   for pid in self.host_pids(host))

    # -- links -------------------------------------------------------------------------------

    def _link(self, a: str, b: str) -> Any:
        try:
            return self._links[frozenset((a, b))]
        except KeyError:
            raise KeyError(f"no link between {a} and {b} in topology "
                           f"{self.topology.name}") from None

    def set_link_bandwidth(self, a: str, b: str, mbps: float) -> None:
        """Re-shape a link (both directions). Above 1000 Mbit the link is left unshaped."""
        self._link(a, b)
        if mbps <= 0:
            raise ValueError(f"bandwidth {mbps} Mbit must be positive")
        self._bw[frozenset((a, b))] = mbps
        self._configure_link(a, b)
        self.mechanisms[self.topology.link(a, b).name]["bandwidth"] = (
            "htb" if mbps <= HTB_MAX_MBPS else "none (above 1000 Mbit: unshaped veth)")

    def _switch_ends(self, a: str, b: str) -> list[Any]:
        link = self._link(a, b)
        return [intf for intf in (link.intf1, link.intf2) if intf.node not in self.net.hosts]

    def link_down(self, a: str, b: str) -> None:
        """Cut the cable: the switch end goes down, so a host keeps its interface and route
        and sees only lost carrier (packets vanish, as when a real cable is pulled), rather
        than 'network unreachable' errors."""
        for intf in self._switch_ends(a, b):
            intf.node.cmd(f"ip link set dev {intf.name} down")

    def link_up(self, a: str, b: str) -> None:
        for intf in self._switch_ends(a, b):
            intf.node.cmd(f"ip link set dev {intf.name} up")

    def set_link_loss(self, a: str, b: str, pct: float) -> None:
        """Change a link's loss (percent, each direction), with the build's mechanism (netem
        where the kernel has it, else iptables at the receivers)."""
        key = frozenset((a, b))
        self._link(a, b)
        if not 0 <= pct < 100:
            raise ValueError(f"loss {pct}% must be in [0, 100)")
        if self.impairment is None:
            self.impairment = "netem" if netem_available() else (
                "iptables" if iptables_statistic_available() else None)
            if self.impairment is None:
                raise NetworkError("no loss mechanism on this kernel (netem, iptables)")
        self._loss[key] = pct
        spec = self.topology.link(a, b)
        if self.impairment == "netem":
            self._configure_link(a, b)
            self.mechanisms[spec.name]["loss"] = "netem" if pct else "none"
        else:
            self._apply_loss_rules()
            self.mechanisms[spec.name]["loss"] = ("iptables statistic at the receiving hosts"
                                                  if pct else "none")

    def _configure_link(self, a: str, b: str) -> None:
        """Apply the link's current bandwidth (and, with netem, delay and loss) to both
        ends; Mininet's config replaces whatever qdiscs were there."""
        key, spec = frozenset((a, b)), self.topology.link(a, b)
        params: dict[str, Any] = {}
        if self._bw[key] <= HTB_MAX_MBPS:
            params["bw"] = self._bw[key]
        if self.impairment == "netem":
            if spec.delay_ms > 0:
                params["delay"] = f"{spec.delay_ms:g}ms"
            if spec.jitter_ms > 0:
                params["jitter"] = f"{spec.jitter_ms:g}ms"
            if self._loss[key] > 0:
                params["loss"] = self._loss[key]
        link = self._link(a, b)
        for intf in (link.intf1, link.intf2):
            if params:
                intf.config(**params)
            else:  # nothing to shape: back to the default qdisc
                intf.node.cmd(f"tc qdisc del dev {intf.name} root 2>/dev/null")

    def path_loss_pct(self, src: str, dst: str) -> float:
        """Current one-way loss from host src to host dst (links' losses compound)."""
        delivered = 1.0
        for link in self.topology.route_links(src, dst):
            delivered *= 1 - self._loss[frozenset((link.a, link.b))] / 100
        return (1 - delivered) * 100

    def _apply_loss_rules(self) -> None:
        """In every host: drop what the path from each source loses, in a chain of our own
        (flushed and refilled, so changes replace the old rules)."""
        for dst in self.topology.hosts:
            commands = [f"iptables -w -N {LOSS_CHAIN} 2>/dev/null",
                        f"iptables -w -F {LOSS_CHAIN}",
                        f"iptables -w -C INPUT -j {LOSS_CHAIN} 2>/dev/null || "
                        f"iptables -w -I INPUT -j {LOSS_CHAIN}"]
            for src in self.topology.hosts:
                loss = self.path_loss_pct(src, dst) if src != dst else 0.0
                if loss > 0:
                    commands.append(f"iptables -w -A {LOSS_CHAIN} -s {self.ip(src)} -m statistic "
                                    f"--mode random --probability {loss / 100:.6f} -j DROP")
            output = self.cmd(dst, "; ".join(commands) + "; echo rc=$?")
            if not output.strip().endswith("rc=0"):
                raise NetworkError(f"loss rules in {dst} failed: {output.strip()}")

    def link_report(self) -> list[dict[str, Any]]:
        """Per link: what was asked and which mechanism provides it (for the run report)."""
        return [{"link": link.name, "bandwidth_mbps": self._bw[frozenset((link.a, link.b))],
                 "delay_ms": link.delay_ms, "jitter_ms": link.jitter_ms,
                 "loss_pct": self._loss[frozenset((link.a, link.b))],
                 **self.mechanisms.get(link.name, {})}
                for link in self.topology.links]

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
        self._terminate_processes(grace_s)
        if self.net is not None:
            try:
                self.net.stop()
            except Exception as exc:  # keep going: undo() removes what Mininet left
                problems.append(f"mininet stop: {exc}")
        problems += records.undo(self.record)
        for proc in self._procs:  # reap, so no zombie of ours outlives the run
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
            return [pid for h in hosts for pid in
                    records.cgroup_pids(f"memory/{self.names[h]}") if pid not in shells]

        for pid in remaining():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while remaining() and time.monotonic() < deadline:
            for proc in self._procs:
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
    interfaces, cgroups, mounts named after the run, and the run's record."""
    found = [f"interface {n}" for n in os.listdir("/sys/class/net") if n.startswith(run_id)]
    for controller in (*records.CGROUP_CONTROLLERS, "blkio", "pids", "freezer"):
        directory = CGROUP_ROOT / controller
        if directory.is_dir():
            found += [f"cgroup {controller}/{n}" for n in os.listdir(directory)
                      if n.startswith(run_id)]
    source = MOUNT_SOURCE.format(run_id=run_id)
    with open("/proc/self/mountinfo") as mountinfo:
        found += [f"mount {line.split()[4]}" for line in mountinfo if f" {source} " in line]
    if (records.state_dir() / f"{run_id}.json").exists():
        found.append(f"record {run_id}.json")
    found += [f"name {n}" for n in names if Path("/sys/class/net", n).exists()]
    return found
