"""formats/control.py: the control settings' one set of defaults, the scenario's `control:`
keys with file:line errors, the backends' flat JSON, and the refusal of keys a backend cannot
honour (exit 2 naming the key)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from formats.control import K3S_UNSUPPORTED, KNOBS, ControlSettings
from formats.errors import InputError
from formats.yamlfile import Fields, load_yaml


def control_fields(tmp_path: Path, text: str) -> Fields | None:
    path = tmp_path / "s.yaml"
    path.write_text("name: x\n" + text)
    return Fields(load_yaml(path), path).sub("control", None)


def test_every_field_has_a_knob_and_defaults_are_valid() -> None:
    names = {f.name for f in dataclasses.fields(ControlSettings)} - {"lines", "file"}
    assert names == set(KNOBS)
    assert ControlSettings.from_json(ControlSettings().to_json()) == ControlSettings()


def test_scenario_keys_with_lines(tmp_path: Path) -> None:
    settings = ControlSettings.from_scenario(control_fields(
        tmp_path, "control:\n  heartbeat: 100ms\n  rejoin_hold: 2s\n  standby: false\n"))
    assert settings.heartbeat_ms == 100.0 and settings.rejoin_hold_s == 2.0
    assert settings.standby is False and settings.silence_s == pytest.approx(0.3)
    assert settings.lines == {"heartbeat": 3, "rejoin_hold": 4, "standby": 5}
    assert settings.given() == {"heartbeat_ms": 100.0, "rejoin_hold_s": 2.0, "standby": False}
    assert ControlSettings.from_scenario(None) == ControlSettings()
    shared = ControlSettings.from_scenario(
        control_fields(tmp_path, "control:\n  standby_share: 1\n"))
    assert shared.standby_share == 1.0 and ControlSettings().standby_share == 0.1


@pytest.mark.parametrize("text, field, line", [
    ("control:\n  rejoin_margin: 1.5\n", "control.rejoin_margin", 3),
    ("control:\n  heartbeat: 100ms\n  unhealthy_hold: 3s\n", "control.unhealthy_hold", 4),
    ("control:\n  suspect_after_missed: 0\n", "control.suspect_after_missed", 3),
    ("control:\n  standby_share: 0\n", "control.standby_share", 3),
    ("control:\n  heartbeat: 100ms\n  standby_share: 1.5\n", "control.standby_share", 4),
])
def test_bad_scenario_values_name_file_line_field(tmp_path: Path, text: str, field: str,
                                                  line: int) -> None:
    with pytest.raises(InputError) as caught:
        ControlSettings.from_scenario(control_fields(tmp_path, text))
    assert caught.value.field == field and caught.value.line == line
    assert caught.value.file is not None and caught.value.file.endswith("s.yaml")


def test_json_checks_each_field() -> None:
    assert ControlSettings.from_json({"rejoin_hold_s": 1, "replan": False}).rejoin_hold_s == 1.0
    for bad, field in (({"rejoin_hold_s": -1}, "rejoin_hold_s"), ({"standby": 1}, "standby"),
                       ({"heartbeat": 100}, "heartbeat")):
        with pytest.raises(InputError) as caught:
            ControlSettings.from_json(bad, "controller.json")
        assert caught.value.field == field
    with pytest.raises(ValueError, match="straggler_factor"):
        ControlSettings(straggler_factor=1.0)


def test_a_backend_refuses_what_it_cannot_honour(tmp_path: Path) -> None:
    settings = ControlSettings.from_scenario(control_fields(
        tmp_path, "control:\n  rejoin_hold: 2s\n  drain: 1s\n"))
    settings.refuse_unsupported("embedded", frozenset())
    with pytest.raises(InputError) as caught:
        settings.refuse_unsupported("k3s", K3S_UNSUPPORTED)
    assert caught.value.field == "control.drain" and caught.value.line == 4
    assert "k3s" in str(caught.value)
    # defaults of unsupported knobs are not the user's choice: nothing to refuse
    ControlSettings().refuse_unsupported("k3s", K3S_UNSUPPORTED)
