"""The delay shim's packet handling without a kernel queue: fake packets carry an IPv4 header
and record when they were accepted."""

from __future__ import annotations

import socket
import time

from testbed.emulation.delayshim import DelayShim


class FakePacket:
    def __init__(self, source: str, number: int) -> None:
        self.header = bytes(12) + socket.inet_aton(source) + bytes(4)
        self.number = number
        self.accepted: float | None = None

    def get_payload(self) -> bytes:
        return self.header

    def accept(self) -> None:
        assert self.accepted is None, "a verdict twice"
        self.accepted = time.monotonic()


def drain(shim: DelayShim, until: float) -> None:
    while time.monotonic() < until:
        wait = shim.release_due()
        time.sleep(min(wait if wait is not None else 0.001, 0.001))


def test_delays_per_source_and_passes_others_at_once() -> None:
    shim = DelayShim(seed=1)
    assert shim.set_table({"10.0.0.2": [20.0, 0.0], "10.0.0.3": [0.0, 0.0]}) == 1
    start = time.monotonic()
    delayed, direct, unknown = (FakePacket("10.0.0.2", 0), FakePacket("10.0.0.3", 1),
                                FakePacket("10.0.0.9", 2))
    for packet in (delayed, direct, unknown):
        shim.on_packet(packet)
    assert direct.accepted is not None and unknown.accepted is not None
    assert delayed.accepted is None
    drain(shim, start + 0.05)
    # lower bound: the delay was applied; upper bound generous for a busy 2-core machine
    assert delayed.accepted is not None and 0.019 <= delayed.accepted - start <= 0.1


def test_jitter_varies_delay_but_never_reorders_a_source() -> None:
    shim = DelayShim(seed=3)
    shim.set_table({"10.0.0.2": [10.0, 5.0]})
    start = time.monotonic()
    packets = [FakePacket("10.0.0.2", i) for i in range(50)]
    for packet in packets:
        shim.on_packet(packet)
        time.sleep(0.0005)
    drain(shim, start + 0.1)
    accepted = [p.accepted for p in packets]
    assert all(a is not None for a in accepted)
    assert accepted == sorted(accepted)                       # FIFO per source
    delays = [a - start for a in accepted]
    assert min(delays) >= 0.005 and max(delays) <= 0.15   # upper: scheduler noise
    assert max(b - a for a, b in zip(delays, delays[1:])) > 0.001   # not one fixed delay


def test_release_all_accepts_what_is_held() -> None:
    shim = DelayShim(seed=1)
    shim.set_table({"10.0.0.2": [1000.0, 0.0]})
    packet = FakePacket("10.0.0.2", 0)
    shim.on_packet(packet)
    assert shim.release_due() is not None and packet.accepted is None
    shim.release_all()
    assert packet.accepted is not None and shim.release_due() is None
