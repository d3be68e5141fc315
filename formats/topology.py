"""Topology files (`topologies/*.yaml`) become a validated `Topology`: hosts with their limits,
switches, and the links between them with bandwidth, delay, jitter and loss.

Division of labour: this module only reads and checks the description and answers questions
about its graph (paths, bottleneck bandwidth between hosts, combined delay and loss). Turning
it into namespaces, cgroups and shaped links is `testbed.emulation.network`; whether the machine
has a
mechanism for delay or loss is decided there too, when the network is built.

Shape rules (checked here, each refusal names file, line and field):
- exactly one host has `role: dispatcher`, at least one has `role: edge`;
- every host has exactly one link, to a switch (hosts are not routers);
- the links form a tree over all hosts and switches: connected, and without cycles, because
  Linux-bridge switches run without spanning tree and a loop would flood forever.
"""

from __future__ import annotations

import heapq
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from formats.errors import InputError
from formats.limits import MAX_DELAY_S, MAX_HOST_BYTES, max_hosts, max_switches, plain_name
from formats.units import (
    parse_bandwidth_mbps,
    parse_duration_s,
    parse_percent,
    parse_size_bytes,
)
from formats.yamlfile import Fields, LocatedList, expect_type, load_yaml

ROLES = ("dispatcher", "edge")
KINDS = ("process", "docker")

# Built-in defaults, used where neither the host nor the file's `defaults` says otherwise.
# 512 MiB: a Python + onnxruntime stage process alone is ~80 MB RSS before any weights.
DEFAULT_HOST = {"cpu": 0.1, "memory": 512 * 1024**2, "disk": 256 * 1024**2, "kind": "process",
                "image": None}
DEFAULT_LINK = {"bandwidth": 100.0, "delay": 0.0, "jitter": 0.0, "loss": 0.0}

MIN_CPU = 0.01            # CFS cannot enforce quotas below ~1 ms per 100 ms period
MIN_MEMORY = 16 * 1024**2  # the host's own shell needs a few MiB of the same cgroup
MIN_DISK = 1024**2

# Mininet's convention: s<N> is a switch. A host called so reads like one in every message.
_SWITCH_LIKE = re.compile(r"s[0-9]+")


@dataclass(frozen=True)
class HostSpec:
    """One emulated host. `cpu` is in cores (like `docker --cpus`). `kind: docker` hosts run
    in containers of `image` (None: the stage image), see testbed/emulation/containers.py."""

    name: str
    role: str
    cpu: float
    memory_bytes: int
    disk_bytes: int
    kind: str = "process"
    image: str | None = None
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class LinkSpec:
    """An undirected link; delay and loss apply in each direction (netem semantics)."""

    a: str
    b: str
    bandwidth_mbps: float
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    line: int | None = field(default=None, compare=False)
    index: int = field(default=0, compare=False)  # position in the file's `links` list

    @property
    def name(self) -> str:
        return f"{self.a}-{self.b}"

    def joins(self, x: str, y: str) -> bool:
        return {self.a, self.b} == {x, y}

    def other(self, node: str) -> str:
        if node == self.a:
            return self.b
        if node == self.b:
            return self.a
        raise ValueError(f"{node} is not an endpoint of link {self.name}")

    def impaired(self) -> bool:
        """Does this link ask for more than bandwidth (delay, jitter or loss)?"""
        return self.delay_ms > 0 or self.jitter_ms > 0 or self.loss_pct > 0


