"""The fault timeline's scheduling, without a network: a fake network records what was asked
and when. Steps fire on time (and say how late they were), a step with a duration heals
itself, node.resume / link.up heal what they undo, the final heal phase undoes the rest newest
first without starting anything, failures are reported without stopping the run, and
unsupported steps are refused before anything is built."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from formats.errors import InputError
from formats.scenario import Step, load_scenario
from testbed.experiment.faults import FAULTS, FaultTimeline, Hooks, check_supported

ROOT = Path(__file__).resolve().parent.parent


class FakeNet:
    """Just enough of EmulatedNetwork: records calls with their time."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str, tuple[Any, ...]]] = []
        self.bandwidth = 100.0
        self.cores = 0.2

    def _note(self, name: str, *args: Any) -> None:
        self.calls.append((time.time(), name, args))

    def link_state(self, a: str, b: str) -> dict[str, float]:
        return {"bandwidth_mbps": self.bandwidth, "delay_ms": 0.0, "jitter_ms": 0.0,
                "loss_pct": 0.0}

    def set_link_bandwidth(self, a: str, b: str, mbps: float) -> None:
        self._note("bandwidth", a, b, mbps)
        self.bandwidth = mbps

    def host_cpu(self, host: str) -> float:
        return self.cores

    def set_host_cpu(self, host: str, cores: float) -> None:
        self._note("cpu", host, cores)
        self.cores = cores

    def crash_host(self, host: str) -> int:
        self._note("crash", host)
        return 2

    def kill_host(self, host: str) -> int:
        self._note("kill", host)
        return 1

    def host_up(self, host: str) -> None:
        self._note("up", host)

    def pause_host(self, host: str) -> int:
        self._note("pause", host)
        return 1

    def resume_host(self, host: str) -> None:
        self._note("resume", host)

    def link_down(self, a: str, b: str) -> None:
        self._note("down", a, b)

    def link_up(self, a: str, b: str) -> None:
        self._note("link_up", a, b)

    def fill_disk(self, host: str) -> int:
        raise OSError(28, "No space left on device")

    def free_disk(self, host: str) -> None:
        self._note("free", host)


def step(at: float, action: str, target: Any, duration: float | None = None,
         **params: Any) -> Step:
    return Step(at, action, target, params, duration, 1)


def run(timeline: FaultTimeline, seconds: float) -> float:
    start = time.time() + 0.05
    timeline.start(start)
    time.sleep(start - time.time() + seconds)
    timeline.stop()
    return start


def test_steps_fire_on_time_and_heal_after_their_duration() -> None:
    net = FakeNet()
    timeline = FaultTimeline([step(0.05, "link.bandwidth", ["edge1", "s1"], 0.1,
                                   bandwidth=10.0),
                              step(0.1, "node.cpu", "edge2", cpu=0.05)], net)
    start = run(timeline, 0.3)
    assert [c[1:] for c in net.calls] == [("bandwidth", ("edge1", "s1", 10.0)),
                                          ("cpu", ("edge2", 0.05)),
                                          ("bandwidth", ("edge1", "s1", 100.0))]
    for (t, _, _), due in zip(net.calls, (0.05, 0.1, 0.15)):
        assert 0 <= t - (start + due) < 0.05
    events = timeline.events
    assert [e["type"] for e in events] == ["fault.injected", "fault.injected", "fault.healed"]
    assert all(0 <= e["late_ms"] < 50 for e in events)
    assert events[0]["detail"] == {"previous_mbps": 100.0}
    assert events[2]["detail"] == {"mbps": 100.0}
    assert timeline.last == "heal link.bandwidth"
    # the final heal phase restores the CPU limit (no duration), and marks it final
    timeline.heal_all()
    assert net.calls[-1][1:] == ("cpu", ("edge2", 0.2))
    assert timeline.events[-1]["final"] is True and timeline.events[-1]["step"] == 1
    timeline.heal_all()  # idempotent
    assert len(timeline.events) == 4


def test_resume_and_link_up_heal_what_they_undo() -> None:
    net = FakeNet()
    timeline = FaultTimeline([step(0.0, "node.pause", "edge1"),
                              step(0.0, "link.down", ["edge2", "s1"]),
                              step(0.05, "node.resume", "edge1"),
                              step(0.05, "link.up", ["edge2", "s1"])], net)
    run(timeline, 0.15)
    healed = [(e["action"], e["detail"]) for e in timeline.events if e["type"] == "fault.healed"]
    assert healed == [("node.pause", {"by": "node.resume"}), ("link.down", {"by": "link.up"})]
    calls = len(net.calls)
    timeline.heal_all()  # nothing left in force
    assert len(net.calls) == calls


