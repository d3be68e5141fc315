"""testbed/control/events.py: every event written is in the schema with only its listed
fields; the emitters in the code use known names (checked over the source with ast)."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest

from testbed.control import events
from testbed.control.dispatcher import Workload
from testbed.control.events import EventSchemaError
from testbed.control.state import EventLog

ROOT = Path(__file__).resolve().parent.parent


def test_event_log_checks_the_schema(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl", logging.getLogger("test"))
    log.emit(events.NODE_SUSPECTED, host="edge1", silent_ms=700, missed=3)
    with pytest.raises(EventSchemaError, match="unknown event"):
        log.emit("node.suspekted", host="edge1")
    with pytest.raises(EventSchemaError, match="no field"):
        log.emit(events.NODE_SUSPECTED, hots="edge1")
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["node.suspected"]


def test_constants_name_known_events() -> None:
    constants = {k: v for k, v in vars(events).items() if k.isupper() and isinstance(v, str)}
    assert constants and all(v in events.EVENTS for v in constants.values())
    assert set(events.DETECTION_EVENTS) <= set(events.EVENTS)


def test_payloads_built_elsewhere_fit() -> None:
    assert set(Workload().to_json()) <= events.EVENTS["workload.started"].fields


def _emitted() -> set[str]:
    """Literal event names passed to emit(...) or Event(...) anywhere in our code."""
    names: set[str] = set()
    for path in [*ROOT.glob("testbed/**/*.py"), *ROOT.glob("benchmarks/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args and \
                    isinstance(node.args[0], ast.Constant) and \
                    isinstance(node.args[0].value, str):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else \
                    getattr(func, "id", None)
                if name in ("emit", "Event"):
                    names.add(node.args[0].value)
    return names


def test_every_emitted_name_is_in_the_schema() -> None:
    emitted = _emitted()
    assert len(emitted) > 30
    assert emitted <= set(events.EVENTS), sorted(emitted - set(events.EVENTS))
