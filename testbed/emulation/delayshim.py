"""Packet delay without netem: holds the packets a host receives for the delay of the path
they came along, then lets them in.

Division of labour: `testbed.emulation.network` decides which packets are delayed and by how much.
In
the receiving host's namespace it sends them here with an iptables rule
(`-A EDGEPIPE-DELAY -s SRC -j NFQUEUE --queue-num 0`, one per source whose path has a delay),
and writes the table of delays to this process's stdin. This process only keeps packets in a
heap ordered by due time and gives the kernel its verdict (accept) when they are due. It runs
in the host's network namespace but outside the host's CPU and memory cgroups, like netem
runs in the kernel: the emulated link must not eat the host's CPU budget.

Protocol on stdin/stdout (JSON lines, so the driver never parses anything else):
- stdout `{"ready": true}` once the queue is bound (rules may be installed after that);
- stdin `{"delays": {"10.0.0.2": [delay_ms, jitter_ms], ...}}` replaces the table, answered
  by `{"applied": N}` once it is in force. Sources not in the table pass undelayed;
- stdin closed (the driver exited or stopped the run): the queue is released and the process
  exits. Packets still held are accepted first, so nothing is lost on the way out.

Jitter: each packet's delay is drawn uniformly from delay +- jitter, but never earlier than
the previous packet from the same source, so jitter varies latency without reordering a flow
(TCP collapses under reordering; a real queue does not reorder either).

    python -m testbed.emulation.delayshim [--queue 0] [--seed 1]
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import os
import random
import select
import socket
import sys
import time
import warnings
from typing import Any

IPV4_SOURCE = slice(12, 16)   # bytes of the source address in an IPv4 header
HEADER_BYTES = 20             # all the shim reads of a packet: the kernel copies no more
MAX_QUEUE = 50_000            # packets held at once: 1 Gbit x 20 ms is ~1700 full frames
SOCKET_BYTES = 16 << 20       # receive buffer for queued packet notices


class DelayShim:
    """The heap of held packets and the table of delays per source address."""

    def __init__(self, seed: int) -> None:
        self.table: dict[bytes, tuple[float, float]] = {}   # packed source -> (delay s, jitter s)
        self.held: list[tuple[float, int, Any]] = []        # (due, sequence, packet)
        self.last_due: dict[bytes, float] = {}
        self.sequence = 0
        self.random = random.Random(seed)

    def set_table(self, delays: dict[str, list[float]]) -> int:
        self.table = {socket.inet_aton(ip): (d / 1000, j / 1000)
                      for ip, (d, j) in delays.items() if d > 0 or j > 0}
        return len(self.table)

    def on_packet(self, packet: Any) -> None:
        """netfilterqueue callback: hold the packet, or accept it at once."""
        source = packet.get_payload()[IPV4_SOURCE]
        entry = self.table.get(source)
        if entry is None:
            packet.accept()
            return
        delay, jitter = entry
        due = time.monotonic() + delay
        if jitter:
            due += self.random.uniform(-jitter, jitter)
        due = max(due, self.last_due.get(source, 0.0))
        self.last_due[source] = due
        self.sequence += 1
        heapq.heappush(self.held, (due, self.sequence, packet))

    def release_due(self) -> float | None:
        """Accept every packet that is due; the seconds until the next one (None: none held)."""
        now = time.monotonic()
        while self.held and self.held[0][0] <= now:
            heapq.heappop(self.held)[2].accept()
        return max(0.0, self.held[0][0] - now) if self.held else None

    def release_all(self) -> None:
        while self.held:
            heapq.heappop(self.held)[2].accept()


def serve(queue_num: int, seed: int) -> int:
    from netfilterqueue import COPY_PACKET, NetfilterQueue

    shim = DelayShim(seed)
    nfqueue = NetfilterQueue()
    with warnings.catch_warnings():  # the kernel may cap the buffer; a smaller one still works
        warnings.simplefilter("ignore", RuntimeWarning)
        nfqueue.bind(queue_num, shim.on_packet, max_len=MAX_QUEUE, mode=COPY_PACKET,
                     range=HEADER_BYTES, sock_len=SOCKET_BYTES)
    # Held packets are plain objects without cycles; a collector pause would add jitter.
    gc.disable()
    queue_fd, control_fd = nfqueue.get_fd(), sys.stdin.fileno()
    os.set_blocking(control_fd, False)
    pending = b""
    print(json.dumps({"ready": True}), flush=True)
    try:
        while True:
            timeout = shim.release_due()
            readable, _, _ = select.select([queue_fd, control_fd], [], [], timeout)
            if queue_fd in readable:
                nfqueue.run(block=False)
            if control_fd in readable:
                chunk = os.read(control_fd, 1 << 16)
                if not chunk:
                    return 0
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        applied = shim.set_table(json.loads(line)["delays"])
                        print(json.dumps({"applied": applied}), flush=True)
    finally:
        shim.release_all()
        nfqueue.unbind()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.emulation.delayshim",
                                     description="Delay queued packets per source address.")
    parser.add_argument("--queue", type=int, default=0, help="NFQUEUE number to bind")
    parser.add_argument("--seed", type=int, default=1, help="seed of the jitter draws")
    args = parser.parse_args(argv)
    return serve(args.queue, args.seed)


if __name__ == "__main__":
    raise SystemExit(main())
