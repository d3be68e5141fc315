"""The results directory: turns the raw records of a run (one row per request, one event per
fault or decision) into the contract files of DESIGN.md: summary.json, timeseries.csv and the
SLO verdict. Pure functions on plain records; the driver decides what to collect."""

from __future__ import annotations

import bisect
import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from formats.scenario import RECOVERY_BARS, Scenario, Slo
from testbed.control import events as ev

# Events (in events.jsonl) that show the system noticed a fault on a host.
DETECTION_EVENTS = ev.DETECTION_EVENTS
READMISSION_EVENTS = ev.READMISSION_EVENTS
# Model rollouts are not failures: noticing one means finding the version (or the rollback
# command), and recovery is measured from the switch-over.
MODEL_DETECTION = {"model.update": (ev.VERSION_FOUND,),
                   "model.rollback": (ev.VERSION_ROLLBACK, ev.VERSION_SWITCHED)}
RECOVERY_FRACTION = 0.9
# The rate a fault is judged against (recovered_rel_s): completions in the BEFORE_S seconds
# that end BEFORE_GAP_S before the fault (a fault's own first effects can reach back a little:
# a crashed host's frames in flight); fewer than BEFORE_MIN_S of them gives no figure.
BEFORE_S, BEFORE_GAP_S, BEFORE_MIN_S = 5.0, 1.0, 2.0


@dataclass
class RequestRecord:
    rid: int
    sent: float            # unix time of the first send
    done: float | None     # unix time the (first) result arrived
    status: str            # completed | lost
    mismatched: bool
    epoch: int
    version: int
    attempts: int

    @property
    def latency_ms(self) -> float | None:
        return None if self.done is None else (self.done - self.sent) * 1000


def read_requests(path: Path) -> list[RequestRecord]:
    records = []
    with path.open() as handle:
        for row in csv.DictReader(handle):
            records.append(RequestRecord(
                rid=int(row["rid"]), sent=float(row["sent"]),
                done=float(row["done"]) if row.get("done") else None,
                status=row["status"], mismatched=row.get("mismatched") in ("1", "True", "true"),
                epoch=int(row.get("epoch") or 0), version=int(row.get("version") or 0),
                attempts=int(row.get("attempts") or 1)))
    return records


def read_events(path: Path) -> list[dict[str, Any]]:
    """events.jsonl by time; its whole lines only, since a controller may be writing one."""
    if not path.exists():
        return []
    text = path.read_text()
    events = [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()
              if line.strip()]
    return sorted(events, key=lambda e: e["t"])


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; 0.0 for no values (so JSON stays numeric)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Bucket:
    start_s: float
    completed: int
    latencies_ms: list[float]

    @property
    def throughput_rps(self) -> float:
        return float(self.completed)


