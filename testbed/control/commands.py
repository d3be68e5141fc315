"""The driver's commands to a controller, as one schema for both backends: every command,
the backends that take it, its fields and their types, and whether it carries a binary part.

Division of labour: `parse` checks a received request exactly (one JSON object, a known
command of this backend, no unknown or missing field, every field of its type, the data part
present exactly when the command carries one) and returns it, or raises `CommandError` with
the reason; nothing is evaluated or unpickled. What a command *does* is the backend's: the
embedded controller (testbed.control.controller) and the k3s workload host
(testbed.k8s.workload). docs/architecture.md's command table is generated from this module
(`python -m testbed.control.commands --markdown`, checked by tests/test_docs.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BACKENDS = ("embedded", "k3s")


class CommandError(ValueError):
    """A request that is not a valid command; the message says why."""


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _positive_int(value: Any) -> bool:
    return _non_negative_int(value) and value > 0


def _host_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(h, str) for h in value)


def _object(value: Any) -> bool:
    return isinstance(value, dict)


def _file_name(value: Any) -> bool:
    return isinstance(value, str)


@dataclass(frozen=True)
class Field:
    name: str
    check: Callable[[Any], bool]
    kind: str                   # what the check wants, for errors and docs
    required: bool = True


@dataclass(frozen=True)
class CommandSpec:
    name: str
    backends: tuple[str, ...]
    fields: tuple[Field, ...] = ()
    data: bool = False          # carries one binary part
    meaning: str = ""

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)


# Two backends may give one command different fields (start_workload): the table is keyed
# by (backend, name).
_SPECS: tuple[CommandSpec, ...] = (
    CommandSpec("status", BACKENDS, meaning="the controller's state, counts and plan"),
    CommandSpec("start_workload", ("embedded",),
                (Field("workload", _object, "an object of Workload overrides", False),),
                meaning="start issuing requests, with overrides of the config's workload"),
    CommandSpec("start_workload", ("k3s",),
                meaning="start issuing the workload of the inputs (workload.json)"),
    CommandSpec("stop", BACKENDS, meaning="stop issuing; what is unanswered is lost"),
    CommandSpec("replan", ("embedded",),
                (Field("exclude", _host_list, "a list of host names", False),),
                meaning="plan again, without the excluded hosts"),
    CommandSpec("rollback", ("embedded",), meaning="go back to the version served before"),
    CommandSpec("rollout", ("embedded",),
                (Field("version", _positive_int, "a version number"),),
                meaning="roll a known version out"),
    CommandSpec("put_model", ("k3s",),
                (Field("offset", _non_negative_int, "a non-negative integer"),
                 Field("total", _non_negative_int, "a non-negative integer")),
                data=True,
                meaning="a chunk of the model, in order (the last checks its SHA-256)"),
    CommandSpec("fetch", ("k3s",),
                (Field("file", _file_name, "a file name"),
                 Field("offset", _non_negative_int, "a non-negative integer")),
                meaning="a chunk of requests.csv or events.jsonl, base64"),
)
SPECS: dict[tuple[str, str], CommandSpec] = {
    (backend, spec.name): spec for spec in _SPECS for backend in spec.backends}


def parse(frames: list[bytes], backend: str) -> tuple[dict[str, Any], bytes | None]:
    """(command, binary part) of a request to `backend`; CommandError says what is wrong."""
    if not 1 <= len(frames) <= 2:
        raise CommandError(f"a command is one JSON part (and one data part), got "
                           f"{len(frames)}")
    try:
        cmd = json.loads(frames[0])
    except (ValueError, UnicodeDecodeError) as exc:
        raise CommandError(f"not JSON: {exc}") from exc
    if not isinstance(cmd, dict) or not isinstance(cmd.get("cmd"), str):
        raise CommandError('expected {"cmd": ...}')
    spec = SPECS.get((backend, cmd["cmd"]))
    if spec is None:
        known = sorted(name for b, name in SPECS if b == backend)
        raise CommandError(f"unknown command {cmd['cmd']!r} (the {backend} backend takes "
                           f"{', '.join(known)})")
    for name in cmd:
        if name != "cmd" and spec.field(name) is None:
            raise CommandError(f"{spec.name} takes {sorted(f.name for f in spec.fields)}, "
                               f"not {name!r}")
    for item in spec.fields:
        if item.name not in cmd:
            if item.required:
                raise CommandError(f"{spec.name} needs {item.name}")
        elif not item.check(cmd[item.name]):
            raise CommandError(f"{spec.name}: {item.name} must be {item.kind}")
    data = frames[1] if len(frames) == 2 else None
    if spec.data != (data is not None):
        raise CommandError(f"{spec.name} {'needs' if spec.data else 'takes no'} data part")
    return cmd, data


def markdown() -> str:
    """The command table of docs/architecture.md."""
    lines = ["| command | backends | fields | data part | meaning |", "|---|---|---|---|---|"]
    for spec in _SPECS:
        fields = ", ".join(f"{f.name}{'' if f.required else ' (optional)'}: {f.kind}"
                           for f in spec.fields) or "-"
        lines.append(f"| `{spec.name}` | {', '.join(spec.backends)} | {fields} | "
                     f"{'yes' if spec.data else 'no'} | {spec.meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        print("usage: python -m testbed.control.commands --markdown", file=sys.stderr)
        sys.exit(2)
    sys.stdout.write(markdown())
