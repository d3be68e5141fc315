"""The worker launcher (stage_image.launcher): workers forked from a process that imported
onnxruntime once, tracked by the agent as it tracks processes of its own. No root needed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from partitioner.profile import FORKED_WORKER_BYTES, WORKER_RSS_BYTES
from stage_image.launcher import LaunchedWorker, Launcher

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def launcher(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1"}
    started = Launcher(sys.executable, env, tmp_path / "launcher.log")
    started.start()
    deadline = time.monotonic() + 30
    while not started.usable():
        assert time.monotonic() < deadline, (tmp_path / "launcher.log").read_text()
        time.sleep(0.05)
    yield started
    started.stop()


def worker_config(tmp_path: Path, parent_pid: int, port: int) -> Path:
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])]),
        opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "relu.onnx")
    config = tmp_path / f"worker_{port}.json"
    config.write_text(json.dumps({
        "host": "edge1", "version": 1, "model": str(tmp_path / "relu.onnx"),
        "bind": f"tcp://127.0.0.1:{port}", "inputs": ["x"], "outputs": ["y"],
        "commands": True, "parent_pid": parent_pid}))
    return config


def read_line(worker: LaunchedWorker, timeout: float = 20.0) -> str:
    assert worker.stdout is not None
    os.set_blocking(worker.stdout.fileno(), False)
    data, deadline = b"", time.monotonic() + timeout
    while b"\n" not in data and time.monotonic() < deadline:
        try:
            data += os.read(worker.stdout.fileno(), 256)
        except BlockingIOError:
            time.sleep(0.02)
    return data.decode().split("\n")[0]


def test_a_forked_worker_serves_and_its_exit_is_reported(tmp_path: Path, launcher) -> None:
    config = worker_config(tmp_path, launcher.pid, 23911)
    with open(tmp_path / "worker.log", "ab") as log:
        worker = launcher.spawn(config, tmp_path, log)
    assert read_line(worker) == "ready", (tmp_path / "worker.log").read_text()
    stat = Path(f"/proc/{worker.pid}/stat").read_text()
    assert "(worker_23911)" in stat                       # named for ps, by its config
    assert int(stat.rsplit(")", 1)[1].split()[1]) == launcher.pid   # forked by the launcher
    # the fork found onnxruntime imported: the worker's own CPU to ready is its session's
    ticks = sum(int(v) for v in stat.rsplit(")", 1)[1].split()[11:13])
    assert ticks / os.sysconf("SC_CLK_TCK") < 0.2, ticks
    # and shares the launcher's pages: what it adds is the planner's forked-worker figure at
    # most, not a worker's whole runtime (partitioner.profile)
    rollup = dict(line.split(":", 1) for line in
                  Path(f"/proc/{worker.pid}/smaps_rollup").read_text().splitlines()[1:])
    private = sum(int(rollup[k].split()[0]) for k in ("Private_Dirty", "Private_Clean")) * 1024
    assert private < FORKED_WORKER_BYTES < WORKER_RSS_BYTES, private
    assert worker.poll() is None
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0
    worker.kill()                                        # after its exit: a no-op, no error


def test_a_worker_that_fails_reports_its_code_and_log(tmp_path: Path, launcher) -> None:
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"host": "edge1", "surprise": 1}))
    with open(tmp_path / "worker.log", "ab") as log:
        worker = launcher.spawn(config, tmp_path, log)
    assert worker.wait(timeout=10) == 2
    assert "bad config" in (tmp_path / "worker.log").read_text()
    assert launcher.usable()                             # one worker's failure is its own


def test_workers_die_with_the_launcher_and_it_with_its_agent(tmp_path: Path,
                                                             launcher) -> None:
    config = worker_config(tmp_path, launcher.pid, 23912)
    with open(tmp_path / "worker.log", "ab") as log:
        worker = launcher.spawn(config, tmp_path, log)
    assert read_line(worker) == "ready"
    assert launcher.proc is not None
    launcher.proc.kill()
    launcher.proc.wait()
    assert worker.wait(timeout=10) == -signal.SIGKILL    # PR_SET_PDEATHSIG
    assert not launcher.usable()
    # an agent killed -9 takes its launcher along
    agent = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time; from pathlib import Path\n"
         "from stage_image.launcher import Launcher\n"
         "l = Launcher(sys.executable, dict(os.environ), Path(sys.argv[1]))\n"
         "l.start(); print(l.pid, flush=True); time.sleep(60)", str(tmp_path / "l2.log")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert agent.stdout is not None
    orphan = int(agent.stdout.readline())
    agent.kill()
    agent.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{orphan}").exists() and time.monotonic() < deadline:
        if "Z" in Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[1].split()[0]:
            break                                        # dead, waiting for init to reap
        time.sleep(0.05)
    assert not Path(f"/proc/{orphan}").exists() or \
        "Z" in Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_the_launcher_refuses_a_malformed_request(tmp_path: Path, launcher) -> None:
    import socket
    assert launcher.sock is not None
    socket.send_fds(launcher.sock, [b'{"config": 7, "cwd": "/"}'], [0, 1, 2])
    assert launcher.collect(5.0) == {"error": "a request is {config, cwd} with stdin, "
                                              "stdout and stderr"}
    assert launcher.usable()
