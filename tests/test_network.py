"""The emulated network on this machine: star-5 is built once (with this module's own run
ids and state dir), and each test measures one promise: reachability, CPU share, memory
limit, disk limit, link bandwidth, processes in hosts, teardown, and recovery after the
driver was killed with SIGKILL. Needs root and Mininet."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from formats.errors import InputError
from formats.topology import load_topology
from testbed.emulation import network, records
from testbed.emulation.links import LinkShaping
from testbed.emulation.network import EmulatedNetwork, clear_stale_runs, leftovers
from tests.conftest import fresh_run_id

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
STAR5 = ROOT / "topologies" / "star-5.yaml"


@pytest.fixture(scope="module")
def net(state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedNetwork]:
    network = EmulatedNetwork(load_topology(STAR5), run_id=fresh_run_id("tn"),
                              run_dir=tmp_path_factory.mktemp("run"))
    network.build()
    yield network
    network.stop()


def in_host(net: EmulatedNetwork, host: str, code: str,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return net.run(host, [sys.executable, "-c", textwrap.dedent(code)], timeout=timeout)


def test_every_host_pings_every_other(net: EmulatedNetwork) -> None:
    hosts = list(net.topology.hosts)
    failed = []
    for src in hosts:
        for dst in hosts:
            if src != dst:
                out = net.cmd(src, f"ping -c1 -W1 {net.ip(dst)}")
                if " 0% packet loss" not in out:
                    failed.append(f"{src}->{dst}")
    assert not failed, failed
    assert net.build_seconds < 20


def test_names_fit_and_are_prefixed(net: EmulatedNetwork) -> None:
    for name, mininet_name in net.names.items():
        assert mininet_name.startswith(net.run_id), name
    for link in net.net.links:
        for intf in (link.intf1, link.intf2):
            assert len(intf.name) <= 15 and intf.name.startswith(net.run_id)


def test_cpu_limit_in_cores(net: EmulatedNetwork) -> None:
    """Busy loops in a 0.1-core and a 0.3-core host, side by side for 2 s."""
    code = """
        import time
        start, cpu0 = time.monotonic(), time.process_time()
        while time.monotonic() - start < 2.0:
            pass
        print((time.process_time() - cpu0) / (time.monotonic() - start))
    """
    procs = {host: subprocess.Popen([*net.host(host).prefix(), sys.executable, "-c",
                                     textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)
             for host in ("edge5", "edge1")}
    share = {host: float(proc.communicate(timeout=30)[0]) for host, proc in procs.items()}
    print(f"measured CPU share: {share}")
    for host, got in share.items():
        cores = net.topology.hosts[host].cpu
        assert got <= 1.15 * cores, (host, got, cores)  # the quota is a ceiling
        # No floor is promised on a shared machine; 0.1 core is always to be had, a larger
        # share mostly (other sessions' load took up to 20% of it in our runs).
        assert got >= (0.7 if cores <= 0.1 else 0.5) * cores, (host, got, cores)
        throttled = (records.CGROUP_ROOT / "cpu" / net.names[host] / "cpu.stat").read_text()
        assert int(throttled.split("nr_throttled")[1].split()[0]) > 0  # the quota did bind


def test_standbys_take_what_serving_leaves_up_to_a_cap(net: EmulatedNetwork) -> None:
    """A host's standby group (testbed.emulation.hosts), capped at a quarter of the host's
    quota as the agent caps it for `control.standby_share: 0.25`, gets at most that, alone
    or beside a busy serving process, which keeps the rest (with two CPUs both run at once,
    so the group's low weight alone would not hold it back); a CPU change (a slow node)
    keeps the cap's share, the child's quota never above the parent's."""
    host, mn = net.host("edge1"), net.names["edge1"]
    group = host.standby_cgroup()
    assert group is not None and int((group / "cpu.shares").read_text()) == 2

    def read(path: Path, name: str) -> int:
        return int((path / f"cpu.cfs_{name}_us").read_text())

    parent = group.parent
    assert read(group, "quota") == read(parent, "quota")        # until the agent caps it
    (group / "cpu.cfs_quota_us").write_text(f"{read(parent, 'quota') // 4}\n")
    code = textwrap.dedent("""
        import time
        start, cpu0 = time.monotonic(), time.process_time()
        while time.monotonic() - start < 2.0:
            pass
        print((time.process_time() - cpu0) / (time.monotonic() - start))
    """)

    def busy(groups: list[str]) -> dict[str, float]:
        procs = {g: subprocess.Popen(["cgexec", "-g", f"cpu:/{g}", "-g", f"cpuacct:/{mn}",
                                      sys.executable, "-c", code], stdout=subprocess.PIPE,
                                     text=True) for g in groups}
        return {g: float(p.communicate(timeout=30)[0]) for g, p in procs.items()}

    cores = net.topology.hosts["edge1"].cpu
    cap = cores / 4
    both = busy([mn, f"{mn}/standby"])
    print(f"serving and standby side by side: {both}")
    assert both[f"{mn}/standby"] <= 1.15 * cap and both[mn] >= 0.6 * (cores - cap)
    (alone,) = busy([f"{mn}/standby"]).values()
    print(f"standby alone: {alone}")
    assert 0.5 * cap <= alone <= 1.15 * cap

    period = read(parent, "period")
    for new in (cores / 4, cores):
        net.set_host_cpu("edge1", new)
        assert read(parent, "quota") == int(new * period)
        assert read(group, "quota") == pytest.approx(new * period / 4, rel=0.01)


def test_memory_limit(net: EmulatedNetwork) -> None:
    # memory and disk: the disk is a tmpfs whose pages the host's group is charged for
    spec = net.topology.hosts["edge1"]
    limit = spec.memory_bytes + spec.disk_bytes
    memory = records.CGROUP_ROOT / "memory" / net.names["edge1"]
    assert int((memory / "memory.limit_in_bytes").read_text()) == limit
    small = in_host(net, "edge1", "b = b'x' * (64 << 20); print('ok')")
    assert small.returncode == 0 and "ok" in small.stdout
    big = in_host(net, "edge1", f"b = b'x' * ({limit} + (128 << 20)); print('survived')")
    assert big.returncode != 0 and "survived" not in big.stdout
    assert big.returncode == -signal.SIGKILL or "MemoryError" in big.stderr
    assert int((memory / "memory.max_usage_in_bytes").read_text()) <= limit
    if big.returncode == -signal.SIGKILL:  # the cgroup's OOM killer, not the machine's
        assert "oom_kill 1" in (memory / "memory.oom_control").read_text()


def test_disk_limit(net: EmulatedNetwork) -> None:
    data = net.data_dir("edge2")
    size_mib = net.topology.hosts["edge2"].disk_bytes // 2**20
    result = net.run("edge2", ["dd", "if=/dev/zero", f"of={data}/fill", "bs=1M",
                               f"count={size_mib + 16}"], timeout=60)
    assert result.returncode != 0 and "No space left on device" in result.stderr
    # the root namespace sees the same filesystem (the driver fills and remounts it)
    assert (data / "fill").stat().st_size <= net.topology.hosts["edge2"].disk_bytes
    (data / "fill").unlink()
    assert net.run("edge2", ["ls", str(data)]).stdout == ""
    # each host has its own: edge3's is empty
    assert not any(net.data_dir("edge3").iterdir())


def _iperf(net: EmulatedNetwork, client: str, server: str, reverse: bool,
           tmp_path: Path) -> float:
    port = 5201 + (1 if reverse else 0)
    net.popen(server, ["iperf3", "-s", "-1", "-p", str(port)], tmp_path / f"iperf-{port}.log")
    for _ in range(50):
        result = net.run(client, ["iperf3", "-c", net.ip(server), "-p", str(port), "-t", "2",
                                  "-J", *(["-R"] if reverse else [])], timeout=30)
        with contextlib.suppress(ValueError, KeyError):
            return json.loads(result.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
        time.sleep(0.1)  # server not listening yet
    raise AssertionError(f"iperf3 never connected: {result.stdout} {result.stderr}")


def test_link_bandwidth(net: EmulatedNetwork, tmp_path: Path) -> None:
    """edge5 sits behind 10 Mbit: both directions (host egress and switch egress)."""
    up = _iperf(net, "edge5", "dispatcher", reverse=False, tmp_path=tmp_path)
    down = _iperf(net, "edge5", "dispatcher", reverse=True, tmp_path=tmp_path)
    print(f"measured 10 Mbit link: up {up:.2f} Mbit/s, down {down:.2f} Mbit/s")
    for rate in (up, down):
        assert 8.0 <= rate <= 10.0


def test_link_helpers(net: EmulatedNetwork) -> None:
    target = net.ip("dispatcher")
    net.link_down("edge4", "s1")
    assert "100% packet loss" in net.cmd("edge4", f"ping -c1 -W1 {target}")
    assert "linkdown" in net.cmd("edge4", "ip route")  # carrier lost, route kept
    net.link_up("edge4", "s1")
    ok = ""
    for _ in range(20):  # carrier comes back within a moment
        ok = net.cmd("edge4", f"ping -c1 -W1 {target}")
        if " 0% packet loss" in ok:
            break
    assert " 0% packet loss" in ok
    net.set_link_bandwidth("edge4", "s1", 5)
    intf = f"{net.names['edge4']}-eth0"
    assert "rate 5Mbit" in net.cmd("edge4", f"tc class show dev {intf}")
    net.set_link_bandwidth("edge4", "s1", 100)
    assert "rate 100Mbit" in net.cmd("edge4", f"tc class show dev {intf}")
    report = {row["link"]: row for row in net.link_report()}
    assert report["edge5-s1"]["bandwidth"] == "htb" and report["edge5-s1"]["delay"] == "none"


def test_popen_runs_in_host(net: EmulatedNetwork, tmp_path: Path) -> None:
    log = tmp_path / "probe.log"
    proc = net.popen("edge3", ["sh", "-c", "echo $PROBE; cat /proc/self/cgroup; "
                               "ip -br addr; exec sleep 60"], log, env={"PROBE": "hello"})
    assert any(p["pid"] == proc.pid for p in net.record.processes)  # recorded on return
    stored = json.loads(net.record.path.read_text())
    assert any(p["pid"] == proc.pid for p in stored["processes"])
    deadline = time.monotonic() + 5
    while "eth0" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    text = log.read_text()
    mn = net.names["edge3"]
    assert "hello" in text and f"memory:/{mn}" in text and f"cpu:/{mn}" in text
    assert f"{mn}-eth0" in text and net.ip("edge3") in text
    assert proc.pid in net.host_pids("edge3")
    assert net.signal_host("edge3", signal.SIGKILL) >= 1
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert net.host_pids("edge3") == []


def test_topology_delay_and_jitter_are_applied(state_dir: Path, tmp_path: Path) -> None:
    """A 5 ms link (each direction) adds 10 ms to a round trip across it, whatever the
    mechanism (netem, or the NFQUEUE shim without it); the report names the mechanism."""
    text = STAR5.read_text().replace("- {endpoints: [edge2, s1]}",
                                     "- {endpoints: [edge2, s1], delay: 5ms}")
    path = tmp_path / "delayed.yaml"
    path.write_text(text)
    with EmulatedNetwork(load_topology(path), run_id=fresh_run_id("tn"), run_dir=tmp_path) as net:
        # -U: user-to-user time (the kernel's receive timestamp predates a receiver's shim)
        out = net.cmd("edge1", f"ping -U -c 10 -i 0.05 {net.ip('edge2')}")
        rtt = float(re.search(r"= [\d.]+/([\d.]+)/", out).group(1))
        beside = float(re.search(r"= [\d.]+/([\d.]+)/", net.cmd(
            "edge1", f"ping -U -c 5 -i 0.05 {net.ip('edge3')}")).group(1))
        print(f"measured RTT across a 5 ms link: {rtt:.2f} ms, beside it {beside:.2f} ms")
        assert 9.8 <= rtt <= 13 and beside < 2
        row = {r["link"]: r for r in net.link_report()}["edge2-s1"]
        assert row["delay_ms"] == 5
        assert row["delay"] == ("netem" if net.impairment == "netem"
                                else "nfqueue shim at the receiving hosts")


def test_delay_without_a_mechanism_is_refused_clearly(state_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(network, "netem_available", lambda: False)
    monkeypatch.setattr(network, "nfqueue_available", lambda: False)
    text = STAR5.read_text().replace("- {endpoints: [edge2, s1]}",
                                     "- {endpoints: [edge2, s1], delay: 5ms}")
    path = tmp_path / "delayed.yaml"
    path.write_text(text)
    net = EmulatedNetwork(load_topology(path), run_id=fresh_run_id("tn"))
    with pytest.raises(InputError) as info:
        net.build()
    assert "link edge2-s1 asks for delay 5ms" in str(info.value)
    assert "NFQUEUE" in str(info.value)
    assert info.value.field == "links[2].delay" and info.value.line is not None
    assert leftovers(net.run_id) == []


def _ping_loss(net: EmulatedNetwork, src: str, dst: str, count: int = 400) -> float:
    # flood mode: the next echo goes when the reply is back or after 10 ms
    out = net.cmd(src, f"ping -q -f -c {count} -W 0.1 {net.ip(dst)}")
    sent, received = (int(word) for word in
                      re.search(r"(\d+) packets transmitted, (\d+) received", out).groups())
    return 100 * (sent - received) / sent


def test_loss_by_iptables(state_dir: Path, tmp_path: Path) -> None:
    """No netem here: 10% loss on the s1-s2 link drops ~10% per direction at the receivers,
    so a ping across it loses 1 - 0.9^2 = 19%; scenario steps can change it later."""
    path = tmp_path / "lossy.yaml"
    path.write_text(TWO_SWITCHES.replace("bandwidth: 50Mbit", "bandwidth: 50Mbit, loss: 10%"))
    with EmulatedNetwork(load_topology(path), run_id=fresh_run_id("tn"), run_dir=tmp_path) as net:
        if net.impairment != "iptables":
            pytest.skip(f"this kernel uses {net.impairment} for loss")
        across = _ping_loss(net, "edge2", "dispatcher")
        inside = _ping_loss(net, "edge1", "dispatcher", count=100)
        print(f"measured ping loss across 10% link: {across:.1f}% (expect 19%), "
              f"beside it: {inside:.1f}%")
        assert 11 <= across <= 28 and inside == 0
        row = {r["link"]: r for r in net.link_report()}["s1-s2"]
        assert row["loss_pct"] == 10 and "iptables" in row["loss"]
        net.set_link_loss("s1", "s2", 0)
        assert _ping_loss(net, "edge2", "dispatcher", count=100) == 0
        net.set_link_loss("edge1", "s1", 30)
        assert net.path_loss_pct("edge1", "edge2") == pytest.approx(30)
        assert _ping_loss(net, "edge1", "edge2", count=200) > 30


def test_teardown_leaves_nothing(state_dir: Path, tmp_path: Path) -> None:
    network = EmulatedNetwork(load_topology(STAR5), run_id=fresh_run_id("tn"), run_dir=tmp_path)
    network.build()
    proc = network.popen("edge1", ["sleep", "60"], tmp_path / "sleep.log")
    # a grandchild in its own session still dies: it is in the host's cgroups
    network.cmd("edge2", "setsid sleep 61 &")
    netns = set(network.record.netns.values())
    assert leftovers(network.run_id) != []
    assert network.stop() == []
    print(f"star-5: build {network.build_seconds:.2f} s, stop {network.stop_seconds:.2f} s")
    assert proc.poll() is not None
    assert leftovers(network.run_id) == []
    assert all(records.process_gone(p["pid"], p["start"]) for p in network.record.processes)
    assert not any(records.in_run_netns(pid, netns, network.run_id) for pid in _all_pids())
    assert not (tmp_path / "hosts").exists()
    assert network.stop() == []  # idempotent


def test_failed_build_removes_what_it_made(state_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    def broken(self: LinkShaping) -> None:
        raise RuntimeError("injected failure after the network was up")

    monkeypatch.setattr(LinkShaping, "check", broken)
    network = EmulatedNetwork(load_topology(STAR5), run_id=fresh_run_id("tn"), run_dir=tmp_path)
    with pytest.raises(RuntimeError, match="injected"):
        network.build()
    assert leftovers(network.run_id) == []


KILLED_DRIVER = """
import sys, time
from testbed.emulation.network import EmulatedNetwork
from formats.topology import load_topology
net = EmulatedNetwork(load_topology(sys.argv[1]), run_id=sys.argv[2], run_dir=sys.argv[3])
net.build()
proc = net.popen("edge1", ["sleep", "300"], sys.argv[3] + "/sleep.log")
net.cmd("edge2", "setsid sleep 301 &")
while open(f"/proc/{proc.pid}/comm").read().strip() != "sleep":  # mnexec has attached
    time.sleep(0.01)
print("up", flush=True)
time.sleep(300)
"""

TWO_SWITCHES = """
name: two-switches
hosts:
  dispatcher: {role: dispatcher}
  edge1: {}
  edge2: {}
switches: [s1, s2]
links:
  - {endpoints: [dispatcher, s1]}
  - {endpoints: [s1, s2], bandwidth: 50Mbit}
  - {endpoints: [edge1, s1]}
  - {endpoints: [edge2, s2]}
"""


def test_killed_driver_is_cleared(state_dir: Path, tmp_path: Path) -> None:
    """Build in a subprocess, SIGKILL it, then clear_stale_runs() removes everything."""
    topology = tmp_path / "two-switches.yaml"
    topology.write_text(TWO_SWITCHES)
    run_id = fresh_run_id("tn")
    driver = subprocess.Popen([sys.executable, "-c", KILLED_DRIVER, str(topology), run_id,
                               str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert driver.stdout is not None and driver.stdout.readline().strip() == "up"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    record = records.RunRecord.load(state_dir / f"{run_id}.json")
    assert not record.driver_alive()
    left = leftovers(run_id)
    # bridges, the switch-to-switch veth, cgroups and mounts outlive the driver
    assert any("interface" in item for item in left) and any("mount" in item for item in left)
    sleeper = next(p for p in record.processes if p["what"] == "sleep")
    assert not records.process_gone(sleeper["pid"], sleeper["start"])

    assert run_id in clear_stale_runs()
    assert leftovers(run_id) == []
    assert records.process_gone(sleeper["pid"], sleeper["start"])
    netns = set(record.netns.values())
    assert not any(records.in_run_netns(pid, netns, run_id) for pid in _all_pids())
    assert not (tmp_path / "hosts").exists()


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]