@dataclass
class Topology:
    """A validated topology. Hosts keep the file's order (the dispatcher is not moved)."""

    name: str
    path: Path
    hosts: dict[str, HostSpec]
    switches: list[str]
    links: list[LinkSpec]

    # -- hosts ---------------------------------------------------------------------------

    def dispatcher(self) -> HostSpec:
        found = [h for h in self.hosts.values() if h.role == "dispatcher"]
        if len(found) != 1:  # load_topology guarantees one; a hand-built Topology may not
            raise ValueError(f"topology {self.name} has {len(found)} dispatchers, needs one")
        return found[0]

    def edge_hosts(self) -> list[HostSpec]:
        return [h for h in self.hosts.values() if h.role == "edge"]

    def total_cpu(self) -> float:
        """Cores promised to all hosts together; above the machine's cores they contend."""
        return sum(h.cpu for h in self.hosts.values())

    # -- graph -------------------------------------------------------------------------

    def nodes(self) -> list[str]:
        return [*self.hosts, *self.switches]

    def is_host(self, name: str) -> bool:
        return name in self.hosts

    def is_switch(self, name: str) -> bool:
        return name in self.switches

    def links_of(self, node: str) -> list[LinkSpec]:
        return [link for link in self.links if node in (link.a, link.b)]

    def neighbors(self, node: str) -> list[str]:
        return [link.other(node) for link in self.links_of(node)]

    def link(self, x: str, y: str) -> LinkSpec:
        """The link joining x and y (either order); KeyError if there is none."""
        for link in self.links:
            if link.joins(x, y):
                return link
        raise KeyError(f"no link between {x} and {y} in topology {self.name}")

    def host_link(self, host: str) -> LinkSpec:
        """The one link of a host (to its switch)."""
        return self.links_of(host)[0]

    def route(self, src: str, dst: str) -> list[str]:
        """Nodes on the widest path from src to dst, both included (in a tree: the path)."""
        if src == dst:
            return [src]
        _, previous = self._widest_from(src)
        if dst not in previous:
            raise KeyError(f"{dst} is not reachable from {src}")
        nodes = [dst]
        while nodes[-1] != src:
            nodes.append(previous[nodes[-1]])
        return nodes[::-1]

    def route_links(self, src: str, dst: str) -> list[LinkSpec]:
        nodes = self.route(src, dst)
        return [self.link(x, y) for x, y in zip(nodes, nodes[1:], strict=False)]

    def bandwidth_mbps(self, src: str, dst: str) -> float:
        """Bottleneck bandwidth of the widest path between two hosts."""
        return min(link.bandwidth_mbps for link in self.route_links(src, dst))

    def path_bandwidth_mbps(self) -> dict[tuple[str, str], float]:
        """Bottleneck bandwidth of the widest path for every ordered pair of distinct hosts.
        Both orders are present (links are symmetric, so the two values are equal)."""
        result: dict[tuple[str, str], float] = {}
        for src in self.hosts:
            width, _ = self._widest_from(src)
            for dst in self.hosts:
                if dst != src and dst in width:
                    result[(src, dst)] = width[dst]
        return result

    def path_delay_ms(self, src: str, dst: str) -> float:
        """One-way delay from src to dst: the sum of the links' delays."""
        return sum(link.delay_ms for link in self.route_links(src, dst))

    def path_loss_pct(self, src: str, dst: str) -> float:
        """One-way loss from src to dst: losses on the links compound."""
        delivered = 1.0
        for link in self.route_links(src, dst):
            delivered *= 1 - link.loss_pct / 100
        return (1 - delivered) * 100

    def _widest_from(self, src: str) -> tuple[dict[str, float], dict[str, str]]:
        """Maximin Dijkstra: for every node, the largest bottleneck bandwidth over all paths
        from src, and the predecessor on such a path. Ties keep the first (fewest hops on a
        tree, since a tree has one path anyway)."""
        width: dict[str, float] = {src: float("inf")}
        previous: dict[str, str] = {}
        done: set[str] = set()
        queue: list[tuple[float, str]] = [(-width[src], src)]
        while queue:
            negative, node = heapq.heappop(queue)
            if node in done:
                continue
            done.add(node)
            for link in self.links_of(node):
                nxt = link.other(node)
                candidate = min(-negative, link.bandwidth_mbps)
                if nxt not in done and candidate > width.get(nxt, -1.0):
                    width[nxt] = candidate
                    previous[nxt] = node
                    heapq.heappush(queue, (-candidate, nxt))
        del width[src]
        return width, previous


