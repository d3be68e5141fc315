"""testbed/control/commands.py: one schema for the driver's commands on both backends; every
request is checked exactly before a backend acts on it."""

from __future__ import annotations

import pytest

from testbed.control import commands
from testbed.control.commands import CommandError


def test_good_commands() -> None:
    assert commands.parse([b'{"cmd": "status"}'], "k3s") == ({"cmd": "status"}, None)
    assert commands.parse([b'{"cmd": "put_model", "offset": 0, "total": 3}', b"abc"],
                          "k3s")[1] == b"abc"
    assert commands.parse([b'{"cmd": "replan", "exclude": ["edge1"]}'], "embedded")[0] == \
        {"cmd": "replan", "exclude": ["edge1"]}
    assert commands.parse([b'{"cmd": "start_workload", "workload": {"rate": 2}}'],
                          "embedded")[0]["workload"] == {"rate": 2}
    assert commands.parse([b'{"cmd": "rollout", "version": 2}'], "embedded")[0]["version"] == 2


@pytest.mark.parametrize("frames", [
    [b"not json"], [b"[]"], [b'{"cmd": "eval"}'], [b'{"cmd": "status", "x": 1}'],
    [b'{"cmd": "status"}', b"data"], [b'{"cmd": "put_model", "offset": 0, "total": 3}'],
    [b'{"cmd": "put_model", "offset": -1, "total": 3}', b"a"],
    [b'{"cmd": "fetch", "file": "x", "offset": true}'], [b'{"cmd": "status"}', b"a", b"b"],
    [b'{"cmd": "start_workload", "workload": {}}'],      # the k3s workload is its inputs'
    [b'{"cmd": "replan"}'], [b"\xff"],
])
def test_k3s_refuses(frames: list[bytes]) -> None:
    with pytest.raises(CommandError):
        commands.parse(frames, "k3s")


@pytest.mark.parametrize("raw, says", [
    (b'{"cmd": "replan", "exclude": "edge1"}', "exclude must be a list of host names"),
    (b'{"cmd": "rollout"}', "rollout needs version"),
    (b'{"cmd": "rollout", "version": "2"}', "version must be a version number"),
    (b'{"cmd": "start_workload", "workload": []}', "workload must be an object"),
    (b'{"cmd": "put_model", "offset": 0, "total": 1}', "unknown command 'put_model'"),
    (b'{"cmd": "stop", "now": true}', "not 'now'"),
])
def test_embedded_refuses_with_a_reason(raw: bytes, says: str) -> None:
    with pytest.raises(CommandError, match=says):
        commands.parse([raw], "embedded")


def test_markdown_lists_every_command() -> None:
    table = commands.markdown()
    for backend, name in commands.SPECS:
        assert f"`{name}`" in table and backend in table
