"""Every fault action on a real emulated network (root), with simple processes instead of the
DNN pipeline: each test injects through the action registry, measures the effect (processes
killed, a counter frozen, CPU used, Mbit/s, RTT, loss, ENOSPC, EROFS, SHA-256, a reset TCP
connection), heals, and measures that the effect is gone. The last tests run the timeline on
time and check that a stopped network leaves nothing behind, even with faults in force."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from formats.scenario import Step
from formats.topology import load_topology
from testbed.emulation import records
from testbed.emulation.hostmon import HostMonitor
from testbed.emulation.netfilter import PARTITION_CHAIN
from testbed.emulation.network import EmulatedNetwork, leftovers
from testbed.experiment.faults import FAULTS, Context, FaultTimeline, Hooks
from tests.conftest import fresh_run_id

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
STAR5 = ROOT / "topologies" / "star-5.yaml"


@pytest.fixture(scope="module")
def net(state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedNetwork]:
    network = EmulatedNetwork(load_topology(STAR5), run_id=fresh_run_id("tf"),
                              run_dir=tmp_path_factory.mktemp("run"))
    network.build()
    yield network
    assert network.stop() == []
    assert leftovers(network.run_id) == []


class RecordingHooks:
    def __init__(self) -> None:
        self.restarted: list[str] = []

    def hooks(self) -> Hooks:
        return Hooks(restart_host=self.restarted.append)


def inject(ctx: Context, action: str, target: Any, **params: Any) -> tuple[Step, dict]:
    step = Step(0.0, action, target, params, None, 0)
    return step, FAULTS[action].inject(ctx, step)


def heal(ctx: Context, step: Step, detail: dict) -> dict:
    kind = FAULTS[step.action]
    assert kind.heal is not None
    return kind.heal(ctx, step, detail)


def reachable(net: EmulatedNetwork, src: str, dst: str) -> bool:
    return " 0% packet loss" in net.cmd(src, f"ping -c1 -W0.5 {net.ip(dst)}")


def wait_for(predicate: Any, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def python_in(net: EmulatedNetwork, host: str, code: str, log: Path) -> subprocess.Popen:
    return net.popen(host, [sys.executable, "-u", "-c", textwrap.dedent(code)], log)


# -- node -----------------------------------------------------------------------------------


def test_crash_kills_and_downs_then_heals(net: EmulatedNetwork, tmp_path: Path) -> None:
    recorder = RecordingHooks()
    ctx = Context(net, recorder.hooks())
    proc = net.popen("edge1", ["sleep", "600"], tmp_path / "sleep.log")
    net.cmd("edge1", "setsid sleep 601 &")  # a process the driver never started
    assert wait_for(lambda: len(net.host_pids("edge1")) == 2)
    assert reachable(net, "dispatcher", "edge1")
    step, detail = inject(ctx, "node.crash", "edge1")
    assert detail["killed"] >= 2 and proc.wait(timeout=5) < 0
    assert net.host_pids("edge1") == []
    intf = net.node("edge1").defaultIntf().name
    assert "state DOWN" in net.cmd("edge1", f"ip link show {intf}")
    assert not reachable(net, "dispatcher", "edge1")
    assert heal(ctx, step, detail) == {"restarted": True}
    assert recorder.restarted == ["edge1"]
    assert wait_for(lambda: reachable(net, "dispatcher", "edge1"))
    # The final heal phase brings the interface up but starts nothing.
    step, detail = inject(ctx, "node.crash", "edge1")
    ctx.final = True
    assert heal(ctx, step, detail) == {"restarted": False} and recorder.restarted == ["edge1"]
    assert wait_for(lambda: reachable(net, "dispatcher", "edge1"))


def test_restart_kills_and_calls_the_hook(net: EmulatedNetwork, tmp_path: Path) -> None:
    recorder = RecordingHooks()
    proc = net.popen("edge4", ["sleep", "600"], tmp_path / "sleep.log")
    assert wait_for(lambda: proc.pid in net.host_pids("edge4"))  # cgexec has placed it
    _, detail = inject(Context(net, recorder.hooks()), "node.restart", "edge4")
    assert detail["killed"] == 1 and proc.wait(timeout=5) < 0
    assert recorder.restarted == ["edge4"] and reachable(net, "dispatcher", "edge4")


COUNTER = """
    import os, time
    i = 0
    while True:
        i += 1
        with open({path!r} + ".tmp", "w") as f:
            f.write(str(i))
        os.replace({path!r} + ".tmp", {path!r})  # a reader never sees a half-written count
        time.sleep(0.01)
