"""The links of an emulated network as their own object (Mininet gives TCIntf and Link their
own jobs the same way): each link's state in force (bandwidth, delay, jitter, loss), how it is
shaped (HTB on both ends; delay and loss by netem where the kernel has it, else by netfilter
at the receiving hosts: iptables statistic for loss, the NFQUEUE delay shim for delay and
jitter) and partitions between groups of hosts.

Division of labour: testbed.emulation.network builds the Mininet network and its hosts and
hands the built links to `LinkShaping`, which changes them while the network runs (the
scenario steps of testbed.experiment.faults, through the network's methods) and reports
what is in force (`report`). Commands for a host's namespace run from the root namespace
(`mnexec -a`), outside the host's cgroups, so a change lands on time whatever the host's
CPU quota.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from formats.topology import LinkSpec, Topology
from testbed.emulation import records
from testbed.emulation.netfilter import (
    DELAY_CHAIN,
    LOSS_CHAIN,
    PARTITION_CHAIN,
    SHIM_QUEUE,
    ShimClient,
    jump_script,
    nfqueue_available,
    restore_input,
    shim_argv,
)
from testbed.emulation.records import RunRecord

log = logging.getLogger(__name__)

HTB_MAX_MBPS = 1000.0      # Mininet's TCIntf.bwParamMax
LOSS_MECHANISM = "iptables statistic at the receiving hosts"
SHIM_MECHANISM = "nfqueue shim at the receiving hosts"


class NetworkError(RuntimeError):
    """Building or operating the emulated network failed (the message says what)."""


@cache
def netem_available() -> bool:
    """Can this kernel attach a netem qdisc? Probed on the loopback of a namespace that
    exists only for this one command, so nothing is left behind."""
    if shutil.which("unshare") is None:
        return False
    result = subprocess.run(["unshare", "--net", "tc", "qdisc", "add", "dev", "lo", "root",
                             "netem", "delay", "1ms"], capture_output=True, check=False)
    return result.returncode == 0


@cache
def iptables_statistic_available() -> bool:
    """Can a namespace use iptables' `statistic` match? Probed in a throwaway namespace."""
    if shutil.which("unshare") is None or shutil.which("iptables") is None:
        return False
    result = subprocess.run(["unshare", "--net", "iptables", "-w", "-A", "INPUT", "-m",
                             "statistic", "--mode", "random", "--probability", "0.5", "-j",
                             "DROP"], capture_output=True, check=False)
    return result.returncode == 0


def htb_burst(mbps: float) -> str:
    """HTB burst and quantum: a burst that lets 1 Gbit through (15 KB is 0.1 ms of it,
    shorter than a timer tick) and an explicit quantum (the default, rate/10, is over HTB's
    maximum above ~16 Mbit and every link printed a warning)."""
    burst = max(15_000, int(mbps * 1e6 / 8 * 0.001))  # >= 1 ms at line rate
    return f"burst {burst} quantum 60000"



class Network(Protocol):
    """What link shaping needs of testbed.emulation.network.EmulatedNetwork."""

    net: Any                        # the Mininet network
    record: RunRecord | None

    @property
    def run_dir(self) -> Path: ...
    def node(self, name: str) -> Any: ...
    def ip(self, host: str) -> str: ...


def partition_rules(hosts: Iterable[str],
                    partitions: Sequence[tuple[frozenset[str], frozenset[str]]],
                    ip: Callable[[str], str]) -> dict[str, list[str]]:
    """Per host, its partition chain's rules (the chain is jumped to from INPUT and OUTPUT):
    of each partition in force, the hosts of the smaller side drop what comes from the other
    side and what goes to it, and the other side needs no rule. So a one-node partition
    changes one host's rules, not every host's: taking rules out costs nf_tables ~15 ms a
    host, and healing a one-node partition of two-tier-20 in all 21 hosts took 0.35 s, so a
    step due at the heal fired 311 ms late and the run was invalid."""
    rules: dict[str, list[str]] = {}
    for host in hosts:
        blocked: set[str] = set()
        for side_a, side_b in partitions:
            guard, other = (side_a, side_b) if len(side_a) <= len(side_b) else (side_b, side_a)
            if host in guard:
                blocked |= other
        rules[host] = [f"{flag} {ip(other)} -j DROP" for other in sorted(blocked)
                       for flag in ("-s", "-d")]
    return rules


