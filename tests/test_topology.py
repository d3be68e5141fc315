"""Topology files: the shipped ones load, bad ones are refused naming file, line and field,
and the graph answers (bottleneck bandwidth, delay, loss) are right. No root needed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from formats.errors import EXIT_BAD_INPUT, InputError
from formats.topology import load_topology

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGIES = sorted((ROOT / "topologies").glob("*.yaml"))

GOOD = """\
name: tiny
defaults:
  host: {cpu: 0.2, memory: 256MiB, disk: 64MiB}
  link: {bandwidth: 100Mbit}
hosts:
  dispatcher: {role: dispatcher, cpu: 0.5}
  edge1: {}
  edge2: {cpu: 500m, memory: 1GiB, disk: 10MiB}
switches: [s1, s2]
links:
  - {endpoints: [dispatcher, s1], bandwidth: 1Gbit}
  - {endpoints: [s1, s2], bandwidth: 40Mbit, delay: 2ms, loss: 10%}
  - {endpoints: [edge1, s1]}
  - {endpoints: [edge2, s2], bandwidth: 20Mbit, delay: 3ms, jitter: 1ms, loss: 10%}
"""


def write(tmp_path: Path, text: str, name: str = "topo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def refusal(tmp_path: Path, text: str) -> InputError:
    path = write(tmp_path, text)
    with pytest.raises(InputError) as info:
        load_topology(path)
    assert info.value.file == str(path)
    return info.value


def replace_line(text: str, line: int, new: str) -> str:
    """GOOD with its 1-based `line` replaced (keeps every other line number)."""
    lines = text.splitlines()
    lines[line - 1] = new
    return "\n".join(lines) + "\n"


# -- shipped topologies --------------------------------------------------------------------


@pytest.mark.parametrize("path", TOPOLOGIES, ids=[p.stem for p in TOPOLOGIES])
def test_shipped_topologies_load(path: Path) -> None:
    topology = load_topology(path)
    assert topology.name == path.stem
    assert topology.dispatcher().role == "dispatcher"
    assert topology.edge_hosts()
    for host in topology.edge_hosts():
        assert 0.1 <= host.cpu <= 0.5
        assert host.memory_bytes >= 256 * 1024**2
    # every host reaches every other host
    n = len(topology.hosts)
    assert len(topology.path_bandwidth_mbps()) == n * (n - 1)


def test_shipped_set_is_complete() -> None:
    sizes = {p.stem: len(load_topology(p).edge_hosts()) for p in TOPOLOGIES}
    assert sizes == {"star-5": 5, "star-6": 6, "star-6-wan": 6, "star-10": 10,
                     "two-tier-20": 20, "hetero-6": 6, "docker-3": 3, "kube-3": 2,
                     "two-switch-6": 6}


# -- values and units ----------------------------------------------------------------------


def test_units_and_defaults(tmp_path: Path) -> None:
    topology = load_topology(write(tmp_path, GOOD))
    assert topology.name == "tiny"
    assert list(topology.hosts) == ["dispatcher", "edge1", "edge2"]
    d, e1, e2 = topology.hosts.values()
    assert (d.role, d.cpu, d.memory_bytes, d.disk_bytes) == ("dispatcher", 0.5, 256 * 2**20,
                                                             64 * 2**20)
    assert (e1.role, e1.cpu, e1.kind, e1.image) == ("edge", 0.2, "process", None)
    assert (e2.cpu, e2.memory_bytes, e2.disk_bytes) == (0.5, 2**30, 10 * 2**20)
    assert topology.switches == ["s1", "s2"]
    uplink = topology.link("s2", "s1")
    assert (uplink.bandwidth_mbps, uplink.delay_ms, uplink.jitter_ms, uplink.loss_pct) == \
        (40.0, 2.0, 0.0, 10.0)
    assert topology.link("dispatcher", "s1").bandwidth_mbps == 1000.0
    assert topology.link("edge2", "s2").jitter_ms == 1.0
    assert topology.host_link("edge1").bandwidth_mbps == 100.0
    assert topology.total_cpu() == pytest.approx(1.2)


def test_name_defaults_to_file_stem(tmp_path: Path) -> None:
    text = GOOD.replace("name: tiny\n", "")
    assert load_topology(write(tmp_path, text, "my-net.yaml")).name == "my-net"


def test_path_answers(tmp_path: Path) -> None:
    topology = load_topology(write(tmp_path, GOOD))
    assert topology.route("edge1", "edge2") == ["edge1", "s1", "s2", "edge2"]
    bandwidth = topology.path_bandwidth_mbps()
    assert bandwidth[("dispatcher", "edge1")] == bandwidth[("edge1", "dispatcher")] == 100.0
    assert bandwidth[("edge1", "edge2")] == bandwidth[("edge2", "edge1")] == 20.0
    assert bandwidth[("dispatcher", "edge2")] == 20.0
    assert topology.path_delay_ms("dispatcher", "edge2") == 5.0
    assert topology.path_loss_pct("edge1", "edge2") == pytest.approx(19.0)  # 1 - 0.9 * 0.9
    assert topology.path_loss_pct("dispatcher", "edge1") == 0.0


def test_star_path_bandwidth() -> None:
    topology = load_topology(ROOT / "topologies" / "star-5.yaml")
    bandwidth = topology.path_bandwidth_mbps()
    assert bandwidth[("dispatcher", "edge1")] == 100.0   # min(1 Gbit, 100 Mbit)
    assert bandwidth[("edge1", "edge2")] == 100.0
    assert bandwidth[("edge5", "dispatcher")] == 10.0    # edge5 sits behind 10 Mbit
    assert all(v == 10.0 for (a, b), v in bandwidth.items() if "edge5" in (a, b))


def test_two_tier_path_bandwidth() -> None:
    topology = load_topology(ROOT / "topologies" / "two-tier-20.yaml")
    bandwidth = topology.path_bandwidth_mbps()
    assert topology.route("edge1", "edge16") == ["edge1", "tor1", "core", "tor4", "edge16"]
    assert bandwidth[("edge1", "edge2")] == 100.0     # same rack
    assert bandwidth[("edge1", "edge6")] == 100.0     # racks 1 and 2: 500 Mbit uplinks
    assert bandwidth[("edge16", "edge17")] == 100.0   # inside rack 4
    assert bandwidth[("edge16", "edge1")] == 50.0     # out of rack 4: thin uplink
    assert bandwidth[("dispatcher", "edge20")] == 50.0
    assert bandwidth[("dispatcher", "edge5")] == 100.0
    assert len(bandwidth) == 21 * 20


def test_cli_summarises_and_refuses(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "formats.topology",
                         str(ROOT / "topologies" / "star-5.yaml")],
                        capture_output=True, text=True, env=env, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "6 hosts (5 edge)" in ok.stdout
    bad = write(tmp_path, GOOD.replace("bandwidth: 40Mbit", "bandwidth: 40 furlongs"))
    refused = subprocess.run([sys.executable, "-m", "formats.topology", str(bad)],
                             capture_output=True, text=True, env=env, check=False)
    assert refused.returncode == EXIT_BAD_INPUT
    assert f"{bad}:12: links[1].bandwidth" in refused.stderr


# -- refusals: each names file, line, field ------------------------------------------------

# (line to replace in GOOD, new text, expected line, expected field, words in the message)
LINE_CASES = [
    (1, "name: tiny\ncolour: red", 2, "colour", "unknown field"),
    (3, "  host: {cpu: 0.2, memroy: 256MiB}", 3, "defaults.host.memroy", "unknown field"),
    (6, "  dispatcher: {role: dispatcher, cpu: 0.5, gpu: 1}", 6, "hosts.dispatcher.gpu",
     "unknown field"),
    (11, "  - {endpoints: [dispatcher, s1], bandwidth: 1Gbit, mtu: 9000}", 11, "links[0].mtu",
     "unknown field"),
    (13, "  - {endpoints: [edge9, s1]}", 13, "links[2].endpoints", "unknown host or switch"),
    (13, "  - {endpoints: [edge1, s7]}", 13, "links[2].endpoints", "'s7'"),
    (12, "  - {endpoints: [s1, s2], bandwidth: 40 furlongs}", 12, "links[1].bandwidth",
     "bandwidth"),
    (12, "  - {endpoints: [s1, s2], delay: 5}", 12, "links[1].delay", "needs a unit"),
    (12, "  - {endpoints: [s1, s2], loss: 120%}", 12, "links[1].loss", "between 0% and 100%"),
    (12, "  - {endpoints: [s1, s2], delay: 1ms, jitter: 3ms}", 12, "links[1].jitter",
     "larger than the delay"),
    (12, "  - {endpoints: [s1, s2], loss: 100%}", 12, "links[1].loss", "down"),
    (8, "  edge2: {memory: 512}", 8, "hosts.edge2.memory", "minimum"),
    (8, "  edge2: {memory: lots}", 8, "hosts.edge2.memory", "size"),
    (8, "  edge2: {cpu: 1000}", 8, "hosts.edge2.cpu", "cores"),
    (8, "  edge2: {cpu: fast}", 8, "hosts.edge2.cpu", "number of cores"),
    (8, "  edge2: {role: boss}", 8, "hosts.edge2.role", "dispatcher, edge"),
    (8, "  edge2: {kind: vm}", 8, "hosts.edge2.kind", "process, docker"),
    (8, "  edge2: {image: stage:1}", 8, "hosts.edge2.image", "kind: docker"),
    (8, "  edge2: {role: dispatcher}", 8, "hosts", "exactly one host needs role: dispatcher"),
    (8, "  s3: {}", 8, "hosts.s3", "looks like a switch"),
    (8, "  edge 2: {}", 8, "hosts.edge 2", "must start with a letter"),
    (7, "  edge1: {}\n  edge1: {}", 8, "edge1", "duplicate key"),
    (9, "switches: [s1, s2, edge1]", 9, "switches[2]", "already a host name"),
    (9, "switches: [s1, s2, s1]", 9, "switches[2]", "duplicate switch"),
    (9, "switches: [s1, s2, s3]", 9, "switches[2]", "not connected"),
    (13, "  - {endpoints: [edge1, s2]}\n  - {endpoints: [edge1, s1]}", 14, "links[3].endpoints",
     "already has a link"),
    (13, "  - {endpoints: [edge1, edge2]}", 13, "links[2].endpoints", "both hosts"),
    (13, "  - {endpoints: [s1, s2]}", 13, "links[2].endpoints", "second link"),
    (13, "  - {endpoints: [s1, s1]}", 13, "links[2].endpoints", "to itself"),
    (13, "  - {endpoints: [edge1]}", 13, "links[2].endpoints", "exactly two"),
    (13, "  - {endpoints: [edge1, s1]}\n  - {endpoints: [s2, dispatcher]}", 14,
     "links[3].endpoints", "already has a link"),
    (13, "  - {endpoints: [edge1, s1]}", None, None, None),  # unchanged: sanity check below
]


@pytest.mark.parametrize("line, new, want_line, want_field, words", LINE_CASES)
def test_refusals_name_file_line_field(tmp_path: Path, line: int, new: str,
                                       want_line: int | None, want_field: str | None,
                                       words: str | None) -> None:
    text = replace_line(GOOD, line, new)
    if want_line is None:
        load_topology(write(tmp_path, text))
        return
    error = refusal(tmp_path, text)
    assert (error.line, error.field) == (want_line, want_field), error.render()
    assert words in error.reason, error.render()


def test_host_without_link_is_not_connected(tmp_path: Path) -> None:
    error = refusal(tmp_path, replace_line(GOOD, 13, "  # edge1 has no link"))
    assert (error.line, error.field) == (7, "hosts.edge1")
    assert "not connected" in error.reason


def test_loop_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace("switches: [s1, s2]", "switches: [s1, s2, s3]") + \
        "  - {endpoints: [s2, s3]}\n  - {endpoints: [s3, s1]}\n"
    error = refusal(tmp_path, text)
    assert (error.line, error.field) == (16, "links[5].endpoints")
    assert "loop" in error.reason and "(s3 - s2 - s1 - s3)" in error.reason


def test_missing_and_empty_sections(tmp_path: Path) -> None:
    error = refusal(tmp_path, "name: x\nswitches: [s1]\nlinks: []\n")
    assert (error.field, error.line) == ("hosts", 1)
    assert "missing" in error.reason
    error = refusal(tmp_path, "hosts:\n  dispatcher: {role: dispatcher}\nswitches: [s1]\n"
                              "links:\n  - {endpoints: [dispatcher, s1]}\n")
    assert error.field == "hosts" and "edge host" in error.reason
    error = refusal(tmp_path, "hosts:\n  edge1: {}\n  edge2: {}\nswitches: [s1]\nlinks: []\n")
    assert "dispatcher" in error.reason and "found 0" in error.reason
    error = refusal(tmp_path, "hosts: [a, b]\n")
    assert error.field == "hosts" and error.line == 1


def test_bad_yaml_names_line(tmp_path: Path) -> None:
    error = refusal(tmp_path, "hosts:\n  edge1: {cpu: [\n")
    assert error.line is not None and "YAML" in error.reason