"""


def test_pause_freezes_and_resume_thaws(net: EmulatedNetwork, tmp_path: Path) -> None:
    ctx = Context(net, Hooks())
    counter = tmp_path / "counter"
    python_in(net, "edge2", COUNTER.format(path=str(counter)), tmp_path / "counter.log")
    assert wait_for(counter.exists)

    def advances() -> bool:
        first = int(counter.read_text())
        time.sleep(0.3)
        return int(counter.read_text()) > first

    assert advances()
    step, detail = inject(ctx, "node.pause", "edge2")
    assert detail["frozen"] >= 1
    assert f"freezer/{net.names['edge2']}" in net.record.cgroups  # recorded for teardown
    assert not advances()
    assert reachable(net, "dispatcher", "edge2")  # the network stack is not frozen
    heal(ctx, step, detail)
    assert advances()
    # node.resume is a step of its own too
    step, _ = inject(ctx, "node.pause", "edge2")
    assert not advances()
    inject(ctx, "node.resume", "edge2")
    assert advances()
    net.kill_host("edge2")


def _cores_used(net: EmulatedNetwork, host: str, seconds: float) -> float:
    usage = records.CGROUP_ROOT / "cpuacct" / net.names[host] / "cpuacct.usage"
    before, start = int(usage.read_text()), time.monotonic()
    time.sleep(seconds)
    return (int(usage.read_text()) - before) / 1e9 / (time.monotonic() - start)


def test_cpu_changes_the_quota_live(net: EmulatedNetwork, tmp_path: Path) -> None:
    ctx = Context(net, Hooks())
    python_in(net, "edge3", "while True: pass", tmp_path / "spin.log")
    time.sleep(0.3)
    before = _cores_used(net, "edge3", 1.0)
    step, detail = inject(ctx, "node.cpu", "edge3", cpu=0.05)
    assert detail["previous_cores"] == pytest.approx(0.3)
    time.sleep(0.2)  # let the current period run out
    during = _cores_used(net, "edge3", 1.5)
    heal(ctx, step, detail)
    time.sleep(0.2)
    after = _cores_used(net, "edge3", 1.0)
    net.kill_host("edge3")
    print(f"measured node.cpu: {before:.3f} cores, 0.05 during, {during:.3f} measured, "
          f"{after:.3f} after heal")
    assert during <= 0.06 and during >= 0.03
    assert net.host_cpu("edge3") == pytest.approx(0.3)
    assert after >= 0.15 and before >= 0.15


# -- links ----------------------------------------------------------------------------------


def _iperf(net: EmulatedNetwork, client: str, server: str, port: int, tmp_path: Path,
           seconds: int = 2) -> float:
    net.popen(server, ["iperf3", "-s", "-1", "-p", str(port)], tmp_path / f"iperf-{port}.log")
    result = None
    for _ in range(50):
        result = net.run(client, ["iperf3", "-c", net.ip(server), "-p", str(port), "-t",
                                  str(seconds), "-J"], timeout=30)
        with contextlib.suppress(ValueError, KeyError):
            return json.loads(result.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
        time.sleep(0.1)
    raise AssertionError(f"iperf3 never connected: {result}")


def test_bandwidth_is_measured_and_restored(net: EmulatedNetwork, tmp_path: Path) -> None:
    ctx = Context(net, Hooks())
    step, detail = inject(ctx, "link.bandwidth", ["edge4", "s1"], bandwidth=5.0)
    assert detail == {"previous_mbps": 100.0}
    rate = _iperf(net, "edge4", "dispatcher", 5301, tmp_path)
    heal(ctx, step, detail)
    print(f"measured link.bandwidth 5 Mbit: {rate:.2f} Mbit/s")
    assert 4.0 <= rate <= 5.0
    intf = net.node("edge4").defaultIntf().name
    assert "rate 100Mbit" in net.cmd("edge4", f"tc class show dev {intf}")


def _rtt_ms(net: EmulatedNetwork, src: str, dst: str, count: int = 20) -> float:
    # -U: user-to-user time. Plain ping uses the kernel's receive timestamp, taken before
    # the receiving host's netfilter holds the packet, so it would not see half the delay.
    out = net.cmd(src, f"ping -U -c {count} -i 0.05 {net.ip(dst)}")
    found = re.search(r"= [\d.]+/([\d.]+)/", out)
    assert found, out
    return float(found.group(1))


def test_delay_is_measured_by_rtt(net: EmulatedNetwork, tmp_path: Path) -> None:
    """A link delay applies in each direction (netem's semantics): 10 ms on one link adds
    20 ms to a round trip across it, 20 ms adds 40 ms."""
    ctx = Context(net, Hooks())
    base = _rtt_ms(net, "dispatcher", "edge3")
    step, detail = inject(ctx, "link.delay", ["edge3", "s1"], delay=0.010)
    rtt10 = _rtt_ms(net, "dispatcher", "edge3")
    row = {r["link"]: r for r in net.link_report()}["edge3-s1"]
    assert row["delay_ms"] == 10 and row["delay"] in ("netem", "nfqueue shim at the receiving "
                                                                "hosts")
    heal(ctx, step, detail)
    healed = _rtt_ms(net, "dispatcher", "edge3")
    step, detail = inject(ctx, "link.delay", ["edge3", "s1"], delay=0.020)
    rtt20 = _rtt_ms(net, "dispatcher", "edge3")
    mbps = _iperf(net, "edge3", "dispatcher", 5302, tmp_path, seconds=3)
    heal(ctx, step, detail)
    step, detail = inject(ctx, "link.delay", ["edge3", "s1"], delay=0.020, jitter=0.005)
    jittered = [float(x) for x in re.findall(r"time=([\d.]+)", net.cmd(
        "dispatcher", f"ping -U -c 30 -i 0.05 {net.ip('edge3')}"))]
    heal(ctx, step, detail)
    print(f"measured RTT: base {base:.2f} ms, 10 ms link {rtt10:.2f} ms, 20 ms link "
          f"{rtt20:.2f} ms, healed {healed:.2f} ms; 100 Mbit + 20 ms: {mbps:.1f} Mbit/s; "
          f"jitter 5 ms: RTT {min(jittered):.1f}..{max(jittered):.1f} ms")
    assert 19.5 <= rtt10 <= 23 and 39.5 <= rtt20 <= 44 and healed < 2
    assert mbps >= 70
    # 20 +- 5 ms each way: 30..50 ms, with room above for a busy machine's scheduling
    assert min(jittered) >= 29 and max(jittered) <= 60 and max(jittered) - min(jittered) > 3
    assert net.link_state("edge3", "s1")["delay_ms"] == 0


def _ping_loss(net: EmulatedNetwork, src: str, dst: str, count: int = 400) -> float:
    out = net.cmd(src, f"ping -q -f -c {count} -W 0.1 {net.ip(dst)}")
    sent, received = (int(word) for word in re.search(
        r"(\d+) packets transmitted, (\d+) received", out).groups())
    return 100 * (sent - received) / sent


def test_loss_is_measured_and_restored(net: EmulatedNetwork) -> None:
    """20% loss each way: a ping round trip is lost 1 - 0.8^2 = 36% of the time."""
    ctx = Context(net, Hooks())
    step, detail = inject(ctx, "link.loss", ["edge2", "s1"], loss=20.0)
    lost = _ping_loss(net, "dispatcher", "edge2")
    heal(ctx, step, detail)
    healed = _ping_loss(net, "dispatcher", "edge2", count=100)
    print(f"measured link.loss 20%: ping loss {lost:.1f}% (expect 36%), healed {healed:.1f}%")
    assert 26 <= lost <= 46 and healed == 0


def test_link_down_and_up(net: EmulatedNetwork) -> None:
    ctx = Context(net, Hooks())
    step, detail = inject(ctx, "link.down", ["edge5", "s1"])
    assert not reachable(net, "dispatcher", "edge5")
    heal(ctx, step, detail)
    assert wait_for(lambda: reachable(net, "dispatcher", "edge5"))


def test_partition_blocks_only_between_the_groups(net: EmulatedNetwork) -> None:
    ctx = Context(net, Hooks())
    step, detail = inject(ctx, "link.partition", [["edge1", "edge2"], ["edge3"]])
    blocked = [("edge1", "edge3"), ("edge3", "edge1"), ("edge2", "edge3"), ("edge3", "edge2")]
    open_ = [("edge1", "edge2"), ("edge1", "dispatcher"), ("edge3", "dispatcher"),
             ("edge3", "edge4"), ("edge4", "edge1")]
    assert [pair for pair in blocked if reachable(net, *pair)] == []
    assert [pair for pair in open_ if not reachable(net, *pair)] == []
    # the smaller side alone holds the rules (links.partition_rules)
    assert {h for (h, chain), rules in net.links.chains.items()
            if chain == PARTITION_CHAIN and rules} == {"edge3"}
    heal(ctx, step, detail)
    assert [pair for pair in blocked if not reachable(net, *pair)] == []


# -- io -------------------------------------------------------------------------------------


def test_disk_full_gives_enospc_then_heals(net: EmulatedNetwork) -> None:
    ctx = Context(net, Hooks())
    data = net.data_dir("edge4")
    step, detail = inject(ctx, "io.disk_full", "edge4")
    assert detail["filled_bytes"] >= net.topology.hosts["edge4"].disk_bytes - (1 << 20)
    full = net.run("edge4", ["dd", "if=/dev/zero", f"of={data}/x", "bs=4k", "count=1"])
    assert full.returncode != 0 and "No space left on device" in full.stderr
    heal(ctx, step, detail)
    ok = net.run("edge4", ["dd", "if=/dev/zero", f"of={data}/x", "bs=1M", "count=8"])
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in data.iterdir()) == ["x"]
    (data / "x").unlink()


def test_read_only_gives_erofs_then_heals(net: EmulatedNetwork) -> None:
    ctx = Context(net, Hooks())
    data = net.data_dir("edge5")
    step, detail = inject(ctx, "io.read_only", "edge5")
    refused = net.run("edge5", ["touch", f"{data}/x"])
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    heal(ctx, step, detail)
    assert net.run("edge5", ["touch", f"{data}/x"]).returncode == 0
    (data / "x").unlink()


def test_corrupt_model_changes_the_sha256(net: EmulatedNetwork) -> None:
    models = net.data_dir("edge1") / "models"
    models.mkdir(exist_ok=True)
    model = models / "stage.onnx"
    model.write_bytes(os.urandom(100_000))
    (models / "notes.txt").write_bytes(b"not a model")
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    _, detail = inject(Context(net, Hooks()), "io.corrupt_model", "edge1")
    assert detail == {"files": ["stage.onnx"]}
    assert hashlib.sha256(model.read_bytes()).hexdigest() != before
    assert (models / "notes.txt").read_bytes() == b"not a model"
    assert model.stat().st_size == 100_000


SERVER = """
    import socket, time
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 7070))
    s.listen()
    while True:
        c, _ = s.accept()
        print("accepted", flush=True)