# -- loading -----------------------------------------------------------------------------


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology file; raises InputError naming file, line and field."""
    path = Path(path)
    document = load_yaml(path)
    top = Fields(document, path)
    name = top.get("name", _plain_name("topology name"), default=path.stem)
    host_defaults, link_defaults = _read_defaults(top)
    hosts = _read_hosts(top, host_defaults)
    switches = _read_switches(top, hosts)
    links = _read_links(top, hosts, switches, link_defaults)
    top.done()
    topology = Topology(name=name, path=path, hosts=hosts, switches=switches, links=links)
    _check_shape(topology, top, document)
    return topology


def _plain_name(what: str) -> Any:
    """Names end up in file paths (hosts/<name>/data) and interface names: formats.limits'
    one rule."""
    def check(value: Any) -> str:
        return plain_name(value, what)

    return check


def _cpu_cores(value: Any) -> float:
    """A number of cores: 0.5, "0.5" or Kubernetes-style "500m"."""
    if isinstance(value, bool):
        raise ValueError(f"cpu must be a number of cores, got {value!r}")
    if isinstance(value, str) and value.strip().endswith("m"):
        cores = float(value.strip()[:-1]) / 1000
    else:
        try:
            cores = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"cpu must be a number of cores (e.g. 0.5 or 500m), "
                             f"got {value!r}") from None
    machine = os.cpu_count() or 1
    if not MIN_CPU <= cores <= machine:
        raise ValueError(f"cpu {value!r} must be between {MIN_CPU} and this machine's "
                         f"{machine} cores")
    return cores


def _size_at_least(minimum: int, what: str) -> Any:
    def check(value: Any) -> int:
        nbytes = parse_size_bytes(value)
        if nbytes > MAX_HOST_BYTES:
            raise ValueError(f"{what} {value!r} is more than {MAX_HOST_BYTES // 1024**4}TiB, "
                             "more than any machine this emulates hosts on")
        if nbytes < minimum:
            raise ValueError(f"{what} {value!r} is below the minimum of {minimum // 1024**2}MiB"
                             " (write a unit, e.g. 512MiB)")
        return nbytes

    return check


def _one_of(choices: tuple[str, ...], what: str) -> Any:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{what} must be one of {', '.join(choices)}; got {value!r}")
        return value

    return check


def _delay_ms(value: Any) -> float:
    seconds = parse_duration_s(value)
    if seconds < 0:
        raise ValueError(f"duration {value!r} must not be negative")
    if seconds > MAX_DELAY_S:
        raise ValueError(f"delay {value!r} is over {MAX_DELAY_S:g}s: TCP would time out and "
                         "reconnect before a packet arrives (use link.down for a dead link)")
    return seconds * 1000


def _host_settings(f: Fields, base: dict[str, Any]) -> dict[str, Any]:
    """cpu/memory/disk/kind/image of a host or of `defaults.host`, over `base`."""
    settings = dict(base)
    settings["cpu"] = f.get("cpu", _cpu_cores, default=base["cpu"])
    settings["memory"] = f.get("memory", _size_at_least(MIN_MEMORY, "memory"),
                               default=base["memory"])
    settings["disk"] = f.get("disk", _size_at_least(MIN_DISK, "disk"), default=base["disk"])
    settings["kind"] = f.get("kind", _one_of(KINDS, "kind"), default=base["kind"])
    settings["image"] = f.get("image", expect_type(str, "an image name"), default=base["image"])
    if settings["image"] is not None and settings["kind"] != "docker":
        raise f.error("image", "an image only makes sense with kind: docker")
    return settings


def _link_settings(f: Fields, base: dict[str, Any]) -> dict[str, Any]:
    settings = {
        "bandwidth": f.get("bandwidth", parse_bandwidth_mbps, default=base["bandwidth"]),
        "delay": f.get("delay", _delay_ms, default=base["delay"]),
        "jitter": f.get("jitter", _delay_ms, default=base["jitter"]),
        "loss": f.get("loss", parse_percent, default=base["loss"]),
    }
    if settings["jitter"] > settings["delay"]:
        key = "jitter" if f.has("jitter") else "delay"
        raise f.error(key, f"jitter {settings['jitter']:g}ms is larger than the delay "
                           f"{settings['delay']:g}ms it varies")
    if settings["loss"] >= 100:
        raise f.error("loss", "100% loss is a link that is down; use a link.down step instead")
    return settings


def _read_defaults(top: Fields) -> tuple[dict[str, Any], dict[str, Any]]:
    host_defaults, link_defaults = dict(DEFAULT_HOST), dict(DEFAULT_LINK)
    defaults = top.sub("defaults", default=None)
    if defaults is None:
        return host_defaults, link_defaults
    host = defaults.sub("host", default=None)
    if host is not None:
        host_defaults = _host_settings(host, host_defaults)
        host.done()
    link = defaults.sub("link", default=None)
    if link is not None:
        link_defaults = _link_settings(link, link_defaults)
        link.done()
    defaults.done()
    return host_defaults, link_defaults


def _read_hosts(top: Fields, base: dict[str, Any]) -> dict[str, HostSpec]:
    mapping = top.get("hosts", expect_type(dict, "a mapping of host name to its settings"))
    if not mapping:
        raise top.error("hosts", "no hosts")
    if len(mapping) > max_hosts():
        raise top.error("hosts", f"{len(mapping)} hosts is more than this machine can emulate "
                                 f"({max_hosts()}: 16 per core; formats/limits.py)")
    key_lines = getattr(mapping, "key_lines", {})
    hosts: dict[str, HostSpec] = {}
    for name, value in mapping.items():
        line = key_lines.get(name, top.line_of("hosts"))
        field_name = f"hosts.{name}"
        try:
            _plain_name("host name")(name)
        except ValueError as exc:
            raise InputError(str(exc), file=top.file, line=line, field=field_name) from None
        if _SWITCH_LIKE.fullmatch(name):
            raise InputError(f"host name {name!r} looks like a switch (s<N>); pick another",
                             file=top.file, line=line, field=field_name)
        f = Fields({} if value is None else value, top.file, field_name, line=line)
        role = f.get("role", _one_of(ROLES, "role"), default="edge")
        settings = _host_settings(f, base)
        f.done()
        hosts[name] = HostSpec(name=name, role=role, cpu=settings["cpu"],
                               memory_bytes=settings["memory"], disk_bytes=settings["disk"],
                               kind=settings["kind"], image=settings["image"], line=line)
    dispatchers = [h for h in hosts.values() if h.role == "dispatcher"]
    if len(dispatchers) != 1:
        where = dispatchers[1].line if len(dispatchers) > 1 else top.line_of("hosts")
        raise InputError(f"exactly one host needs role: dispatcher, found {len(dispatchers)}",
                         file=top.file, line=where, field="hosts")
    if len(hosts) < 2:
        raise top.error("hosts", "needs at least one edge host besides the dispatcher")
    return hosts


def _read_switches(top: Fields, hosts: dict[str, HostSpec]) -> list[str]:
    items = top.get("switches", expect_type(list, "a list of switch names"))
    if len(items) > max_switches():
        raise top.error("switches", f"{len(items)} switches is more than this machine can "
                                    f"emulate ({max_switches()})")
    lines = getattr(items, "item_lines", [])
    switches: list[str] = []
    for i, name in enumerate(items):
        line = lines[i] if i < len(lines) else top.line_of("switches")
        field_name = f"switches[{i}]"
        try:
            _plain_name("switch name")(name)
        except ValueError as exc:
            raise InputError(str(exc), file=top.file, line=line, field=field_name) from None
        if name in hosts:
            raise InputError(f"{name!r} is already a host name", file=top.file, line=line,
                             field=field_name)
        if name in switches:
            raise InputError(f"duplicate switch {name!r}", file=top.file, line=line,
                             field=field_name)
        switches.append(name)
    if not switches:
        raise top.error("switches", "needs at least one switch (hosts connect to switches)")
    return switches


def _read_links(top: Fields, hosts: dict[str, HostSpec], switches: list[str],
                base: dict[str, Any]) -> list[LinkSpec]:
    items = top.get("links", expect_type(list, "a list of links"))
    item_lines = getattr(items, "item_lines", [])
    links: list[LinkSpec] = []
    for i, item in enumerate(items):
        line = item_lines[i] if i < len(item_lines) else top.line_of("links")
        f = Fields(item, top.file, f"links[{i}]", line=line)
        endpoints = f.get("endpoints", expect_type(list, "a list of two names"))
        if len(endpoints) != 2:
            raise f.error("endpoints", f"a link joins exactly two nodes, got {len(endpoints)}")
        a, b = endpoints
        for end in (a, b):
            if not isinstance(end, str) or (end not in hosts and end not in switches):
                raise f.error("endpoints", f"unknown host or switch {end!r}")
        if a == b:
            raise f.error("endpoints", f"a link from {a} to itself")
        if a in hosts and b in hosts:
            raise f.error("endpoints", f"{a} and {b} are both hosts; connect hosts to a switch")
        if any(link.joins(a, b) for link in links):
            raise f.error("endpoints", f"a second link between {a} and {b}")
        for end in (a, b):
            if end in hosts and any(end in (link.a, link.b) for link in links):
                raise f.error("endpoints", f"host {end} already has a link; each host has "
                                           "exactly one (hosts are not routers)")
        settings = _link_settings(f, base)
        f.done()
        links.append(LinkSpec(a=a, b=b, bandwidth_mbps=settings["bandwidth"],
                              delay_ms=settings["delay"], jitter_ms=settings["jitter"],
                              loss_pct=settings["loss"], line=line, index=i))
    return links


def _check_shape(topology: Topology, top: Fields, document: Any) -> None:
    """Tree check: no cycle (named at the link that closes it), and everything connected."""
    parent = {node: node for node in topology.nodes()}

    def root(node: str) -> str:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for link in topology.links:
        ra, rb = root(link.a), root(link.b)
        if ra == rb:
            cycle = " - ".join(_loop_path(topology, link))
            raise InputError(f"link {link.a}-{link.b} closes a loop ({cycle}); Linux-bridge "
                             "switches run without spanning tree, so the links must form a tree",
                             file=topology.path, line=link.line,
                             field=f"links[{link.index}].endpoints")
        parent[ra] = rb
    start = topology.dispatcher().name
    for node in topology.nodes():
        if root(node) != root(start):
            if node in topology.hosts:
                line, field_name = topology.hosts[node].line, f"hosts.{node}"
            else:
                index = topology.switches.index(node)
                items = document.get("switches")
                lines = items.item_lines if isinstance(items, LocatedList) else []
                line = lines[index] if index < len(lines) else top.line_of("switches")
                field_name = f"switches[{index}]"
            raise InputError(f"{node} is not connected to the dispatcher {start} by the links",
                             file=topology.path, line=line, field=field_name)


def _loop_path(topology: Topology, closing: LinkSpec) -> list[str]:
    """The existing path between the endpoints of `closing`, using only the links before it
    (for the loop message)."""
    earlier = Topology(topology.name, topology.path, topology.hosts, topology.switches,
                       topology.links[:closing.index])
    try:
        return [*earlier.route(closing.a, closing.b), closing.a]
    except KeyError:
        return [closing.a, closing.b, closing.a]


def iter_host_pairs(topology: Topology) -> Iterator[tuple[str, str]]:
    """Unordered pairs of distinct hosts, in file order."""
    names = list(topology.hosts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            yield a, b


def main(argv: list[str] | None = None) -> int:
    """`python -m formats.topology FILE...`: validate topology files and summarise them."""
    import argparse
    import sys

    from formats.errors import EXIT_BAD_INPUT
    from formats.units import format_bandwidth, format_size

    parser = argparse.ArgumentParser(prog="python -m formats.topology",
                                     description="Validate topology files.")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    for file in args.files:
        try:
            topology = load_topology(file)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"{file}: {topology.name}: {len(topology.hosts)} hosts "
              f"({len(topology.edge_hosts())} edge), {len(topology.switches)} switches, "
              f"{len(topology.links)} links, {topology.total_cpu():g} cores promised")
        for host in topology.hosts.values():
            print(f"  {host.name:12} {host.role:10} cpu {host.cpu:<5g} memory "
                  f"{format_size(host.memory_bytes):9} disk {format_size(host.disk_bytes):9} "
                  f"link {format_bandwidth(topology.host_link(host.name).bandwidth_mbps)}"
                  + ("" if host.role == "dispatcher" else " to dispatcher " + format_bandwidth(
                      topology.bandwidth_mbps(host.name, topology.dispatcher().name))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