def buckets(records: list[RequestRecord], window_start: float, window_end: float,
            width_s: float = 1.0) -> list[Bucket]:
    """Completions per 1 s bucket of the measured window, by completion time."""
    count = max(1, math.ceil((window_end - window_start) / width_s - 1e-9))
    result = [Bucket(i * width_s, 0, []) for i in range(count)]
    for record in records:
        if record.done is None or record.status != "completed":
            continue
        offset = record.done - window_start
        if 0 <= offset < count * width_s:
            bucket = result[int(offset // width_s)]
            bucket.completed += 1
            bucket.latencies_ms.append(record.latency_ms or 0.0)
    return result


def write_timeseries(path: Path, series: list[Bucket],
                     host_samples: dict[int, dict[str, Any]] | None = None) -> None:
    host_samples = host_samples or {}
    host_columns = sorted({key for sample in host_samples.values() for key in sample})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["t_s", "completed", "throughput_rps", "p50_ms", "p95_ms", "p99_ms",
                         *host_columns])
        for index, bucket in enumerate(series):
            sample = host_samples.get(index, {})
            writer.writerow([f"{bucket.start_s:.0f}", bucket.completed,
                             f"{bucket.throughput_rps:.2f}",
                             f"{percentile(bucket.latencies_ms, 50):.2f}",
                             f"{percentile(bucket.latencies_ms, 95):.2f}",
                             f"{percentile(bucket.latencies_ms, 99):.2f}",
                             *[sample.get(column, "") for column in host_columns]])


def predicted_rates(events: list[dict[str, Any]], initial: float) -> Callable[[float], float]:
    """The predicted throughput of the plan in force at unix time t, as a function of t."""
    deployed = [(float(e["t"]), float(e["predicted_throughput_rps"])) for e in events
                if e.get("type") == ev.PLAN_DEPLOYED and e.get("predicted_throughput_rps")]
    times = [t for t, _ in deployed]

    def at(t: float) -> float:
        index = bisect.bisect_right(times, t)
        return deployed[index - 1][1] if index else initial
    return at


def recovered_relative(dones: list[float], at: float, recovery_from: float,
                       scale: Callable[[float], float], window_start: float) -> float | None:
    """When the rate came back to what it was before the fault: the first completion time T,
    at least 1 s after `recovery_from`, whose preceding second holds RECOVERY_FRACTION of the
    rate measured before `at` (BEFORE_S, ending BEFORE_GAP_S before it, not before the
    window), times `scale(T)` (the prediction of the plan in force at T over the one at the
    fault). `dones`: completion times, sorted. On a machine that delivers less than the
    plans predict, the contract's bar (90% of the prediction) may never be met, also by a
    fault that cost nothing; this one is relative to the run's own rate."""
    start = max(window_start, at - BEFORE_GAP_S - BEFORE_S)
    end = at - BEFORE_GAP_S
    if end - start < BEFORE_MIN_S:
        return None
    rate = (bisect.bisect_left(dones, end) - bisect.bisect_left(dones, start)) / (end - start)
    if rate <= 0:
        return None
    first = bisect.bisect_left(dones, recovery_from + 1.0)
    for t in dones[first:]:
        in_last_second = bisect.bisect_right(dones, t) - bisect.bisect_right(dones, t - 1.0)
        if in_last_second >= RECOVERY_FRACTION * rate * scale(t):
            return t
    return None


def fault_timings(events: list[dict[str, Any]], series: list[Bucket], window_start: float,
                  initial_predicted: float, dispatcher: str | None = None,
                  dones: list[float] | None = None) -> list[dict[str, Any]]:
    """Per injected fault: when it happened, when the system noticed, when throughput came
    back to RECOVERY_FRACTION of the prediction of the plan in force (seconds from the
    start of the measured window), and, given the completion times `dones` (sorted), when
    it came back to that fraction of the rate before the fault (recovered_relative)."""
    faults = []
    predicted_at = predicted_rates(events, initial_predicted)
    injected = [e for e in events if e.get("type") == ev.FAULT_INJECTED]
    for fault in injected:
        at = fault["t"]
        action = fault["action"]
        if action in MODEL_DETECTION:
            detected = next((e["t"] for e in events if e["t"] >= at
                             and e.get("type") in MODEL_DETECTION[action]), None)
            switched = next((e["t"] for e in events if e["t"] >= at
                             and e.get("type") == ev.VERSION_SWITCHED), None)
            recovery_from = switched if switched is not None else at
        else:
            targets = _fault_hosts(fault, dispatcher)
            detected = next((e["t"] for e in events
                             if e["t"] >= at and e.get("type") in DETECTION_EVENTS
                             and (not targets or e.get("host") in targets)), None)
            recovery_from = at
        recovered = None
        for bucket in series:
            bucket_end = window_start + bucket.start_s + 1.0
            if bucket_end <= recovery_from + 1.0:
                continue
            predicted = predicted_at(bucket_end)
            if bucket.throughput_rps >= RECOVERY_FRACTION * predicted:
                recovered = bucket_end
                break
        entry = {
            "action": fault["action"], "target": fault.get("target"),
            "at_s": round(at - window_start, 3),
            "late_ms": fault.get("late_ms"),
            "detected_s": None if detected is None else round(detected - window_start, 3),
            "recovered_s": None if recovered is None else round(recovered - window_start, 3),
        }
        if dones is not None:
            before = predicted_at(at)
            relative = recovered_relative(
                dones, at, recovery_from,
                lambda t, before=before: predicted_at(t) / before if before else 1.0,
                window_start)
            entry["recovered_rel_s"] = (None if relative is None
                                        else round(relative - window_start, 3))
        booted = _booted_at(events, fault)
        if booted is not None:
            readmitted = next((e["t"] for e in events if e["t"] >= booted
                               and e.get("type") in READMISSION_EVENTS
                               and e.get("host") == fault.get("target")), None)
            entry["readmitted_s"] = (None if readmitted is None
                                     else round(readmitted - window_start, 3))
        faults.append(entry)
    return faults


def _booted_at(events: list[dict[str, Any]], fault: dict[str, Any]) -> float | None:
    """When a node fault started the node's software again: a node.restart when it fired, a
    node.crash when its heal restarted it (not the final heal); None for other faults."""
    if fault["action"] == "node.restart":
        return float(fault["t"])
    if fault["action"] != "node.crash":
        return None
    return next((float(e["t"]) for e in events if e.get("type") == ev.FAULT_HEALED
                 and e.get("step") == fault.get("step") and not e.get("final")
                 and (e.get("detail") or {}).get("restarted")), None)


def _fault_hosts(fault: dict[str, Any], dispatcher: str | None) -> set[str]:
    """The hosts a fault's detection is about. A partition cuts the hosts on the far side
    from the controller (the dispatcher's side sees them vanish): counting every host of both
    groups attributed any node's detection to it."""
    target = fault.get("target")
    if fault.get("action") == "link.partition" and dispatcher is not None and \
            isinstance(target, list):
        far = [group for group in target if dispatcher not in group]
        if far and len(far) < len(target):
            return _hosts_of(far)
    return _hosts_of(target)


def _hosts_of(target: Any) -> set[str]:
    if target is None:
        return set()
    if isinstance(target, str):
        return {target}
    hosts: set[str] = set()
    for item in target:
        hosts |= _hosts_of(item)
    return hosts


def control_summary(events: list[dict[str, Any]], window_start: float) -> dict[str, Any]:
    """What the control plane did: the epochs it deployed and the periods in which no plan
    fitted the live nodes (from each plan.infeasible to the next plan.deployed)."""
    epochs, infeasible = [], []
    open_period: dict[str, Any] | None = None
    for event in events:
        kind = event.get("type")
        if kind == ev.PLAN_DEPLOYED:
            epochs.append({"epoch": event.get("epoch"), "version": event.get("version"),
                           "at_s": round(event["t"] - window_start, 3),
                           "hosts": event.get("hosts"), "kind": event.get("kind"),
                           "predicted_throughput_rps": event.get("predicted_throughput_rps")})
            if open_period is not None:
                open_period["until_s"] = round(event["t"] - window_start, 3)
                open_period = None
        elif kind == ev.PLAN_INFEASIBLE and open_period is None:
            open_period = {"from_s": round(event["t"] - window_start, 3), "until_s": None,
                           "reason": event.get("reason"), "live": event.get("live")}
            infeasible.append(open_period)
    return {"epochs": epochs, "infeasible": infeasible}


@dataclass(frozen=True)
class SloCheck:
    """One SLO check of a run: what was measured against which bound. `message` is the
    violation's text (empty when passed); CI reports make one test case of each check."""

    name: str                  # lost, mismatched, ..., recover_within node.crash edge2 at 10s
    passed: bool
    measured: str
    bound: str
    message: str = ""


def slo_checks(slo: Slo, summary: dict[str, Any]) -> list[SloCheck]:
    """Every check the scenario's SLOs (and the run's validity) ask for, passed or not."""
    checks = []
    requests = summary["requests"]
    for key in ("lost", "mismatched", "duplicates"):
        limit = getattr(slo, key)
        if limit is not None:
            failed = requests[key] > limit
            checks.append(SloCheck(key, not failed, str(requests[key]), f"<= {limit}",
                                   f"{key} {requests[key]} > {limit}" if failed else ""))
    checks.append(SloCheck("completed", requests["completed"] > 0, str(requests["completed"]),
                           "> 0", "" if requests["completed"] else "no request completed"))
    if slo.min_throughput_ratio is not None:
        ratio = summary["throughput_ratio"]
        failed = ratio < slo.min_throughput_ratio
        checks.append(SloCheck(
            "throughput", not failed,
            f"{summary['throughput_rps']:.2f} rps = {ratio:.2f} of predicted",
            f">= {slo.min_throughput_ratio} of predicted",
            f"throughput {summary['throughput_rps']:.2f} rps is {ratio:.2f} of predicted, "
            f"below {slo.min_throughput_ratio}" if failed else ""))
    if slo.p99_ms is not None:
        p99 = summary["latency_ms"]["p99"]
        failed = p99 > slo.p99_ms
        checks.append(SloCheck("latency p99", not failed, f"{p99:.1f} ms",
                               f"<= {slo.p99_ms:.1f} ms",
                               f"p99 {p99:.1f} ms > {slo.p99_ms:.1f} ms" if failed else ""))
    if slo.recover_within_s is not None:
        key = RECOVERY_BARS[slo.recover_to]
        to_what = "" if slo.recover_to == "plan" else " to the rate before"
        for fault in summary["faults"]:
            name = f"recover_within {fault_label(fault)}"
            bound = f"<= {slo.recover_within_s:g}s"
            if fault.get(key) is None:
                checks.append(SloCheck(name, False, "never", bound,
                                       f"{fault['action']} at {fault['at_s']}s never "
                                       f"recovered{to_what}"))
                continue
            took = fault[key] - fault["at_s"]
            failed = took > slo.recover_within_s
            checks.append(SloCheck(name, not failed, f"{took:.2f}s", bound,
                                   f"{fault['action']} at {fault['at_s']}s recovered"
                                   f"{to_what} after "
                                   f"{took:.2f}s > {slo.recover_within_s:g}s" if failed else ""))
    invalid = summary.get("invalid") or []
    checks.append(SloCheck("valid run", not invalid, "; ".join(invalid) or "steps on time",
                           "every step fired on time",
                           "run invalid: " + "; ".join(invalid) if invalid else ""))
    return checks


def fault_label(fault: dict[str, Any]) -> str:
    """'node.crash edge2 at 10s', 'link.down edge2-s1 at 16s', 'model.rollback at 40s': stable
    from run to run (the injection time to 0.1 s), so CI can follow a check's history."""
    target = fault.get("target")
    if isinstance(target, list):
        groups = any(isinstance(t, list) for t in target)
        target = "|".join(",".join(t) for t in target) if groups else "-".join(target)
    at = f"at {round(fault['at_s'], 1):g}s"
    return " ".join(str(part) for part in (fault["action"], target, at) if part)


def check_slo(slo: Slo, summary: dict[str, Any]) -> list[str]:
    """The SLO violations of a run (empty: passed)."""
    return [check.message for check in slo_checks(slo, summary) if not check.passed]


def summarise(scenario: Scenario, backend: str, records: list[RequestRecord],
              events: list[dict[str, Any]], window_start: float, predicted_rps: float,
              duplicates: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json of DESIGN.md from the raw records of a run."""
    window_end = window_start + scenario.workload.duration_s
    in_window = [r for r in records if r.status == "completed" and r.done is not None
                 and window_start <= r.done < window_end]
    latencies = [r.latency_ms or 0.0 for r in in_window]
    throughput = len(in_window) / scenario.workload.duration_s
    series = buckets(records, window_start, window_end)
    late = [f"{e['action']} fired {e['late_ms']:.0f} ms late" for e in events
            if e.get("type") == ev.FAULT_INJECTED and (e.get("late_ms") or 0) > 250]
    summary: dict[str, Any] = {
        "scenario": scenario.name,
        "backend": backend,
        "throughput_rps": round(throughput, 3),
        "predicted_throughput_rps": round(predicted_rps, 3),
        "throughput_ratio": round(throughput / predicted_rps, 4) if predicted_rps else 0.0,
        "latency_ms": {"p50": round(percentile(latencies, 50), 2),
                       "p95": round(percentile(latencies, 95), 2),
                       "p99": round(percentile(latencies, 99), 2),
                       "mean": round(sum(latencies) / len(latencies), 2) if latencies else 0.0},
        "requests": {
            "sent": len(records),
            "completed": sum(r.status == "completed" for r in records),
            "lost": sum(r.status != "completed" for r in records),
            "duplicates": duplicates,
            "mismatched": sum(r.mismatched for r in records),
            "replayed": sum(r.attempts > 1 for r in records),
        },
        "faults": fault_timings(events, series, window_start, predicted_rps,
                                scenario.topology.dispatcher().name,
                                sorted(r.done for r in in_window if r.done is not None)),
        "control": control_summary(events, window_start),
        "window": {"start_unix": window_start, "duration_s": scenario.workload.duration_s,
                   "warmup_s": scenario.workload.warmup_s},
        "invalid": late,
    }
    summary.update(extra or {})
    violations = check_slo(scenario.slo, summary)
    summary["slo"] = {"passed": not violations, "violations": violations}
    return summary
