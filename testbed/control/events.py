"""The event schema of events.jsonl: every event name, who writes it, and its payload fields,
as data. Every line is `{"t": unix time, "type": NAME, ...payload}`.

Division of labour: this module only states the contract. `testbed.control.state.EventLog`
refuses to write an event that is not here or carries a field its entry does not list (a
typo in an emitter fails its tests, not a reader months later); the readers
(testbed.experiment.results and report, benchmarks/recovery.py) use the name constants
instead of string literals. docs/architecture.md's event table is generated from it
(`python -m testbed.control.events --markdown`) and checked by tests/test_docs.py.

Sources: `embedded` (testbed.control.controller and its dispatcher), `k3s`
(testbed.k8s.loop and its workload host), `both`, `driver` (the fault timeline,
testbed.experiment.faults, appended to the same file).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EventSpec:
    name: str
    source: str                     # embedded | k3s | both | driver
    fields: frozenset[str]          # payload fields it may carry (all optional but "t")
    meaning: str


_WORKLOAD = ("mode", "concurrency", "rate", "arrival", "duration_s", "warmup_s", "seed",
             "pool_size", "timeout_s", "drain_timeout_s", "input_dims")
_COUNTS = ("sent", "completed", "lost", "mismatched", "duplicates", "in_flight", "replays",
           "bad_results", "stale_results")
_PLAN_SUMMARY = ("kind", "reason", "version", "algorithm", "live", "solve_s", "split_s",
                 "split_cached", "precomputed", "bottleneck_ms", "predicted_throughput_rps",
                 "hosts", "cuts", "pipelines", "choice", "deploy_estimate_s", "bridged")
_WORKER = ("host", "port", "epoch", "stage", "detail", "reason")
_REJOIN = ("reason", "current_bottleneck_ms", "candidate_bottleneck_ms", "margin")
_FAULT = ("action", "target", "params", "step", "late_ms", "took_ms", "source", "detail",
          "final", "error")

_TABLE: list[tuple[str, str, tuple[str, ...], str]] = [
    # controller
    ("controller.started", "both", ("host", "pid", "control", "sink", "ipc", "repository",
                                    "backend", "namespace", "next_epoch", "heartbeats",
                                    "model_server"), "the control loop runs"),
    ("controller.stopped", "both", ("backend", *_COUNTS), "the control loop ended"),
    ("controller.stalled", "both", ("stall_ms",),
     "the loop did not run for over two heartbeats; silences are shifted by the stall"),
    ("api.error", "k3s", ("source", "reason"), "a Kubernetes API call or watch failed"),
    # agents and nodes
    ("agent.hello", "embedded", ("host", "pid", "incarnation"), "an agent connected"),
    ("agent.restarted", "embedded", ("host", "pid", "incarnation"),
     "a new start of a host's agent was admitted (testbed.control.admission)"),
    ("agent.stale", "embedded", ("host", "incarnation"),
     "a hello of an agent start that was replaced already: dropped"),
    ("node.suspected", "both", ("host", "silent_ms", "missed", "source", "reason", "serving"),
     "a node stopped beating (or the API says it is down)"),
    ("node.returned", "both", ("host", "silent_ms", "down_s", "hold_s"),
     "a suspected node is heard from again; the rejoin hold starts"),
    ("node.stable", "both", ("host", "held_s"), "a returned node held still for the hold"),
    ("node.straggler", "embedded", ("host", "epoch", "stage", "compute_ms", "planned_ms",
                                    "factor"), "a stage computes too slowly for too long"),
    ("node.unhealthy", "embedded", ("host", "reason", "hold_s", "failures"),
     "a node failed: kept out for the back-off"),
    ("node.healthy", "embedded", ("host", "failures"), "a node's back-off ended"),
    # planning
    ("replan.requested", "both", ("kind", "reason"), "a new plan is wanted"),
    ("replan.deferred", "embedded", ("kind", "reason", "deploying_epoch"),
     "no re-plan: a fault that does not touch the sound epoch being deployed lets it finish"),
    ("replan.delayed", "embedded", ("host", "delay_s", "reason"),
     "the re-plan waits `replan_delay` (the simulated Kubernetes wait)"),
    ("replan.disabled", "embedded", ("reason",), "a re-plan was wanted, `replan` is off"),
    ("plan.computed", "both", ("epoch", "plan", "reused_stages", *_PLAN_SUMMARY),
     "a plan became an epoch"),
    ("plan.deployed", "both", ("epoch", "version", "kind", "hosts", "replayed", "handover",
                               "reused_stages", "deploy_s", "predicted_throughput_rps",
                               "plan"), "an epoch serves"),
    ("plan.kept", "k3s", ("reason", "current_bottleneck_ms", "candidate_bottleneck_ms"),
     "the new plan is the plan in force"),
    ("plan.stale", "both", ("reason",), "a plan was dropped: the world changed meanwhile"),
    ("plan.failed", "both", ("kind", "reason"), "planning raised an error"),
    ("plan.infeasible", "both", ("reason", "live", "version"),
     "no plan fits the live nodes: waiting for one to return"),
    ("rejoin.accepted", "both", _REJOIN, "a plan with a returned node wins by the margin"),
    ("rejoin.declined", "both", _REJOIN, "it does not: the node stays a spare"),
    ("contingency.ready", "embedded", ("epoch", "plans", "standbys", "staged"),
     "plans for the loss of each node, and their standbys, are ready (`staged`: stage "
     "models kept on a host's disk where its memory had no room for a standby)"),
    ("contingency.none", "embedded", ("reason",), "no contingency plan for a loss"),
    ("standby.prepared", "embedded", ("host", "port", "version", "segments", "sha256",
                                      "serving"),
     "a warm standby worker is being loaded"),
    ("standby.released", "embedded", ("host", "port", "reason"), "a standby was ended"),
    ("standby.readopted", "embedded", ("host", "port", "version", "segments"),
     "a returned host's running worker is kept as a standby"),
    # epochs and deployment
    ("deploy.sent", "both", ("epoch", "stage", "host", "port", "sha256", "loaded"),
     "a stage's route (embedded) or pod (k3s) was asked for"),
    ("deploy.timeout", "embedded", ("epoch", "waiting_for", "phase"),
     "agents did not say hello, or workers were not ready, in time"),
    ("deploy.conflict", "embedded", _WORKER, "an agent refused a route; retried"),
    ("deploy.failed", "k3s", ("epoch", "reason"), "the API refused an epoch's objects"),
    ("epoch.ready", "embedded", ("epoch", "deploy_s"), "every route of an epoch confirmed"),
    ("epoch.draining", "embedded", ("epoch", "in_flight"),
     "a healthy old epoch finishes its requests"),
    ("epoch.retired", "embedded", ("epoch", "reason"), "an epoch's routes were withdrawn"),
    ("epoch.abandoned", "embedded", ("epoch", "reason"),
     "an epoch was superseded before it served"),
    ("epochs.pruned", "k3s", ("epoch", "objects"), "old epochs' objects deleted"),
    ("pods.force_deleted", "k3s", ("nodes", "objects"), "pods on dead nodes deleted"),
    # workers and models
    ("worker.fetching", "embedded", _WORKER, "a worker's model is being fetched"),
    ("worker.starting", "embedded", _WORKER, "a worker process starts"),
    ("worker.ready", "embedded", _WORKER,
     "a worker confirmed a route (epoch 0: a standby is loaded)"),
    ("worker.exited", "embedded", _WORKER, "a worker ended on its own"),
    ("worker.failed", "embedded", _WORKER, "a worker could not start or serve"),
    ("worker.stopped", "embedded", _WORKER, "a worker we stopped ended"),
    ("model.sent", "embedded", ("host", "sha256", "bytes"), "a model reached an agent"),
    ("model.corrupt", "embedded", ("host", "port", "sha256"),
     "an agent's cached model failed its SHA-256"),
    ("disk.fault", "embedded", _WORKER,
     "a worker failed on its host's disk (ENOSPC, EROFS) despite eviction: planned around"),
    ("model.received", "k3s", ("bytes", "sha256"), "the driver's model upload is complete"),
    # versions
    ("version.found", "embedded", ("version", "sha256", "source", "published"),
     "a new version in the repository"),
    ("version.invalid", "embedded", ("version", "reason"), "a published version is refused"),
    ("version.ready", "embedded", ("version", "sha256", "segments"),
     "a version is hashed and its references computed"),
    ("rollout.requested", "embedded", ("version", "previous", "reason"),
     "the target version changed"),
    ("version.switched", "embedded", ("version", "previous", "epoch"),
     "another version serves"),
    ("version.rollback", "embedded", ("version", "current"), "the driver asked for a rollback"),
    # the workload
    ("references.ready", "both", ("version", "pool", "inputs"),
     "the input pool and the model's reference outputs are ready"),
    ("workload.started", "both", ("epoch", *_WORKLOAD), "the dispatcher issues requests"),
    ("workload.stopped", "both", ("sent", "in_flight"), "it stopped issuing"),
    ("workload.done", "both", _COUNTS, "every request is answered or lost"),
    ("workload.failed", "k3s", ("reason",), "the workload could not start"),
    ("requests.replayed", "both", ("reason", "epoch", "count"),
     "unanswered requests were sent again"),
    ("dispatcher.switched", "k3s", ("epoch", "version", "heads", "replayed"),
     "the dispatcher sends to a new epoch"),
    # the driver's fault timeline
    ("fault.injected", "driver", _FAULT, "a scenario step fired"),
    ("fault.healed", "driver", _FAULT, "a step's fault was undone"),
]

EVENTS: dict[str, EventSpec] = {
    name: EventSpec(name, source, frozenset(fields), meaning)
    for name, source, fields, meaning in _TABLE}

# Name constants for readers and emitters (a misspelt constant is a NameError; a misspelt
# string is a silent miss).
CONTROLLER_STARTED = "controller.started"
CONTROLLER_STOPPED = "controller.stopped"
CONTROLLER_STALLED = "controller.stalled"
AGENT_HELLO = "agent.hello"
AGENT_RESTARTED = "agent.restarted"
AGENT_STALE = "agent.stale"
DISK_FAULT = "disk.fault"
NODE_SUSPECTED = "node.suspected"
NODE_RETURNED = "node.returned"
NODE_STABLE = "node.stable"
NODE_STRAGGLER = "node.straggler"
NODE_UNHEALTHY = "node.unhealthy"
NODE_HEALTHY = "node.healthy"
REPLAN_REQUESTED = "replan.requested"
REPLAN_DEFERRED = "replan.deferred"
PLAN_COMPUTED = "plan.computed"
PLAN_DEPLOYED = "plan.deployed"
PLAN_STALE = "plan.stale"
PLAN_FAILED = "plan.failed"
PLAN_KEPT = "plan.kept"
PLAN_INFEASIBLE = "plan.infeasible"
REJOIN_ACCEPTED = "rejoin.accepted"
REJOIN_DECLINED = "rejoin.declined"
DEPLOY_SENT = "deploy.sent"
DEPLOY_FAILED = "deploy.failed"
WORKER_READY = "worker.ready"
CONTINGENCY_READY = "contingency.ready"
WORKER_EXITED = "worker.exited"
WORKER_FAILED = "worker.failed"
MODEL_CORRUPT = "model.corrupt"
VERSION_FOUND = "version.found"
VERSION_SWITCHED = "version.switched"
VERSION_ROLLBACK = "version.rollback"
ROLLOUT_REQUESTED = "rollout.requested"
WORKLOAD_STARTED = "workload.started"
WORKLOAD_DONE = "workload.done"
FAULT_INJECTED = "fault.injected"
FAULT_HEALED = "fault.healed"

# what results.py counts as the control plane having noticed a fault
DETECTION_EVENTS = (NODE_SUSPECTED, NODE_STRAGGLER, WORKER_EXITED, WORKER_FAILED,
                    MODEL_CORRUPT, DISK_FAULT, AGENT_RESTARTED)
# a booted node's agent admitted again (summary.json: readmitted_s of restarts)
READMISSION_EVENTS = (AGENT_RESTARTED, AGENT_HELLO)


class EventSchemaError(ValueError):
    """An emitter wrote an event the schema does not know (a bug in our code)."""


def check(kind: str, fields: dict[str, Any]) -> None:
    """EventSchemaError unless `kind` is known and carries only its listed fields."""
    spec = EVENTS.get(kind)
    if spec is None:
        raise EventSchemaError(f"unknown event {kind!r} (add it to testbed.control.events)")
    extra = sorted(set(fields) - spec.fields)
    if extra:
        raise EventSchemaError(f"event {kind} has no field(s) {extra} "
                               f"(testbed.control.events lists {sorted(spec.fields)})")


def markdown() -> str:
    """The event table of docs/architecture.md."""
    lines = ["| event | written by | fields | meaning |", "|---|---|---|---|"]
    for spec in EVENTS.values():
        lines.append(f"| `{spec.name}` | {spec.source} | "
                     f"{', '.join(sorted(spec.fields))} | {spec.meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        print("usage: python -m testbed.control.events --markdown", file=sys.stderr)
        sys.exit(2)
    sys.stdout.write(markdown())