"""

CLIENT = """
    import socket, time
    for _ in range(100):
        try:
            c = socket.create_connection(({ip!r}, 7070))
            break
        except OSError:
            time.sleep(0.05)
    print("connected", flush=True)
    try:
        print("recv", c.recv(10), flush=True)
    except OSError as exc:
        print("error", exc.errno, flush=True)
"""


def test_conn_reset_kills_an_established_connection(net: EmulatedNetwork,
                                                     tmp_path: Path) -> None:
    python_in(net, "dispatcher", SERVER, tmp_path / "server.log")
    client_log = tmp_path / "client.log"
    python_in(net, "edge5", CLIENT.format(ip=net.ip("dispatcher")), client_log)
    assert wait_for(lambda: "connected" in client_log.read_text())
    time.sleep(0.1)
    _, detail = inject(Context(net, Hooks()), "io.conn_reset", "edge5")
    assert detail["connections"] >= 1
    assert wait_for(lambda: "error" in client_log.read_text() or "recv" in client_log.read_text(),
                    3.0)
    print(f"conn_reset: {detail}, client saw: {client_log.read_text().split()[-2:]}")
    assert "error 103" in client_log.read_text()  # ECONNABORTED: the socket was destroyed
    # the server's listening socket survived: a new connection is accepted
    python_in(net, "edge5", CLIENT.format(ip=net.ip("dispatcher")), tmp_path / "again.log")
    assert wait_for(lambda: "connected" in (tmp_path / "again.log").read_text())
    net.kill_host("edge5")
    net.kill_host("dispatcher")


# -- the per-host sampler of timeseries.csv, on the same network ----------------------------


def test_host_monitor_reads_cpu_and_memory(net: EmulatedNetwork, tmp_path: Path) -> None:
    monitor = HostMonitor.for_network(net, interval_s=0.25)
    python_in(net, "edge1", "b = bytearray(64 << 20)\nwhile True: pass", tmp_path / "spin.log")
    time.sleep(0.5)
    start = time.time()
    monitor.start()
    time.sleep(2.1)
    monitor.stop()
    net.kill_host("edge1")
    buckets = monitor.buckets(start, 2.0)
    print(f"hostmon: {buckets}")
    for row in buckets.values():
        assert 0.2 <= row["edge1_cpu"] <= 0.33      # edge1 is limited to 0.3 cores
        assert row["edge1_mem_mb"] >= 64
        assert row["edge4_cpu"] < 0.02              # idle


# -- timeline on a real network -------------------------------------------------------------


def test_timeline_fires_on_time_and_heals_everything(net: EmulatedNetwork) -> None:
    steps = [
        Step(0.2, "link.bandwidth", ["edge4", "s1"], {"bandwidth": 20.0}, 0.3, 1),
        Step(0.3, "node.cpu", "edge2", {"cpu": 0.05}, None, 2),
        Step(0.4, "link.loss", ["edge2", "s1"], {"loss": 5.0}, 0.2, 3),
        Step(0.5, "io.read_only", "edge5", {}, None, 4),
        Step(0.6, "link.delay", ["edge1", "s1"], {"delay": 0.005}, None, 5),
        Step(0.7, "link.partition", [["edge1"], ["edge4"]], {}, None, 6),
    ]
    timeline = FaultTimeline(steps, net, Hooks())
    timeline.prepare()  # the driver does this once the network is up: delay shims start
    start = time.time() + 0.1
    timeline.start(start)
    time.sleep(1.2)
    timeline.stop()
    in_run = list(timeline.events)
    timeline.heal_all()
    print("late_ms:", [(e["action"], e["type"][6:], e["late_ms"], e["took_ms"])
                       for e in timeline.events])
    assert not [e for e in timeline.events if e.get("error")]
    assert [e["type"] for e in in_run].count("fault.injected") == 6
    # on time: within 50 ms of when it was due, or of when the step before it finished
    # (steps run one at a time; a tc call takes tens of ms on a loaded machine)
    previous_end = 0.0
    for event in sorted(in_run, key=lambda e: e["t"]):
        due = event["t"] - event["late_ms"] / 1000
        assert event["t"] - max(due, previous_end) < 0.050, in_run
        previous_end = event["t"] + event["took_ms"] / 1000
    assert len([e for e in timeline.events if e.get("final")]) == 4
    assert net.link_state("edge4", "s1")["bandwidth_mbps"] == 100
    assert net.host_cpu("edge2") == pytest.approx(0.2)
    assert net.link_state("edge2", "s1")["loss_pct"] == 0
    assert net.link_state("edge1", "s1")["delay_ms"] == 0
    assert net.run("edge5", ["touch", f"{net.data_dir('edge5')}/y"]).returncode == 0
    (net.data_dir("edge5") / "y").unlink()
    assert reachable(net, "edge1", "edge4")


def test_stop_with_faults_in_force_leaves_nothing(state_dir: Path, tmp_path: Path) -> None:
    """Frozen processes, a full and read-only disk, delay shims and partitions: stop()
    removes all of it (the freezer cgroup, the shim processes) by the run's record."""
    network = EmulatedNetwork(load_topology(STAR5), run_id=fresh_run_id("tf"), run_dir=tmp_path)
    network.build()
    ctx = Context(network, Hooks())
    proc = network.popen("edge1", ["sleep", "600"], tmp_path / "sleep.log")
    inject(ctx, "node.pause", "edge1")
    inject(ctx, "link.delay", ["edge2", "s1"], delay=0.005)
    inject(ctx, "link.partition", [["edge3"], ["edge4"]])
    inject(ctx, "io.disk_full", "edge5")
    inject(ctx, "io.read_only", "edge5")
    shims = [p for p in network.record.processes if p["what"] == "delayshim"]
    assert shims and leftovers(network.run_id)
    assert network.stop() == []
    assert proc.poll() is not None
    assert leftovers(network.run_id) == []
    assert all(records.process_gone(p["pid"], p["start"]) for p in shims)
    assert not (tmp_path / "shims").exists()
