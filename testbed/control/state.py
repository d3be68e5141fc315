"""The embedded controller's configuration (CONFIG.json, validated) and the event log both
backends write (events.jsonl, checked against testbed.control.events). Its records of
workers and epochs are testbed.control.core.records'.

Division of labour: testbed.control.plane decides, testbed.control.controller talks to agents
and the dispatcher; this module only holds and checks state, so the k3s loop
(testbed/k8s/loop.py) and tests can use the same records and event log without a running
controller.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from formats.control import KNOBS, ControlSettings
from formats.errors import InputError, read_json
from testbed.control import events
from testbed.control.dispatcher import Workload

# -- configuration ----------------------------------------------------------------------------

@dataclass
class PlannerConfig:
    algorithm: str = "auto"
    time_limit_s: float = 2.0
    seed: int = 0
    pipelines: int = 1          # at most this many side by side (0: as many as pay off)
    spare: int = 0              # nodes kept out of the plan while nothing is lost


@dataclass
class ControllerConfig:
    run_dir: Path
    model: Path
    instance: Path
    hosts: dict[str, str]
    dispatcher_ip: str
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    workload: Workload = field(default_factory=Workload)
    host: str = "dispatcher"
    control_port: int = 18000
    sink_port: int = 19000
    data_port_base: int = 20000
    data_port_span: int = 20000
    control_ipc: str = ""
    version: int = 1
    plan: Path | None = None
    stages_dir: Path | None = None
    # the control knobs (formats.control), given flat in CONFIG.json beside the rest
    control: ControlSettings = field(default_factory=ControlSettings)
    repository: Path | None = None
    repository_poll_s: float = 0.5
    auto_rollout: bool = True
    base_reserve_bytes: int | None = None
    curve_keypair: Path | None = None
    # host -> Z85 public key of its agent (testbed.control.auth): with curve_keypair, only
    # these keys get in, each speaking only for its own host
    agent_keys: dict[str, str] | None = None

    @classmethod
    def load(cls, path: str | Path) -> ControllerConfig:
        return cls.from_json(read_json(path), str(path))

    @classmethod
    def from_json(cls, data: Any, file: str = "<config>") -> ControllerConfig:
        if not isinstance(data, dict):
            raise InputError("the controller config must be a JSON object", file=file)
        own = set(cls.__dataclass_fields__) - {"control"}
        unknown = sorted(set(data) - own - set(KNOBS))
        if unknown:
            raise InputError("unknown field", file=file, field=unknown[0])
        for key in ("run_dir", "model", "instance", "hosts", "dispatcher_ip"):
            if key not in data:
                raise InputError("required field is missing", file=file, field=key)
        values = {k: v for k, v in data.items() if k in own}
        values["control"] = ControlSettings.from_json(
            {k: v for k, v in data.items() if k in KNOBS}, file)
        try:
            planner = values.get("planner", {})
            if not isinstance(planner, dict) or set(planner) - set(
                    PlannerConfig.__dataclass_fields__):
                raise ValueError("planner takes algorithm, time_limit_s, seed, pipelines, spare")
            values["planner"] = PlannerConfig(**planner)
            values["workload"] = Workload.from_json(values.get("workload", {}))
        except (TypeError, ValueError) as exc:
            raise InputError(str(exc), file=file, field="planner/workload") from exc
        hosts = values["hosts"]
        if not isinstance(hosts, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in hosts.items()):
            raise InputError("must map host names to IP addresses", file=file, field="hosts")
        for key in ("run_dir", "model", "instance", "plan", "stages_dir", "repository",
                    "curve_keypair"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        agent_keys = values.get("agent_keys")
        if agent_keys is not None and (not isinstance(agent_keys, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in agent_keys.items())):
            raise InputError("must map host names to public keys", file=file,
                             field="agent_keys")
        cfg = cls(**values)
        if cfg.agent_keys is not None and cfg.curve_keypair is None:
            raise InputError("agent keys need curve_keypair (CurveZMQ on)", file=file,
                             field="agent_keys")
        if not cfg.control_ipc:
            cfg.control_ipc = f"ipc://{cfg.run_dir / 'control.sock'}"
        elif "://" not in cfg.control_ipc:
            cfg.control_ipc = f"ipc://{cfg.control_ipc}"
        if cfg.repository is None:
            cfg.repository = cfg.run_dir / "repository"
        for key in ("control_port", "sink_port", "data_port_base"):
            if not 1 <= getattr(cfg, key) <= 65535:
                raise InputError("not a port number", file=file, field=key)
        if cfg.data_port_span < 1 or cfg.data_port_base + cfg.data_port_span > 65536:
            raise InputError("data ports must stay below 65536", file=file,
                             field="data_port_span")
        if cfg.repository_poll_s <= 0:
            raise InputError("must be positive", file=file, field="repository_poll_s")
        return cfg


# -- events -----------------------------------------------------------------------------------

class EventLog:
    """events.jsonl: one JSON object per line, {"t": unix time, "type": ..., ...}. Each line
    is one append write, so the driver may append its fault events to the same file."""

    def __init__(self, path: Path, log: logging.Logger) -> None:
        self.path, self.log = path, log
        path.parent.mkdir(parents=True, exist_ok=True)
        # a run starts its own record: a results directory used again must not mix two runs
        path.write_text("")
        self.last: dict[str, Any] | None = None

    def emit(self, kind: str, /, **fields: Any) -> None:
        events.check(kind, fields)          # a bug of ours: fails loudly, in tests first
        record = {"t": time.time(), "type": kind, **fields}
        line = json.dumps(record, default=str, separators=(",", ":"))
        try:
            with self.path.open("a") as handle:
                handle.write(line + "\n")
        except OSError as exc:
            self.log.error("cannot write event %s: %s", kind, exc)
        brief = {k: v for k, v in fields.items() if k not in ("plan", "workload")}
        self.log.info("event %s %s", kind, json.dumps(brief, default=str)[:300])
        self.last = record