def test_final_heal_is_newest_first_and_starts_nothing() -> None:
    net = FakeNet()
    restarted: list[str] = []
    timeline = FaultTimeline([step(0.0, "node.cpu", "edge1", cpu=0.1),
                              step(0.02, "node.cpu", "edge1", cpu=0.05),
                              step(0.04, "node.crash", "edge2")], net,
                             Hooks(restart_host=restarted.append))
    run(timeline, 0.1)
    timeline.heal_all()
    assert [c[1:] for c in net.calls[3:]] == [("up", ("edge2",)), ("cpu", ("edge1", 0.1)),
                                              ("cpu", ("edge1", 0.2))]
    assert restarted == [] and net.cores == 0.2


def test_crash_with_a_duration_restarts_through_the_hook() -> None:
    net = FakeNet()
    restarted: list[str] = []
    timeline = FaultTimeline([step(0.0, "node.crash", "edge3", 0.05)], net,
                             Hooks(restart_host=restarted.append))
    run(timeline, 0.1)
    assert restarted == ["edge3"] and timeline.events[-1]["detail"] == {"restarted": True}


def test_failures_are_reported_not_fatal() -> None:
    net = FakeNet()
    timeline = FaultTimeline([step(0.0, "io.disk_full", "edge1"),
                              step(0.02, "node.restart", "edge1"),
                              step(0.04, "node.cpu", "edge2", cpu=0.1)], net)
    run(timeline, 0.1)
    errors = [e.get("error", "") for e in timeline.events]
    assert "No space left" in errors[0]
    assert "no restart hook" in errors[1]  # no hooks given: the driver must wire them
    assert errors[2] == "" and timeline.last == "fault node.cpu"
    timeline.heal_all()
    assert ("free", ("edge1",)) not in [c[1:] for c in net.calls]  # it never took effect


def test_stop_before_a_step_means_it_never_fires() -> None:
    net = FakeNet()
    timeline = FaultTimeline([step(5.0, "node.cpu", "edge1", cpu=0.1)], net)
    timeline.start(time.time())
    started = time.monotonic()
    timeline.stop()
    assert time.monotonic() - started < 1 and net.calls == []


SCENARIO = """\
name: t
topology: {topology}
model: {{zoo: resnet18}}
workload: {{mode: closed, concurrency: 2, duration: 20s}}
steps:
  - {step}
"""


@pytest.mark.parametrize("text,field,message", [
    ("{at: 1s, action: model.update, params: {version: 2}, duration: 2s}", "duration",
     "takes no duration"),
    ("{at: 1s, action: node.restart, target: edge1, duration: 2s}", "duration",
     "takes no duration"),
    ("{at: 1s, action: io.conn_reset, target: edge1, duration: 2s}", "duration",
     "takes no duration"),
    ("{at: 1s, action: node.cpu, target: edge1, params: {cpu: 64}}", "steps[0].params.cpu",
     "at most this machine's"),
    ("{at: 1s, action: node.crash, target: dispatcher}", "target", "dispatcher host"),
    ("{at: 1s, action: link.delay, target: [edge1, s1], params: {delay: 5ms, jitter: 9ms}}",
     "params.jitter", "larger than the delay"),
])
def test_unsupported_steps_are_refused_before_any_network(tmp_path: Path, text: str,
                                                          field: str, message: str) -> None:
    path = tmp_path / "scenario.yaml"
    path.write_text(SCENARIO.format(topology=ROOT / "topologies" / "star-5.yaml", step=text))
    with pytest.raises(InputError) as caught:
        check_supported(load_scenario(path))
    assert caught.value.field == field and message in str(caught.value)
    assert caught.value.line == 6


def test_every_scenario_action_is_supported() -> None:
    from formats.scenario import ACTIONS

    assert set(FAULTS) == set(ACTIONS)


def test_the_scenario_library_loads_and_is_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every scenario file is valid and supported. The delay and loss probes are forced:
    they need root, this test does not."""
    import testbed.emulation.netfilter
    import testbed.emulation.network

    monkeypatch.setattr(testbed.emulation.netfilter, "nfqueue_available", lambda: True)
    monkeypatch.setattr(testbed.emulation.network, "iptables_statistic_available", lambda: True)
    files = sorted((ROOT / "scenarios").glob("*.yaml"))
    assert len(files) >= 11
    for path in files:
        scenario = load_scenario(path)
        check_supported(scenario)
        # short CI versions (--duration 30s) keep every step of these
        if path.stem in ("node_failure", "link_degradation", "io_faults"):
            assert all(step.at_s < 30 for step in scenario.steps)
