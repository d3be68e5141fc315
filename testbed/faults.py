"""Faults on a timeline. A `FaultTimeline` fires the scenario's steps at their times (from the
start of the measured window), records when each really fired, heals steps that have a
duration, and heals everything at the end. Each action is a pair of functions (inject, heal)
acting on the EmulatedNetwork; the registry below is the one list of what is supported, and
`check_supported` refuses the rest before any network exists."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from testbed.errors import InputError
from testbed.scenario import Scenario, Step

SPIN_S = 0.002        # sleep until this close to a step's time, then spin: fires within ~1 ms
LATE_LIMIT_MS = 250   # a step later than this marks the run invalid (summary)

Action = Callable[[Any, Step], None]


@dataclass(frozen=True)
class FaultKind:
    inject: Action
    heal: Action | None          # None: the action is its own heal (e.g. link.up)


def _crash(net: Any, step: Step) -> None:
    net.signal_host(step.target, signal.SIGKILL)


def _link_down(net: Any, step: Step) -> None:
    net.link_down(*step.target)


def _link_up(net: Any, step: Step) -> None:
    net.link_up(*step.target)


def _link_bandwidth(net: Any, step: Step) -> None:
    key = tuple(step.target)
    step_state.setdefault(("bw", key), net.topology.link(*key).bandwidth_mbps)
    net.set_link_bandwidth(*key, step.params["bandwidth"])


def _link_bandwidth_heal(net: Any, step: Step) -> None:
    key = tuple(step.target)
    net.set_link_bandwidth(*key, step_state.pop(("bw", key)))


def _link_loss(net: Any, step: Step) -> None:
    net.set_link_loss(*step.target, step.params["loss"])


def _link_loss_heal(net: Any, step: Step) -> None:
    net.set_link_loss(*step.target, net.topology.link(*step.target).loss_pct)


# What a step changed that its heal must restore (previous bandwidths, ...).
step_state: dict[tuple[str, tuple[str, ...]], Any] = {}

FAULTS: dict[str, FaultKind] = {
    "node.crash": FaultKind(_crash, None),
    "link.down": FaultKind(_link_down, _link_up),
    "link.up": FaultKind(_link_up, None),
    "link.bandwidth": FaultKind(_link_bandwidth, _link_bandwidth_heal),
    "link.loss": FaultKind(_link_loss, _link_loss_heal),
}


def check_supported(scenario: Scenario) -> None:
    """Refuse, before any network is built, steps this version cannot inject."""
    for step in scenario.steps:
        if step.action not in FAULTS:
            raise InputError(f"action {step.action} is valid but not supported by this version "
                             f"(supported: {', '.join(sorted(FAULTS))})",
                             file=scenario.path, line=step.line, field="action")


class FaultTimeline:
    """Fires steps on time in a thread; `events` collects what happened (events.jsonl)."""

    def __init__(self, steps: list[Step], net: Any) -> None:
        self.net = net
        self.events: list[dict[str, Any]] = []
        self.last = ""
        self._pending_heals: list[Step] = []
        # (time from window start, step, is_heal)
        self._schedule = sorted(
            [(s.at_s, s, False) for s in steps]
            + [(s.at_s + s.duration_s, s, True) for s in steps
               if s.duration_s is not None and FAULTS[s.action].heal is not None],
            key=lambda item: item[0])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, window_start: float) -> None:
        if not self._schedule:
            return
        self._thread = threading.Thread(target=self._run, args=(window_start,),
                                        name="fault-timeline", daemon=True)
        self._thread.start()

    def _wait_until(self, target: float) -> bool:
        while True:
            remaining = target - time.time()
            if remaining <= 0:
                return True
            if self._stop.wait(max(0.0, remaining - SPIN_S)) and remaining > SPIN_S:
                return False

    def _run(self, window_start: float) -> None:
        for offset, step, is_heal in self._schedule:
            if not self._wait_until(window_start + offset):
                return
            self._fire(step, is_heal, window_start + offset)

    def _fire(self, step: Step, is_heal: bool, due: float) -> None:
        kind = FAULTS[step.action]
        action = kind.heal if is_heal else kind.inject
        assert action is not None
        with self._lock:
            fired = time.time()
            error = None
            try:
                action(self.net, step)
            except Exception as exc:  # noqa: BLE001  (a failed injection is reported, not fatal)
                error = f"{type(exc).__name__}: {exc}"
            if not is_heal and kind.heal is not None:
                self._pending_heals.append(step)
            if is_heal and step in self._pending_heals:
                self._pending_heals.remove(step)
            event = {"t": fired, "type": "fault.healed" if is_heal else "fault.injected",
                     "action": step.action, "target": step.target, "params": step.params,
                     "late_ms": round((fired - due) * 1000, 3), "source": "driver"}
            if error:
                event["error"] = error
            self.events.append(event)
            self.last = f"{'heal' if is_heal else 'fault'} {step.action}"

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def heal_all(self) -> None:
        """The final heal phase: undo every fault still in force."""
        self.stop()
        for step in list(self._pending_heals):
            self._fire(step, True, time.time())
