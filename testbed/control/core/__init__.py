"""The control plane's decision core: one small pure module per concern, used by both the
embedded controller (testbed.control.controller) and the k3s loop (testbed.k8s.loop).

Every class and function here takes the time as an argument (`now`), never reads a clock,
opens a socket or touches a file; what it decides comes back as values (events to write,
hosts to act on), which the backends carry out. Each module is tested alone with a fake
clock (tests/test_core_*.py).

- actions: `Event`, a line of events.jsonl to write (names: testbed.control.events)
- backoff: the one back-off rule (how long a failed node is kept out)
- health: heartbeat suspicion, the rejoin hold, the unhealthy back-off, per node
- rejoin: the hold clock of returning nodes, and the margin rule for taking one back
- straggler: a stage computing too slowly for too long
- replan: the pending re-plan (which request wins), epoch numbers, stale plans
- standby: where warm standbys go, and which are no longer needed
- reconcile: a host's heartbeat against the workers wanted there (level-triggered)
- versions: the target model version, rollout and rollback
- records: the embedded plane's worker (`Slot`) and epoch (`Epoch`) records
"""
