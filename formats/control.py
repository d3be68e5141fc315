"""The control plane's settings, as one typed contract: `ControlSettings` holds every knob of
failure detection, re-planning, rejoin, standbys and back-off, with its default stated once.

Division of labour: this module parses and checks (a scenario's `control:` mapping with
file:line errors, or the flat JSON the backends receive); testbed.control.core applies the
rules; the embedded controller (testbed.control.controller, CONFIG.json) and the k3s loop
(testbed.k8s.loop, controller.json of its inputs) both take a `ControlSettings`. A setting a
backend cannot honour is refused before anything is built (`refuse_unsupported`, exit 2
naming the key), never silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from formats.errors import InputError
from formats.units import parse_duration_s
from formats.yamlfile import Fields

UNHEALTHY_CAP_S = 120.0     # the longest back-off: a failing host gets a chance this often


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"expected a fraction in [0, 1), got {value!r}")
    return float(value)


def _share(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"expected a share in (0, 1], got {value!r}")
    return float(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _straggler_factor(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (value == 0 or value > 1):
        raise ValueError(f"expected a factor above 1 (0: off), got {value!r}")
    return float(value)


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"expected a non-negative number of seconds, got {value!r}")
    return float(value)


def _positive_ms(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"expected a positive number of milliseconds, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Knob:
    """A setting: its scenario key (None: not settable from a scenario), how a scenario value
    is read, and how a JSON value (the backends' config files) is checked."""

    scenario: str | None
    from_scenario: Any
    from_json: Any


# field -> knob. The scenario keys are the user's contract (README, scenarios/); the fields
# are the backends' (CONFIG.json, controller.json).
KNOBS: dict[str, Knob] = {
    "heartbeat_ms": Knob("heartbeat", lambda v: parse_duration_s(v) * 1000, _positive_ms),
    "suspect_after_missed": Knob("suspect_after_missed", _positive_int, _positive_int),
    "replan_delay_s": Knob("replan_delay", parse_duration_s, _seconds),
    "reuse_tolerance": Knob("reuse_tolerance", _fraction, _fraction),
    "rejoin_hold_s": Knob("rejoin_hold", parse_duration_s, _seconds),
    "rejoin_margin": Knob("rejoin_margin", _fraction, _fraction),
    "standby": Knob("standby", _flag, _flag),
    "standby_share": Knob("standby_share", _share, _share),
    "drain_s": Knob("drain", parse_duration_s, _seconds),
    "straggler_factor": Knob("straggler_factor", _straggler_factor, _straggler_factor),
    "straggler_after_s": Knob("straggler_after", parse_duration_s, _seconds),
    "hello_timeout_s": Knob(None, None, _seconds),
    "deploy_timeout_s": Knob(None, None, _seconds),
    "replan": Knob(None, None, _flag),
    "standby_per_node": Knob(None, None, _count),
    "standby_settle_s": Knob(None, None, _seconds),
    "unhealthy_hold_s": Knob(None, None, _seconds),
    "retry_s": Knob(None, None, _seconds),
    "api_grace_s": Knob(None, None, _seconds),
}

# fields the k3s loop does not apply: every k3s epoch starts new stage pods (no standbys, no
# drain, no straggler load reports from pods), and its re-plan waits for nothing simulated
K3S_UNSUPPORTED = frozenset({"standby", "standby_share", "drain_s", "straggler_factor",
                             "straggler_after_s", "replan_delay_s"})


@dataclass(frozen=True)
class ControlSettings:
    """Every control-plane knob with its default (the one place they are written)."""

    heartbeat_ms: float = 200.0         # agent / stage heartbeat interval
    suspect_after_missed: int = 3       # silent this many intervals: suspected
    hello_timeout_s: float = 60.0       # a plan's agents must say hello within this
    deploy_timeout_s: float = 120.0     # deployed workers must be ready within this
    replan: bool = True                 # re-plan after a failure (off: the run fails)
    reuse_tolerance: float = 0.05       # policy.choose: reuse within this of the best
    rejoin_hold_s: float = 5.0          # a returned node must be stable this long
    rejoin_margin: float = 0.10         # ...and its plan better by this much
    standby: bool = True                # contingency plans and warm standbys
    standby_per_node: int = 4
    # the share of a serving host's link time and CPU quota its standbys may take while they
    # load (stage_image.agent): less slows the pipeline less and readies standbys later. A
    # tenth, so that while they load the pipeline keeps the 90% of its plan that recovery is
    # measured by (with a quarter, resnet18 on star-6 ran at 91% of its rate after a crash).
    # Of the link (its bytes, where its line rate is known) it is the least: chunks take
    # what the frames leave idle, up to half (stage_image.agent.standby_link_share)
    standby_share: float = 0.1
    # after a failure's switch, contingency plans and their standbys wait this long: the new
    # plan refills its pipeline at full speed (standbys loading at once on its hosts kept
    # hetero-6 at 82-87% of the new plan for two seconds after a crash)
    standby_settle_s: float = 2.0
    replan_delay_s: float = 0.0         # the simulated Kubernetes wait before a re-plan
    straggler_factor: float = 2.0       # 0: no straggler check
    straggler_after_s: float = 2.0
    drain_s: float = 5.0                # a healthy old epoch finishes its requests this long
    unhealthy_hold_s: float = 10.0      # back-off base after a failure (core.backoff)
    retry_s: float = 5.0                # after a plan or deploy that failed (k3s)
    # k3s marks a node NotReady after its node-monitor-grace-period (40 s by default); a node
    # found dead by heartbeats that the API has not seen go down by then is alive as far as
    # its kubelet can tell: our pod or its path to us failed, not the node
    api_grace_s: float = 60.0
    # scenario key -> line, for the keys the scenario set (errors name them)
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
    file: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        for name, knob in KNOBS.items():
            try:
                knob.from_json(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from exc

    @property
    def heartbeat_s(self) -> float:
        return self.heartbeat_ms / 1000.0

    @property
    def silence_s(self) -> float:
        """Silent this long: suspected."""
        return self.suspect_after_missed * self.heartbeat_s

    @property
    def resend_s(self) -> float:
        """Ask again for what a heartbeat shows missing after this long."""
        return max(1.0, 3 * self.heartbeat_s)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(KNOBS)

    @classmethod
    def from_scenario(cls, fields: Fields | None) -> ControlSettings:
        """The scenario's `control:` mapping (None: all defaults); unknown keys refused."""
        if fields is None:
            return cls()
        values: dict[str, Any] = {}
        lines: dict[str, int] = {}
        for name, knob in KNOBS.items():
            if knob.scenario is not None and fields.has(knob.scenario):
                values[name] = fields.get(knob.scenario, knob.from_scenario)
                line = fields.line_of(knob.scenario)
                if line is not None:
                    lines[knob.scenario] = line
        fields.done()
        return cls(**values, lines=lines, file=str(fields.file or ""))

    @classmethod
    def from_json(cls, data: Any, file: str = "<config>") -> ControlSettings:
        """The flat JSON object of the backends' config files (fields as named here)."""
        if not isinstance(data, dict):
            raise InputError("the control settings must be a JSON object", file=file)
        unknown = sorted(set(data) - set(KNOBS))
        if unknown:
            raise InputError("unknown control setting", file=file, field=unknown[0])
        values = {}
        for name, value in data.items():
            try:
                values[name] = KNOBS[name].from_json(value)
            except ValueError as exc:
                raise InputError(str(exc), file=file, field=name) from exc
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in KNOBS}

    def given(self) -> dict[str, Any]:
        """The fields the scenario set (the rest are defaults)."""
        return {name: getattr(self, name) for name, knob in KNOBS.items()
                if knob.scenario in self.lines}

    def refuse_unsupported(self, backend: str, unsupported: frozenset[str]) -> None:
        """InputError (exit 2) naming the first scenario key this backend cannot honour."""
        for name in KNOBS:
            key = KNOBS[name].scenario
            if name in unsupported and key in self.lines:
                raise InputError(f"the {backend} backend does not support this control "
                                 f"setting", file=self.file or None,
                                 line=self.lines[key], field=f"control.{key}")

    def replace(self, **changes: Any) -> ControlSettings:
        return dataclasses.replace(self, **changes)


CONTROL_KEYS = tuple(k.scenario for k in KNOBS.values() if k.scenario is not None)
