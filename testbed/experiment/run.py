"""One run of the embedded backend: the network is built, agents start on the edge hosts and
the controller on the dispatcher host, the workload runs while the fault timeline fires, and
the records are turned into the results directory. Teardown always happens, whatever broke."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from formats.scenario import Scenario
from stage_image.security import KeyPair, apply_client
from testbed.experiment.faults import FaultTimeline, Hooks
from testbed.experiment.prepare import CONTROL_PORT, SINK_PORT, Prepared, log
from testbed.experiment.report import write_report
from testbed.experiment.results import (
    buckets,
    read_events,
    read_requests,
    summarise,
    write_timeseries,
)

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 300.0
DRAIN_GRACE_S = 30.0


class ControlClient:
    """REQ/REP JSON commands to the controller: over its ipc socket (embedded: crosses
    namespaces), or over TCP as a CurveZMQ client (`curve`: our keypair and the server's
    public key; the k3s controller's command port)."""

    def __init__(self, address: str, timeout_ms: int = 3000,
                 curve: tuple[KeyPair, str] | None = None) -> None:
        self.address = address
        self.timeout_ms = timeout_ms
        self.curve = curve
        self.context = zmq.Context.instance()
        self.socket: zmq.Socket | None = None

    def _connect(self) -> zmq.Socket:
        socket = self.context.socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        socket.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        if self.curve is not None:
            apply_client(socket, *self.curve)
        socket.connect(self.address)
        return socket

    def call(self, cmd: str, data: bytes | None = None, **fields: Any) -> dict[str, Any] | None:
        """The reply, or None when the controller did not answer in time. `data`: a binary
        part after the JSON one."""
        if self.socket is None:
            self.socket = self._connect()
        try:
            header = json.dumps({"cmd": cmd, **fields}).encode()
            self.socket.send_multipart([header] if data is None else [header, data])
            reply = self.socket.recv_json()
            return reply if isinstance(reply, dict) else None
        except zmq.Again:
            # A REQ socket that missed its reply is stuck in the wrong state: start over.
            self.socket.close(0)
            self.socket = None
            return None

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(0)


def workload_json(scenario: Scenario) -> dict[str, Any]:
    """The dispatcher's Workload (testbed.control.dispatcher) for a scenario: it issues for the
    warm-up and the measured window."""
    workload = scenario.workload
    return {"mode": workload.mode, "concurrency": workload.concurrency,
            "rate": workload.rate_rps or 10.0, "seed": workload.seed,
            "pool_size": workload.pool,
            "duration_s": workload.warmup_s + workload.duration_s,
            "warmup_s": workload.warmup_s}


def _controller_config(scenario: Scenario, prepared: Prepared, net: Any, out_dir: Path,
                       control_ipc: str) -> dict[str, Any]:
    dispatcher = scenario.topology.dispatcher().name
    return {
        "run_dir": str(out_dir),
        "model": str(prepared.model_path),
        "instance": str(prepared.instance_path),
        "plan": str(out_dir / "plan.json"),
        "hosts": {h.name: net.ip(h.name) for h in scenario.topology.edge_hosts()},
        "dispatcher_ip": net.ip(dispatcher),
        "host": dispatcher,
        "planner": {"algorithm": scenario.algorithm, "time_limit_s": scenario.time_limit_s,
                    "seed": 0, "pipelines": scenario.pipelines, "spare": scenario.spare},
        "workload": workload_json(scenario),
        "control_port": CONTROL_PORT,
        "sink_port": SINK_PORT,
        "control_ipc": control_ipc,
        "base_reserve_bytes": prepared.activation_reserve_bytes,
        **scenario.control.to_json(),
    }


PROCESS_ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# The agents': net.popen_python sets PYTHONPATH for the host's kind (this checkout on a
# process host, the image's code on a Docker host).
AGENT_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def control_address(out_dir: Path) -> str:
    """The controller's ipc socket, in the results directory (a UNIX socket path must stay
    under 108 bytes: fall back to a short private directory for deep result paths)."""
    path = out_dir.resolve() / "control.sock"
    if len(str(path)) > 100:
        path = Path(tempfile.mkdtemp(prefix="edgepipe-")) / "control.sock"
    return f"ipc://{path}"


def start_agent(net: Any, out_dir: Path, host: str, heartbeat_ms: float | None) -> None:
    """Start (or, after a crash, restart) a host's agent; its log is appended to."""
    dispatcher = net.topology.dispatcher().name
    host_logs = out_dir.resolve() / "logs" / host
    host_logs.mkdir(parents=True, exist_ok=True)
    args = ["-m", "stage_image.agent", "--host", host,
            "--controller", f"tcp://{net.ip(dispatcher)}:{CONTROL_PORT}",
            "--data-dir", str(net.data_dir(host)), "--ip", net.ip(host),
            "--log-dir", str(host_logs)]
    if heartbeat_ms is not None:
        args += ["--heartbeat-ms", f"{heartbeat_ms:g}"]
    net.popen_python(host, args, host_logs / "agent.log", env=AGENT_ENV)


def _start_processes(scenario: Scenario, prepared: Prepared, net: Any, out_dir: Path,
                     control_ipc: str) -> Any:
    (out_dir / "logs").mkdir(exist_ok=True)
    config_path = out_dir / "controller.json"
    config_path.write_text(json.dumps(
        _controller_config(scenario, prepared, net, out_dir, control_ipc), indent=1))
    controller = net.popen(scenario.topology.dispatcher().name,
                           [sys.executable, "-m", "testbed.control.controller", str(config_path)],
                           out_dir / "logs" / "controller.log", env=PROCESS_ENV)
    for host in scenario.topology.edge_hosts():
        start_agent(net, out_dir, host.name, scenario.control.heartbeat_ms)
    return controller


def _prepare_versions(scenario: Scenario, out_dir: Path) -> dict[int, Any]:
    """Build and profile every model version the steps publish, before any network exists
    (the root namespace has the whole CPU; the dispatcher host does not)."""
    from testbed.control.repository import prepare_version

    versions = sorted({s.params["version"] for s in scenario.steps
                       if s.action == "model.update"})
    prepared = {}
    for version in versions:
        log(f"preparing model version {version} of {scenario.model}")
        prepared[version] = prepare_version(scenario.model, version, out_dir / "versions")
    return prepared


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _exit_reason(returncode: int) -> str:
    if returncode == -signal.SIGKILL:
        return ("killed: most likely the dispatcher host's memory limit (see dmesg); give the "
                "dispatcher more memory in the topology")
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def _process_check(controller: Any, out_dir: Path | None = None) -> Callable[[str], None]:
    """A liveness check of the controller process for wait_ready / run_workload."""
    def check(phase: str) -> None:
        if controller.poll() is not None:
            raise RuntimeError(f"the controller exited {phase} "
                               f"({_exit_reason(controller.returncode)})" + (
                                   ":\n" + _tail(out_dir / "logs" / "controller.log")
                                   if out_dir is not None else ""))
    return check


def wait_ready(client: ControlClient, check: Callable[[str], None],
               timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
    """Poll the controller's status until its first epoch serves ("ready"). `check(phase)`
    raises when the controller is gone."""
    deadline = time.monotonic() + timeout_s
    last_state = None
    while time.monotonic() < deadline:
        check("during deployment")
        status = client.call("status")
        if status:
            state = status.get("state")
            if state != last_state:
                log(f"controller: {state}")
                last_state = state
            if state == "ready":
                return status
            if state == "failed":
                raise RuntimeError(f"deployment failed: {status.get('reason')}")
        time.sleep(0.5)
    raise RuntimeError(f"the pipeline was not ready after {timeout_s:.0f} s")


def _progress_line(elapsed: float, status: dict[str, Any], last_fault: str) -> str:
    event = status.get("last_event") or {}
    return (f"t={elapsed:5.1f}s {status.get('state', '?'):8} sent={status.get('sent', 0)} "
            f"done={status.get('completed', 0)} thr={status.get('throughput_1s', 0):.1f}/s "
            f"p99={status.get('p99_ms_recent', 0):.0f}ms epoch={status.get('epoch')} "
            f"last={last_fault or event.get('type', '-')}")


def run_workload(scenario: Scenario, client: ControlClient, check: Callable[[str], None],
                 timeline: FaultTimeline) -> tuple[float, dict[str, Any]]:
    """Start the workload, fire the timeline, print progress every second until the
    controller says "done": (window start, last status)."""
    reply = client.call("start_workload")
    if not reply or not reply.get("ok"):
        raise RuntimeError(f"the controller refused the workload: {reply}")
    started = time.time()
    window_start = started + scenario.workload.warmup_s
    timeline.start(window_start)
    total = scenario.workload.warmup_s + scenario.workload.duration_s
    deadline = time.time() + total + DRAIN_GRACE_S + 30
    status: dict[str, Any] = {}
    next_print = time.time()
    while time.time() < deadline:
        check("during the run")
        reply = client.call("status")
        if reply:
            status = reply
            if status.get("state") == "done":
                break
        if time.time() >= next_print:
            log(_progress_line(time.time() - started, status, timeline.last))
            next_print += 1.0
        time.sleep(0.2)
    else:
        raise RuntimeError("the workload did not finish in time")
    timeline.stop()
    return window_start, status


def _merge_events(out_dir: Path, driver_events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    events = read_events(out_dir / "events.jsonl") + driver_events
    events.sort(key=lambda e: e["t"])
    (out_dir / "events.jsonl").write_text(
        "".join(json.dumps(e, default=str) + "\n" for e in events))
    return events


def run_embedded(scenario: Scenario, prepared: Prepared, out_dir: Path) -> int:
    from testbed.emulation.hostmon import HostMonitor
    from testbed.emulation.network import EmulatedNetwork, clear_stale_runs

    for line in clear_stale_runs():
        log(f"cleared a dead run's leftovers: {line}")
    # Docker hosts see the results directory at the same path (their agents' worker logs).
    net = EmulatedNetwork(scenario.topology, shared_dirs=[out_dir])
    plan_json = {**prepared.plan.to_json(), "model": str(prepared.model_path)}
    (out_dir / "plan.json").write_text(json.dumps(plan_json, indent=1))
    log(f"building network {scenario.topology.name} as run {net.run_id} "
        f"({len(scenario.topology.hosts)} hosts)")
    from testbed.control.repository import publish_prepared

    versions = _prepare_versions(scenario, out_dir)
    control_ipc = control_address(out_dir)
    # The timeline's thread gets its own REQ socket: one cannot be shared between threads.
    step_client = ControlClient(control_ipc)
    heartbeat_ms = scenario.control.heartbeat_ms
    hooks = Hooks(
        restart_host=lambda host: start_agent(net, out_dir, host, heartbeat_ms),
        controller=step_client.call,
        publish_version=lambda v: publish_prepared(out_dir / "repository", versions[v]))
    timeline = FaultTimeline(scenario.steps, net, hooks)
    client = ControlClient(control_ipc)
    monitor: HostMonitor | None = None
    try:
        net.build()
        log(f"network up in {net.build_seconds:.1f} s; starting controller and agents")
        timeline.prepare()
        monitor = HostMonitor.for_network(net)
        monitor.start()
        controller = _start_processes(scenario, prepared, net, out_dir, control_ipc)
        wait_ready(client, _process_check(controller, out_dir))
        log(f"running {scenario.workload.mode} workload: {scenario.workload.warmup_s:g}s "
            f"warm-up + {scenario.workload.duration_s:g}s measured")
        window_start, status = run_workload(scenario, client, _process_check(controller),
                                            timeline)
        client.call("stop")
        try:
            controller.wait(timeout=DRAIN_GRACE_S)
        except subprocess.TimeoutExpired:
            log("controller did not stop in time; tearing down")
        link_report = net.link_report()
    finally:
        timeline.heal_all()
        if monitor is not None:
            monitor.stop()
        client.close()
        step_client.close()
        Path(control_ipc.removeprefix("ipc://")).unlink(missing_ok=True)
        problems = net.stop()
        for problem in problems:
            log(f"teardown: {problem}")
        log(f"network {net.run_id} torn down in {net.stop_seconds:.1f} s")
    duration = scenario.workload.duration_s
    summary = write_results(scenario, "embedded", out_dir, timeline.events, window_start,
                            prepared.predicted_rps, int(status.get("duplicates", 0)),
                            {"links": link_report, "plan": plan_json},
                            monitor.buckets(window_start, duration))
    return 0 if summary["slo"]["passed"] else 1


def write_results(scenario: Scenario, backend: str, out_dir: Path,
                  driver_events: list[dict[str, Any]], window_start: float,
                  predicted_rps: float, duplicates: int, extra: dict[str, Any],
                  host_samples: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """From OUT/requests.csv and OUT/events.jsonl (the controller's, merged with the
    driver's fault events): summary.json, timeseries.csv, the report; prints the verdict."""
    events = _merge_events(out_dir, driver_events)
    records = read_requests(out_dir / "requests.csv")
    summary = summarise(scenario, backend, records, events, window_start, predicted_rps,
                        duplicates, extra=extra)
    duration = scenario.workload.duration_s
    write_timeseries(out_dir / "timeseries.csv",
                     buckets(records, window_start, window_start + duration),
                     host_samples=host_samples)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    write_report(out_dir, summary, events, out_dir / "timeseries.csv")
    _report(summary, out_dir)
    return summary


def _report(summary: dict[str, Any], out_dir: Path) -> None:
    requests = summary["requests"]
    latency = summary["latency_ms"]
    print(f"scenario {summary['scenario']}: {summary['throughput_rps']:.2f} rps measured, "
          f"{summary['predicted_throughput_rps']:.2f} predicted "
          f"(ratio {summary['throughput_ratio']:.2f}); latency p50 {latency['p50']:.0f} ms, "
          f"p99 {latency['p99']:.0f} ms")
    print(f"requests: sent {requests['sent']}, completed {requests['completed']}, "
          f"lost {requests['lost']}, duplicates {requests['duplicates']}, "
          f"mismatched {requests['mismatched']}")
    for fault in summary["faults"]:
        print(f"fault {fault['action']} {fault['target']} at {fault['at_s']}s: detected "
              f"{fault['detected_s']}, recovered {fault['recovered_s']}")
    verdict = "PASSED" if summary["slo"]["passed"] else "FAILED: " + "; ".join(
        summary["slo"]["violations"])
    print(f"SLO {verdict}\nresults in {out_dir}")
