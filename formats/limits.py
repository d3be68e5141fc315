"""Bounds on every number a user file may hold, each with the reason it is where it is, and the
one rule for names that become file paths, interface names or scenario targets.

Division of labour: the readers (formats.scenario, formats.topology, partitioner.instance,
formats.onnxfile) call these checks where they convert a field, so the refusal carries the
file, line and field of the reader; this module only knows the numbers and why.

A bound is not a performance target: it is where a value stops meaning what the user wrote
(HTB cannot shape it, the machine cannot emulate it, a queue cannot hold it) or where the
testbed would grind for minutes before failing anyway. Values inside the bounds may still be
slow; values outside are refused before anything is built.
"""

from __future__ import annotations

import os
import re
from typing import Any

# --- names -----------------------------------------------------------------------------------
# Host, switch, topology and scenario names become paths (hosts/<name>/data,
# results/<name>/), Mininet interface names (<host>-eth0), cgroup names and Kubernetes labels.
# One rule for all: a letter, then letters, digits, '-' and '_'; no '/', '.', ';' or spaces,
# so a name can never leave its directory (`../x`) or nest (`a/b`), nor need shell quoting.
NAME_MAX = 32
_NAME = re.compile(rf"[A-Za-z][A-Za-z0-9_-]{{0,{NAME_MAX - 1}}}")


def plain_name(value: Any, what: str) -> str:
    """`value` if it is a plain name (the rule above), else ValueError saying the rule."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"{what} {value!r} must start with a letter and use only letters, "
                         f"digits, '-' and '_' (at most {NAME_MAX} characters)")
    return value


# --- topology --------------------------------------------------------------------------------
# Every host runs an agent (a Python process, ~40 MB and a burst of CPU to start) plus its
# stage workers, all on this machine's cores. Measured on the 2-core machine: 20 hosts come up
# in about 1.2 s and from ~15 busy hosts the CPU budget caps the plan (docs/architecture.md);
# 500 hosts build for minutes and then cannot run. 16 hosts per core keeps a network buildable
# in seconds and leaves room for idle hosts; at least 32 so small machines still run the
# topologies shipped here.
HOSTS_PER_CORE = 16
MIN_HOSTS_LIMIT = 32


def max_hosts() -> int:
    return max(MIN_HOSTS_LIMIT, HOSTS_PER_CORE * (os.cpu_count() or 1))


# Switches are Linux bridges (cheap), but each one is still an interface pair per link.
def max_switches() -> int:
    return max_hosts()


# Bandwidth. HTB keeps rates in bytes per second and Mininet passes them in Mbit: 1bit is 0 B/s,
# and under 100 Kbit one 1500-byte packet holds the link for more than 120 ms, longer than a
# heartbeat period, so the control plane's own traffic would be the experiment. Above 1000 Mbit
# Mininet does not shape at all and the link is a bare veth (a few Gbit/s here); 100 Gbit is
# far past what any veth carries, so a larger figure can only be a typo (1Tbit, 1000000TiB).
MIN_BANDWIDTH_MBPS = 0.1
MAX_BANDWIDTH_MBPS = 100_000.0

# Delay: the NFQUEUE shim (or netem) holds each packet; past 10 s TCP's retransmission timer
# fires before the packet arrives and ZeroMQ reconnects: the link is down, not slow.
MAX_DELAY_S = 10.0

# Host memory and disk: a cgroup limit and a tmpfs on a machine with 24 GiB; past 1 TiB no
# machine this runs on has it, and a tmpfs that large fails to mount.
MAX_HOST_BYTES = 1024**4

# --- scenario --------------------------------------------------------------------------------
# Requests in flight (closed loop). ZeroMQ's default high-water mark is 1000 messages per
# socket: beyond that a stage's queue is full and more requests in flight only add latency
# (Little's law); the dispatcher also keeps every in-flight input for replay, so 1e8 grew it to
# 1.9 GB and it sent nothing.
MAX_CONCURRENCY = 1000
# Open-loop rate: one dispatcher process spends ~1.5-2 ms of CPU per 600 KB frame
# (benchmarks/frame_overhead.py), so a few hundred frames/s per core is its ceiling; 10,000
# rps is far past any pipeline here and still a sane number for the load generator's clock.
MAX_RATE_RPS = 10_000.0
# Durations of a run, warm-up, step or control-plane knob: a day. Runs here take a minute;
# the report's 1 s buckets (timeseries.csv) grow with the duration.
MAX_DURATION_S = 86_400.0
# The seeded input pool is kept in memory with its reference outputs.
MAX_POOL = 10_000

# --- planner instance ------------------------------------------------------------------------
# Bytes a tensor or a segment may declare: ONNX files are protobufs (2 GiB at most), and a
# frame on the wire is limited far below (stage_image.wire); 1 TiB is a clear typo bound that
# keeps every derived time finite and printable.
MAX_INSTANCE_BYTES = 1024**4
# One stage's compute: an hour per frame is no pipeline.
MAX_COMPUTE_MS = 3_600_000.0
# Relative node speed (1.0 = the profiling host).
MAX_SPEED = 1e6

# --- models ----------------------------------------------------------------------------------
# A model file: protobuf's 2 GiB message limit (external data aside).
MAX_MODEL_FILE_BYTES = 2 * 1024**3
# One declared tensor: a 1e12 dimension made onnxruntime try to allocate 7 TiB. 4 GiB covers
# every activation of the zoo models many times over and fits this machine.
MAX_TENSOR_BYTES = 4 * 1024**3

# --- nesting ---------------------------------------------------------------------------------
# YAML and JSON readers recurse per level; nothing in our formats nests deeper than ~6.
MAX_NESTING = 64


def check_range(value: float, low: float, high: float, what: str, unit: str = "") -> float:
    """`value` if low <= value <= high, else ValueError naming the bound."""
    if not low <= value <= high:
        raise ValueError(f"{what} {value:g}{unit} is outside {low:g}{unit}..{high:g}{unit}")
    return value
