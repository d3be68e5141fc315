"""Faults on a timeline. A `FaultTimeline` fires the scenario's steps at their times (from the
start of the measured window), records when each really fired, heals steps that have a
duration, and heals everything still in force at the end.

Division of labour: the scenario says what and when (`formats.scenario`); this module maps
each action onto the emulated network's operations (`testbed.emulation.network`: links, host
processes,
cgroups, data directories) and onto the driver's hooks for what only the driver can do
(start a host's software again, talk to the controller). The registry `FAULTS` is the one list
of what is supported; `check_supported` refuses the rest before any network exists.

Every action is an inject function returning a `detail` dict (written into the event, and
handed to the heal so it can restore what was there: the previous bandwidth, CPU limit...),
and an optional heal. A step with `duration` heals itself; `node.resume` and `link.up` heal the
`node.pause` / `link.down` in force on their target, `node.restart` ends a crash or pause in
force and `node.crash` a pause (formats.nodestate: the node state machine scenarios are checked
by); the final heal phase (`heal_all`) undoes
the rest, newest first, and only touches the machine: it starts no software, the run is over.

Timing: the thread sleeps until ~2 ms before a step and spins the rest, so a step fires within
a millisecond or two of its time unless the step before it is still running (steps run one at
a time: Mininet's node shells are not thread-safe). `late_ms` in each event is the truth; the
results mark a run invalid when a step fired more than `LATE_LIMIT_MS` late.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from formats.errors import InputError
from formats.nodestate import ENDS
from formats.scenario import Scenario, Step
from formats.topology import MIN_CPU

SPIN_S = 0.002        # sleep until this close to a step's time, then spin: fires within ~1 ms
LATE_LIMIT_MS = 250   # a step later than this marks the run invalid (summary)

Detail = dict[str, Any]


def _no_restart(host: str) -> None:
    raise RuntimeError(f"no restart hook: the driver did not say how to restart {host}")


def _no_controller(cmd: str, **fields: Any) -> dict[str, Any] | None:
    raise RuntimeError(f"no controller hook: cannot send {cmd!r}")


def _no_publish(version: int) -> Any:
    raise RuntimeError(f"no publish hook: cannot publish model version {version}")


@dataclass(frozen=True)
class Hooks:
    """What only the driver can do, called from the timeline's thread.

    restart_host(host): start the host's software again (the embedded driver: its agent)
        after its processes were killed (node.restart, and the heal of node.crash);
    controller(cmd, **fields): a command to the controller, its reply or None on timeout;
    publish_version(n): put model version n (prepared before the run) into the repository
        the controller watches; returns its manifest.
    """

    restart_host: Callable[[str], None] = _no_restart
    controller: Callable[..., dict[str, Any] | None] = _no_controller
    publish_version: Callable[[int], Any] = _no_publish


@dataclass
class Context:
    net: Any
    hooks: Hooks
    final: bool = False   # the final heal phase: restore the machine, start nothing


Inject = Callable[[Context, Step], Detail]
Heal = Callable[[Context, Step, Detail], Detail]


@dataclass(frozen=True)
class FaultKind:
    inject: Inject
    heal: Heal | None = None     # None: nothing to undo (or the action is itself a heal)
    cancels: tuple[str, ...] = ()  # ends these actions in force on the same target (their
    # heal never fires): formats.nodestate.ENDS, the state machine the scenario is checked by
    prepare: Callable[[Any], None] | None = None  # before the window, once per run (net)


# -- node -----------------------------------------------------------------------------------


def _crash(ctx: Context, step: Step) -> Detail:
    return {"killed": ctx.net.crash_host(step.target)}


def _crash_heal(ctx: Context, step: Step, _detail: Detail) -> Detail:
    ctx.net.host_up(step.target)
    if ctx.final:
        return {"restarted": False}
    ctx.hooks.restart_host(step.target)
    return {"restarted": True}


def _pause(ctx: Context, step: Step) -> Detail:
    return {"frozen": ctx.net.pause_host(step.target)}


def _resume(ctx: Context, step: Step, _detail: Detail | None = None) -> Detail:
    ctx.net.resume_host(step.target)
    return {}


def _restart(ctx: Context, step: Step) -> Detail:
    # a reboot from any state (formats.nodestate): whatever runs is killed (a paused host is
    # thawed to die), then the machine is powered and linked again, which after a crash is
    # the return of the machine, and its software starts
    killed = ctx.net.kill_host(step.target)
    ctx.net.host_up(step.target)
    ctx.hooks.restart_host(step.target)
    return {"killed": killed}


def _cpu(ctx: Context, step: Step) -> Detail:
    previous = ctx.net.host_cpu(step.target)
    ctx.net.set_host_cpu(step.target, step.params["cpu"])
    return {"previous_cores": previous}


def _cpu_heal(ctx: Context, step: Step, detail: Detail) -> Detail:
    ctx.net.set_host_cpu(step.target, detail["previous_cores"])
    return {"cores": detail["previous_cores"]}


# -- link -----------------------------------------------------------------------------------


def _link_down(ctx: Context, step: Step) -> Detail:
    ctx.net.link_down(*step.target)
    return {}


def _link_up(ctx: Context, step: Step, _detail: Detail | None = None) -> Detail:
    ctx.net.link_up(*step.target)
    return {}


def _bandwidth(ctx: Context, step: Step) -> Detail:
    previous = ctx.net.link_state(*step.target)["bandwidth_mbps"]
    ctx.net.set_link_bandwidth(*step.target, step.params["bandwidth"])
    return {"previous_mbps": previous}


def _bandwidth_heal(ctx: Context, step: Step, detail: Detail) -> Detail:
    ctx.net.set_link_bandwidth(*step.target, detail["previous_mbps"])
    return {"mbps": detail["previous_mbps"]}


def _delay_prepare(net: Any) -> None:
    net.prepare_delay()


def _delay(ctx: Context, step: Step) -> Detail:
    state = ctx.net.link_state(*step.target)
    ctx.net.set_link_delay(*step.target, step.params["delay"] * 1000,
                           step.params.get("jitter", 0.0) * 1000)
    return {"previous_delay_ms": state["delay_ms"], "previous_jitter_ms": state["jitter_ms"]}


def _delay_heal(ctx: Context, step: Step, detail: Detail) -> Detail:
    ctx.net.set_link_delay(*step.target, detail["previous_delay_ms"],
                           detail["previous_jitter_ms"])
    return {"delay_ms": detail["previous_delay_ms"]}


def _loss(ctx: Context, step: Step) -> Detail:
    previous = ctx.net.link_state(*step.target)["loss_pct"]
    ctx.net.set_link_loss(*step.target, step.params["loss"])
    return {"previous_pct": previous}


def _loss_heal(ctx: Context, step: Step, detail: Detail) -> Detail:
    ctx.net.set_link_loss(*step.target, detail["previous_pct"])
    return {"pct": detail["previous_pct"]}


def _partition(ctx: Context, step: Step) -> Detail:
    ctx.net.partition(*step.target)
    return {}


def _partition_heal(ctx: Context, step: Step, _detail: Detail) -> Detail:
    ctx.net.heal_partition(*step.target)
    return {}


# -- io -------------------------------------------------------------------------------------


def _disk_full(ctx: Context, step: Step) -> Detail:
    return {"filled_bytes": ctx.net.fill_disk(step.target)}


def _disk_free(ctx: Context, step: Step, _detail: Detail) -> Detail:
    ctx.net.free_disk(step.target)
    return {}


def _read_only(ctx: Context, step: Step) -> Detail:
    ctx.net.remount_data_dir(step.target, read_only=True)
    return {}


def _read_write(ctx: Context, step: Step, _detail: Detail) -> Detail:
    ctx.net.remount_data_dir(step.target, read_only=False)
    return {}


def _corrupt_model(ctx: Context, step: Step) -> Detail:
    return {"files": ctx.net.corrupt_models(step.target)}


def _conn_reset(ctx: Context, step: Step) -> Detail:
    return {"connections": ctx.net.reset_connections(step.target)}


def _model_update(ctx: Context, step: Step) -> Detail:
    manifest = ctx.hooks.publish_version(step.params["version"])
    return {"version": manifest.version, "sha256": manifest.sha256}


def _model_rollback(ctx: Context, step: Step) -> Detail:
    reply = ctx.hooks.controller("rollback")
    if not reply or not reply.get("ok"):
        raise RuntimeError(f"the controller refused the rollback: {reply}")
    return {"reply": {k: v for k, v in reply.items() if k != "ok"}}


FAULTS: dict[str, FaultKind] = {
    "node.crash": FaultKind(_crash, _crash_heal, cancels=ENDS["node.crash"]),
    "node.pause": FaultKind(_pause, _resume),
    "node.resume": FaultKind(_resume, cancels=ENDS["node.resume"]),
    "node.restart": FaultKind(_restart, cancels=ENDS["node.restart"]),
    "node.cpu": FaultKind(_cpu, _cpu_heal),
    "link.down": FaultKind(_link_down, _link_up),
    "link.up": FaultKind(_link_up, cancels=("link.down",)),
    "link.bandwidth": FaultKind(_bandwidth, _bandwidth_heal),
    "link.delay": FaultKind(_delay, _delay_heal, prepare=_delay_prepare),
    "link.loss": FaultKind(_loss, _loss_heal),
    "link.partition": FaultKind(_partition, _partition_heal),
    "io.disk_full": FaultKind(_disk_full, _disk_free),
    "io.read_only": FaultKind(_read_only, _read_write),
    "io.corrupt_model": FaultKind(_corrupt_model),
    "io.conn_reset": FaultKind(_conn_reset),
    "model.update": FaultKind(_model_update),
    "model.rollback": FaultKind(_model_rollback),
}


def check_supported(scenario: Scenario) -> None:
    """Refuse, before any network is built, steps this version or this machine cannot do."""
    machine = os.cpu_count() or 1
    for step in scenario.steps:
        found = _step_problem(step, machine, scenario) or _mechanism_problem(step)
        if found is not None:
            message, where = found
            raise InputError(message, file=scenario.path, line=step.line, field=where)


def _mechanism_problem(step: Step) -> tuple[str, str] | None:
    """Delay and loss need netem or their netfilter mechanism on this machine (probed once
    per process, and only if a step needs it)."""
    from testbed.emulation.netfilter import nfqueue_available
    from testbed.emulation.network import iptables_statistic_available, netem_available

    if step.action == "link.delay" and not (netem_available() or nfqueue_available()):
        return ("no delay mechanism on this machine: no netem, and the NFQUEUE shim cannot "
                "run (PyPI netfilterqueue, iptables NFQUEUE target)", "action")
    if step.action == "link.loss" and not (netem_available() or iptables_statistic_available()):
        return ("no loss mechanism on this machine: neither netem nor iptables' statistic "
                "match", "action")
    return None


def _step_problem(step: Step, machine_cores: int,
                  scenario: Scenario) -> tuple[str, str] | None:
    """What is wrong with a step whatever the machine: (message, field) or None."""
    kind = FAULTS.get(step.action)
    if kind is None:
        return (f"action {step.action} is valid but not supported by this version "
                f"(supported: {', '.join(sorted(FAULTS))})", "action")
    if (step.action in ("node.crash", "node.pause", "node.restart")
            and step.target == scenario.topology.dispatcher().name):
        return (f"{step.target} is the dispatcher host: it runs the controller and the load "
                f"generator, so {step.action} there would end the run, not test recovery",
                "target")
    if step.duration_s is not None and kind.heal is None:
        return f"{step.action} has nothing to undo, so it takes no duration", "duration"
    if step.action == "node.cpu" and not MIN_CPU <= step.params["cpu"] <= machine_cores:
        return (f"cpu {step.params['cpu']:g} must be between {MIN_CPU} and this machine's "
                f"{machine_cores} cores", "params.cpu")
    if step.action == "link.delay" and step.params.get("jitter", 0.0) > step.params["delay"]:
        return "jitter is larger than the delay it varies", "params.jitter"
    return None


@dataclass(order=True)
class _Entry:
    due_s: float                   # from the start of the measured window
    heal_first: int                # at the same time, heals go before injections
    index: int                     # the step's position in the scenario
    is_heal: bool = field(compare=False)


class FaultTimeline:
    """Fires steps on time in a thread; `events` collects what happened (events.jsonl);
    `last` is a short description of the latest fault, for the progress line."""

    def __init__(self, steps: list[Step], net: Any, hooks: Hooks | None = None) -> None:
        self.steps = list(steps)
        self.ctx = Context(net, hooks or Hooks())
        self.events: list[dict[str, Any]] = []
        self.last = ""
        self._active: dict[int, Detail] = {}     # step index -> its inject detail, in order
        self._schedule = sorted(
            [_Entry(s.at_s, 1, i, False) for i, s in enumerate(self.steps)]
            + [_Entry(s.at_s + s.duration_s, 0, i, True) for i, s in enumerate(self.steps)
               if s.duration_s is not None and FAULTS[s.action].heal is not None])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._prepared = False

    def prepare(self) -> None:
        """What some actions need ready before their first step (the delay shims), so that
        the step itself lands on time. The driver calls this once the network is up;
        `start` does it otherwise. Idempotent; a failure is raised (the run cannot go on
        as scripted)."""
        with self._lock:
            if self._prepared:
                return
            for action in sorted({step.action for step in self.steps}):
                prepare = FAULTS[action].prepare
                if prepare is not None:
                    prepare(self.ctx.net)
            self._prepared = True

    def start(self, window_start: float) -> None:
        """Fire the steps relative to `window_start` (unix time) from a thread."""
        if not self._schedule:
            return
        self.prepare()
        self._thread = threading.Thread(target=self._run, args=(window_start,),
                                        name="fault-timeline", daemon=True)
        self._thread.start()

    def _wait_until(self, target: float) -> bool:
        """Sleep until `target` (unix time), spinning the last SPIN_S; False if stopped."""
        while True:
            remaining = target - time.time()
            if remaining <= 0:
                return not self._stop.is_set()
            if remaining > SPIN_S and self._stop.wait(remaining - SPIN_S):
                return False

    def _run(self, window_start: float) -> None:
        for entry in self._schedule:
            due = window_start + entry.due_s
            if not self._wait_until(due):
                return
            if entry.is_heal:
                self._heal(entry.index, due)
            else:
                self._inject(entry.index, due)

    def _inject(self, index: int, due: float) -> None:
        step, kind = self.steps[index], FAULTS[self.steps[index].action]
        with self._lock:
            fired = time.time()
            detail, error = self._call(lambda: kind.inject(self.ctx, step))
            if error is None and kind.heal is not None:
                self._active[index] = detail
            self._record("fault.injected", index, due, fired, detail, error)
            if error is None:
                for other in [i for i in self._active if self.steps[i].action in kind.cancels
                              and self.steps[i].target == step.target]:
                    del self._active[other]
                    self._record("fault.healed", other, fired, fired, {"by": step.action},
                                 None)

    def _heal(self, index: int, due: float) -> None:
        with self._lock:
            if index not in self._active:  # healed already (by link.up, node.resume, ...)
                return
            heal = FAULTS[self.steps[index].action].heal
            assert heal is not None
            fired = time.time()
            inject_detail = self._active.pop(index)
            detail, error = self._call(lambda: heal(self.ctx, self.steps[index], inject_detail))
            self._record("fault.healed", index, due, fired, detail, error)

    @staticmethod
    def _call(action: Callable[[], Detail]) -> tuple[Detail, str | None]:
        try:
            return action() or {}, None
        except Exception as exc:  # noqa: BLE001  (a failed fault is reported, not fatal)
            return {}, f"{type(exc).__name__}: {exc}"

    def _record(self, kind: str, index: int, due: float, fired: float, detail: Detail,
                error: str | None) -> None:
        step = self.steps[index]
        event: dict[str, Any] = {
            "t": fired, "type": kind, "action": step.action, "target": step.target,
            "params": step.params, "step": index, "late_ms": round((fired - due) * 1000, 3),
            "took_ms": round((time.time() - fired) * 1000, 3), "source": "driver",
            "detail": detail}
        if self.ctx.final:
            event["final"] = True
        if error:
            event["error"] = error
        self.events.append(event)
        self.last = f"{'heal' if kind == 'fault.healed' else 'fault'} {step.action}" + (
            " FAILED" if error else "")

    def stop(self) -> None:
        """Stop firing (steps not yet due never fire); faults in force stay in force."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def heal_all(self) -> None:
        """The final heal phase: undo every fault still in force, newest first. Idempotent."""
        self.stop()
        with self._lock:
            self.ctx.final = True
        for index in reversed(list(self._active)):
            self._heal(index, time.time())