class LinkShaping:
    """The links of one network (module docstring). `impairment`: "netem" | "iptables" |
    None (nothing impaired yet), chosen by the network before it builds."""

    def __init__(self, network: Network, topology: Topology) -> None:
        self.network, self.topology = network, topology
        self.impairment: str | None = None
        self.links: dict[frozenset[str], Any] = {}   # {a, b} (topology names) -> TCLink
        self.mechanisms: dict[str, dict[str, str]] = {}
        # Current bandwidth, delay, jitter and loss per link (scenario steps change them).
        keys = [frozenset((link.a, link.b)) for link in topology.links]
        self.bw = {k: link.bandwidth_mbps for k, link in zip(keys, topology.links)}
        self.delay = {k: link.delay_ms for k, link in zip(keys, topology.links)}
        self.jitter = {k: link.jitter_ms for k, link in zip(keys, topology.links)}
        self.loss = {k: link.loss_pct for k, link in zip(keys, topology.links)}
        self.partitions: list[tuple[frozenset[str], frozenset[str]]] = []
        self.shims: dict[str, ShimClient] = {}        # host -> its delay shim (iptables mode)
        self.chains: dict[tuple[str, str], list[str]] = {}  # (host, chain) -> rules in force
        self.procs: list[subprocess.Popen[bytes]] = []   # the shims' processes

    def params_for(self, link: LinkSpec) -> dict[str, Any]:
        key = frozenset((link.a, link.b))
        if self.bw[key] > HTB_MAX_MBPS:
            log.info("link %s: %g Mbit is above what HTB is set up for; left unshaped",
                     link.name, self.bw[key])
        self.mechanisms[link.name] = self._mechanism(key)
        return self._tc_params(key)

    def _tc_params(self, key: frozenset[str]) -> dict[str, Any]:
        """Mininet TCIntf parameters for a link's current state (netem only with netem)."""
        params: dict[str, Any] = {}
        if self.bw[key] <= HTB_MAX_MBPS:
            params["bw"] = self.bw[key]
        if self.impairment == "netem":
            if self.delay[key] > 0 or self.jitter[key] > 0:
                params["delay"] = f"{self.delay[key]:g}ms"
            if self.jitter[key] > 0:
                params["jitter"] = f"{self.jitter[key]:g}ms"
            if self.loss[key] > 0:
                params["loss"] = self.loss[key]
        return params

    def _mechanism(self, key: frozenset[str]) -> dict[str, str]:
        """Which mechanism serves each property of a link in its current state."""
        delayed = self.delay[key] > 0 or self.jitter[key] > 0
        impaired = {"netem": ("netem", "netem"),
                    "iptables": (SHIM_MECHANISM, LOSS_MECHANISM)}.get(self.impairment or "")
        return {"bandwidth": ("htb" if self.bw[key] <= HTB_MAX_MBPS
                              else "none (above 1000 Mbit: unshaped veth)"),
                "delay": impaired[0] if impaired and delayed else "none",
                "loss": impaired[1] if impaired and self.loss[key] > 0 else "none"}

    def check(self) -> None:
        """Mininet prints tc errors and carries on; make sure every qdisc we asked for is
        really there."""
        for link in self.topology.links:
            wanted = []
            if link.bandwidth_mbps <= HTB_MAX_MBPS:
                wanted.append("htb")
            if link.impaired() and self.impairment == "netem":
                wanted.append("netem")
            for intf in (self.links[frozenset((link.a, link.b))].intf1,
                         self.links[frozenset((link.a, link.b))].intf2):
                shown = intf.node.cmd(f"tc qdisc show dev {intf.name}")
                for kind in wanted:
                    if f"qdisc {kind}" not in shown:
                        raise NetworkError(f"link {link.name}: no {kind} qdisc on {intf.name} "
                                           f"(tc says: {shown.strip()})")

    def _link(self, a: str, b: str) -> Any:
        try:
            return self.links[frozenset((a, b))]
        except KeyError:
            raise KeyError(f"no link between {a} and {b} in topology "
                           f"{self.topology.name}") from None

    def set_link_bandwidth(self, a: str, b: str, mbps: float) -> None:
        """Re-shape a link (both directions). Above 1000 Mbit the link is left unshaped.
        Between two shaped rates the HTB class is changed in place (one `tc` per end, no
        moment without shaping); otherwise Mininet rebuilds the qdiscs."""
        key = frozenset((a, b))
        self._link(a, b)
        if mbps <= 0:
            raise ValueError(f"bandwidth {mbps} Mbit must be positive")
        in_place = (self.impairment != "netem" and self.bw[key] <= HTB_MAX_MBPS
                    and mbps <= HTB_MAX_MBPS)
        self.bw[key] = mbps
        if in_place:
            for intf in self._ends(a, b):
                self.in_node(intf.node, ["tc", "class", "change", "dev", intf.name, "parent",
                                          "5:0", "classid", "5:1", "htb", "rate", f"{mbps}Mbit",
                                          *htb_burst(mbps).split()])
        else:
            self._configure_link(a, b)
        self.mechanisms[self.topology.link(a, b).name] = self._mechanism(key)

    def link_state(self, a: str, b: str) -> dict[str, float]:
        """A link's bandwidth, delay, jitter and loss in force (steps change them)."""
        key = frozenset((a, b))
        self._link(a, b)
        return {"bandwidth_mbps": self.bw[key], "delay_ms": self.delay[key],
                "jitter_ms": self.jitter[key], "loss_pct": self.loss[key]}

    def _ends(self, a: str, b: str) -> list[Any]:
        link = self._link(a, b)
        return [link.intf1, link.intf2]

    def _switch_ends(self, a: str, b: str) -> list[Any]:
        return [intf for intf in self._ends(a, b) if intf.node not in self.network.net.hosts]

    def in_node(self, node: Any, argv: Sequence[str]) -> str:
        """Run a command in a node's network namespace from the root namespace (so outside
        the host's cgroups); raises NetworkError with its output when it fails."""
        prefix = ["mnexec", "-a", str(node.pid)] if node in self.network.net.hosts else []
        result = subprocess.run([*prefix, *argv], capture_output=True, text=True, check=False,
                                timeout=30)
        if result.returncode != 0:
            raise NetworkError(f"{' '.join(argv)} in {node.name} failed: "
                               f"{(result.stderr or result.stdout).strip()}")
        return result.stdout

    def link_down(self, a: str, b: str) -> None:
        """Cut the cable: the switch end goes down, so a host keeps its interface and route
        and sees only lost carrier (packets vanish, as when a real cable is pulled), rather
        than 'network unreachable' errors."""
        for intf in self._switch_ends(a, b):
            self.in_node(intf.node, ["ip", "link", "set", "dev", intf.name, "down"])

    def link_up(self, a: str, b: str) -> None:
        for intf in self._switch_ends(a, b):
            self.in_node(intf.node, ["ip", "link", "set", "dev", intf.name, "up"])

    def _impairment_for_change(self) -> str:
        """The mechanism for a delay or loss a step adds to a network built without any."""
        if self.impairment is None:
            self.impairment = "netem" if netem_available() else "iptables"
        return self.impairment

    def prepare_delay(self) -> None:
        """Get ready for delay steps: without netem, start every host's shim now, so that
        the first delay step does not wait for interpreters to start."""
        if self._impairment_for_change() == "iptables":
            self.start_delay_shims()

    def set_link_loss(self, a: str, b: str, pct: float) -> None:
        """Change a link's loss (percent, each direction), with the build's mechanism (netem
        where the kernel has it, else iptables at the receivers)."""
        key = frozenset((a, b))
        self._link(a, b)
        if not 0 <= pct < 100:
            raise ValueError(f"loss {pct}% must be in [0, 100)")
        if self._impairment_for_change() == "iptables" and not iptables_statistic_available():
            raise NetworkError("no loss mechanism on this kernel (netem, iptables statistic)")
        self.loss[key] = pct
        if self.impairment == "netem":
            self._configure_link(a, b)
        else:
            self.apply_loss_rules()
        self.mechanisms[self.topology.link(a, b).name] = self._mechanism(key)

    def set_link_delay(self, a: str, b: str, delay_ms: float, jitter_ms: float = 0.0) -> None:
        """Change a link's delay and jitter (ms, each direction), with netem where the kernel
        has it, else the NFQUEUE shims of the receiving hosts."""
        key = frozenset((a, b))
        self._link(a, b)
        if delay_ms < 0 or not 0 <= jitter_ms <= max(delay_ms, 0):
            raise ValueError(f"delay {delay_ms} ms and jitter {jitter_ms} ms: need "
                             "0 <= jitter <= delay")
        if self._impairment_for_change() == "iptables" and not nfqueue_available():
            raise NetworkError("no delay mechanism here: no netem, and the NFQUEUE shim "
                               "cannot run (PyPI netfilterqueue, iptables NFQUEUE target)")
        self.delay[key], self.jitter[key] = delay_ms, jitter_ms
        if self.impairment == "netem":
            self._configure_link(a, b)
        else:
            self.apply_delay_rules()
        self.mechanisms[self.topology.link(a, b).name] = self._mechanism(key)

    def _configure_link(self, a: str, b: str) -> None:
        """Apply the link's current bandwidth (and, with netem, delay and loss) to both
        ends; Mininet's config replaces whatever qdiscs were there."""
        params = self._tc_params(frozenset((a, b)))
        for intf in self._ends(a, b):
            if params:
                intf.config(**params)
            else:  # nothing to shape: back to the default qdisc
                intf.node.cmd(f"tc qdisc del dev {intf.name} root 2>/dev/null")

    def path_loss_pct(self, src: str, dst: str) -> float:
        """Current one-way loss from host src to host dst (links' losses compound)."""
        delivered = 1.0
        for link in self.topology.route_links(src, dst):
            delivered *= 1 - self.loss[frozenset((link.a, link.b))] / 100
        return (1 - delivered) * 100

    def path_delay_ms(self, src: str, dst: str) -> tuple[float, float]:
        """Current one-way (delay, jitter) in ms from host src to host dst: delays add up;
        independent jitters add like standard deviations (root of the sum of squares)."""
        keys = [frozenset((link.a, link.b)) for link in self.topology.route_links(src, dst)]
        return (sum(self.delay[k] for k in keys),
                sum(self.jitter[k] ** 2 for k in keys) ** 0.5)

    def _replace_chains(self, chain: str, rules: dict[str, list[str]], first: bool,
                        hooks: Sequence[str] = ("INPUT",)) -> None:
        """Give each host's `chain` its rules: only hosts whose rules change, all at once
        (one `iptables-restore` transaction per host, started side by side: iptables-nft
        takes ~15 ms a call here, one after the other they would take 0.3 s on 20 hosts).
        The first time, `hooks` are made to jump to the chain as well."""
        started = []
        for host, host_rules in rules.items():
            if self.chains.get((host, chain)) == host_rules:
                continue
            restore = ["iptables-restore", "-w", "--noflush"]
            if (host, chain) not in self.chains:  # a shell only the first time
                restore = ["sh", "-c",
                           f"{' '.join(restore)} && {{ {jump_script(chain, first, hooks)}; }}"]
            proc = subprocess.Popen(["mnexec", "-a", str(self.network.node(host).pid), *restore],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            started.append((host, host_rules, proc))
        problems = []
        for host, host_rules, proc in started:
            output, _ = proc.communicate(restore_input(chain, host_rules), timeout=30)
            if proc.returncode == 0:
                self.chains[(host, chain)] = host_rules
            else:
                problems.append(f"{chain} in {host}: {output.strip()}")
        if problems:
            raise NetworkError("iptables failed: " + "; ".join(problems))

    def apply_loss_rules(self) -> None:
        """In every host: drop what the path from each source loses (the chain is replaced
        in one transaction, so a change never lets a packet through half-written rules)."""
        rules: dict[str, list[str]] = {}
        for dst in self.topology.hosts:
            rules[dst] = []
            for src in self.topology.hosts:
                loss = self.path_loss_pct(src, dst) if src != dst else 0.0
                if loss > 0:
                    rules[dst].append(f"-s {self.network.ip(src)} -m statistic --mode random "
                                      f"--probability {loss / 100:.6f} -j DROP")
        self._replace_chains(LOSS_CHAIN, rules, first=True)

    def apply_delay_rules(self) -> None:
        """In every host: queue what the path from each source delays to the host's shim.
        A shim learns its new table before the rules change, so a queued packet always
        finds its delay; a host whose paths have no delay keeps an empty chain (and its
        shim, if it had one, idles)."""
        tables: dict[str, dict[str, tuple[float, float]]] = {}
        for dst in self.topology.hosts:
            delays = {self.network.ip(src): self.path_delay_ms(src, dst)
                      for src in self.topology.hosts if src != dst}
            tables[dst] = {ip: dj for ip, dj in delays.items() if dj[0] > 0 or dj[1] > 0}
        self.start_delay_shims([host for host, table in tables.items() if table])
        changed = [shim for host, shim in self.shims.items() if shim.delays != tables[host]]
        for shim in changed:
            shim.send_delays(tables[shim.host])
        for shim in changed:
            shim.confirm()
        self._replace_chains(DELAY_CHAIN, {
            host: [f"-i {self.network.node(host).defaultIntf().name} -s {ip} -j NFQUEUE "
                   f"--queue-num {SHIM_QUEUE}" for ip in table]
            for host, table in tables.items()}, first=False)

    def start_delay_shims(self, hosts: Iterable[str] | None = None) -> None:
        """Start the delay shims of these hosts (default: all) that are not running yet,
        side by side: each is an interpreter that takes a moment to start, so a driver
        whose scenario will add delay calls this before the measured window. Each runs in
        its host's network namespace, outside its cgroups, its PID recorded before it can
        touch a packet."""
        assert self.network.record is not None
        wanted = [h for h in (self.topology.hosts if hosts is None else hosts)
                  if h not in self.shims]
        if not wanted:
            return
        if not nfqueue_available():
            raise NetworkError("the NFQUEUE delay shim cannot run here (PyPI netfilterqueue, "
                               "iptables NFQUEUE target)")
        logs = self.network.run_dir / "shims"
        if not logs.exists():
            self.network.record.add("dirs", str(logs))  # removed at teardown when no log is kept
            logs.mkdir()
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        names = list(self.topology.hosts)
        for host in wanted:
            with open(logs / f"{host}.log", "ab") as log_file:
                proc = subprocess.Popen(
                    ["mnexec", "-a", str(self.network.node(host).pid),
                     *shim_argv(seed=names.index(host) + 1)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, env=env,
                    start_new_session=True)
            self.network.record.add_process(proc.pid, records.process_start_time(proc.pid), host,
                                    "delayshim")
            self.procs.append(proc)
            self.shims[host] = ShimClient(proc, host)
        for host in wanted:
            self.shims[host].wait_ready()

    def partition(self, group_a: Iterable[str], group_b: Iterable[str]) -> None:
        """Cut all traffic between two groups of hosts (`partition_rules`: the smaller side
        drops what comes from and goes to the other; traffic within a group and to other
        hosts flows on)."""
        pair = (frozenset(group_a), frozenset(group_b))
        for host in pair[0] | pair[1]:
            if host not in self.topology.hosts:
                raise KeyError(f"{host!r} is not a host of topology {self.topology.name}")
        if pair[0] & pair[1]:
            raise ValueError("a host cannot be on both sides of a partition")
        self.partitions.append(pair)
        self._apply_partition_rules()

    def heal_partition(self, group_a: Iterable[str], group_b: Iterable[str]) -> None:
        pair = (frozenset(group_a), frozenset(group_b))
        if pair not in self.partitions:
            raise KeyError("no such partition in force")
        self.partitions.remove(pair)
        self._apply_partition_rules()

    def _apply_partition_rules(self) -> None:
        self._replace_chains(PARTITION_CHAIN,
                             partition_rules(self.topology.hosts, self.partitions,
                                             self.network.ip),
                             first=True, hooks=("INPUT", "OUTPUT"))

    def link_report(self) -> list[dict[str, Any]]:
        """Per link: what is in force and which mechanism provides it (for the run report)."""
        return [{"link": link.name, **self.link_state(link.a, link.b),
                 **self._mechanism(frozenset((link.a, link.b)))}
                for link in self.topology.links]
