"""Deterministic simulation of the embedded control plane (issue 11, item 5): the real
ControlPlane in a simulated cluster (world), seeded fault schedules (nemesis), invariants
(checks), and the runner (run; `python -m testbed.control.sim --seed S --schedules K`)."""
