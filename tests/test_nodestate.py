"""The node state machine: timelines that make no sense are refused at load time with the
step's line; sensible ones (restart from any state, heals, ends of faults in force) load."""

from __future__ import annotations

from pathlib import Path

import pytest

from formats.errors import InputError
from formats.nodestate import CRASHED, PAUSED, check_node_states
from formats.scenario import Step, load_scenario
from testbed.experiment.faults import FAULTS

ROOT = Path(__file__).resolve().parent.parent
STAR5 = ROOT / "topologies" / "star-5.yaml"


def steps(*specs: tuple[float, str, str, float | None]) -> list[Step]:
    return [Step(at, action, target, {}, duration, line=10 + i)
            for i, (at, action, target, duration) in enumerate(specs)]


def test_crash_then_restart_is_up_again() -> None:
    final = check_node_states(steps((5, "node.crash", "edge1", None),
                                    (9, "node.restart", "edge1", None),
                                    (12, "node.crash", "edge1", None)), "f", ["edge1"])
    assert final == {"edge1": CRASHED}


@pytest.mark.parametrize("specs,line,words", [
    ([(5, "node.resume", "edge1", None)], 10, "not paused"),
    ([(5, "node.crash", "edge1", None), (7, "node.crash", "edge1", None)], 11, "already crashed"),
    ([(5, "node.crash", "edge1", None), (7, "node.resume", "edge1", None)], 11, "crashed"),
    ([(5, "node.crash", "edge1", None), (7, "node.pause", "edge1", None)], 11, "crashed"),
    ([(5, "node.pause", "edge1", None), (6, "node.pause", "edge1", None)], 11, "already paused"),
    ([(5, "node.crash", "edge1", None), (6, "io.conn_reset", "edge1", None)], 11, "no connect"),
    # the pause healed itself at 8 s: resuming at 9 s finds the node up
    ([(5, "node.pause", "edge1", 3.0), (9, "node.resume", "edge1", None)], 11, "not paused"),
    # a restart ends the crash in force: its heal at 15 s never fires, a crash at 16 is valid,
    # a second at 17 is not
    ([(5, "node.crash", "edge1", 10.0), (8, "node.restart", "edge1", None),
      (16, "node.crash", "edge1", None), (17, "node.crash", "edge1", None)], 13, "already"),
])
def test_senseless_step_refused_at_its_line(specs: list[tuple[float, str, str, float | None]],
                                            line: int, words: str) -> None:
    with pytest.raises(InputError) as err:
        check_node_states(steps(*specs), "s.yaml", ["edge1", "edge2"])
    assert err.value.line == line and err.value.field == "action"
    assert words in err.value.reason and err.value.file == "s.yaml"


def test_heals_and_other_nodes() -> None:
    final = check_node_states(steps((5, "node.crash", "edge1", 3.0),
                                    (8, "node.crash", "edge1", None),   # heal first at 8 s
                                    (6, "node.pause", "edge2", None),
                                    (7, "node.crash", "edge2", None),   # a paused node crashes
                                    (9, "node.restart", "edge2", None),
                                    (10, "node.pause", "edge2", None),
                                    (11, "node.cpu", "edge1", None)), "f", ["edge1", "edge2"])
    assert final == {"edge1": CRASHED, "edge2": PAUSED}


def test_timeline_ends_the_same_faults_as_the_state_machine() -> None:
    # the injector heals what the state machine says a step ends
    assert FAULTS["node.restart"].cancels == ("node.crash", "node.pause")
    assert FAULTS["node.crash"].cancels == ("node.pause",)
    assert FAULTS["node.resume"].cancels == ("node.pause",)


def test_scenario_file_refused_with_line(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(f"""\
name: t
topology: {STAR5}
model: {{zoo: resnet18}}
workload: {{mode: closed, concurrency: 2, duration: 20s}}
steps:
  - {{at: 5s, action: node.pause, target: edge2, duration: 2s}}
  - {{at: 9s, action: node.resume, target: edge2}}
""")
    with pytest.raises(InputError) as err:
        load_scenario(path)
    assert err.value.line == 7 and "not paused" in str(err.value)
    path.write_text(path.read_text().replace("at: 9s", "at: 6s"))
    assert [s.action for s in load_scenario(path).steps] == ["node.pause", "node.resume"]
