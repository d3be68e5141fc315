"""Netfilter building blocks for link impairments on kernels without netem.

Division of labour: `testbed.emulation.network` decides what each host must drop or delay (from the
topology and the scenario's steps) and runs what this module writes inside the host's network
namespace. This module knows the mechanisms: probing whether the kernel and the environment
have them, writing a chain of rules so that it is replaced in one transaction
(`iptables-restore --noflush`: packets never see a half-written chain), and talking to a
`testbed.emulation.delayshim` process over its stdin/stdout.

Chains (one of each per host namespace, so they vanish with it; nothing to record):
- `EDGEPIPE-PART` (first in INPUT): DROP what comes from the other side of a partition;
- `EDGEPIPE-LOSS` (INPUT): DROP at random what the path from each source would lose;
- `EDGEPIPE-DELAY` (last in INPUT): NFQUEUE what the path from each source would delay,
  so a packet that is dropped is never held first.
"""

from __future__ import annotations

import importlib.util
import json
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from functools import cache
from typing import IO, Any

PARTITION_CHAIN = "EDGEPIPE-PART"
LOSS_CHAIN = "EDGEPIPE-LOSS"
DELAY_CHAIN = "EDGEPIPE-DELAY"
SHIM_QUEUE = 0           # queue numbers are per network namespace: one shim per host
SHIM_REPLY_S = 5.0       # a shim answers in microseconds; this only bounds a broken one


class ShimError(RuntimeError):
    """A delay shim did not start or did not apply its table."""


def _probe(argv: Sequence[str]) -> bool:
    if shutil.which("unshare") is None:
        return False
    result = subprocess.run(["unshare", "--net", *argv], capture_output=True, check=False,
                            timeout=30)
    return result.returncode == 0


@cache
def nfqueue_available() -> bool:
    """Can this machine delay packets with the shim? Needs PyPI `netfilterqueue` in this
    interpreter, the iptables NFQUEUE target and the kernel's queue; probed by binding a
    queue behind a rule in a namespace that exists only for this one command."""
    if shutil.which("iptables") is None or importlib.util.find_spec("netfilterqueue") is None:
        return False
    bind = ("from netfilterqueue import NetfilterQueue; q = NetfilterQueue(); "
            "q.bind(0, lambda p: p.accept()); q.unbind()")
    return _probe(["sh", "-c", f"iptables -w -A INPUT -j NFQUEUE --queue-num {SHIM_QUEUE} "
                               f"&& {sys.executable} -c '{bind}'"])


def restore_input(chain: str, rules: Sequence[str]) -> str:
    """`iptables-restore --noflush` input that replaces `chain` with `rules` (iptables
    arguments after `-A CHAIN`) in one transaction, creating the chain if needed."""
    return "\n".join(["*filter", f":{chain} - [0:0]", *(f"-A {chain} {rule}" for rule in rules),
                      "COMMIT", ""])


def jump_script(chain: str, first: bool, hooks: Sequence[str] = ("INPUT",)) -> str:
    """Shell commands that make each of `hooks` (INPUT, OUTPUT) jump to `chain` (first or
    last), once."""
    return " && ".join(
        f"{{ iptables -w -C {hook} -j {chain} 2>/dev/null || "
        f"iptables -w {f'-I {hook} 1' if first else f'-A {hook}'} -j {chain}; }}"
        for hook in hooks)


class ShimClient:
    """The driver's end of one delay shim: its process, stdin to write tables to and stdout
    to read the answers from."""

    def __init__(self, proc: subprocess.Popen[bytes], host: str) -> None:
        self.proc = proc
        self.host = host
        self.delays: dict[str, tuple[float, float]] = {}   # the table in force
        self._sent: dict[str, tuple[float, float]] = {}

    def _reply(self) -> dict[str, Any]:
        stdout: IO[bytes] | None = self.proc.stdout
        assert stdout is not None
        deadline = time.monotonic() + SHIM_REPLY_S
        while time.monotonic() < deadline:
            readable, _, _ = select.select([stdout], [], [], deadline - time.monotonic())
            if readable:
                line = stdout.readline()
                if not line:
                    break
                return json.loads(line)
        raise ShimError(f"the delay shim of {self.host} did not answer (exit code "
                        f"{self.proc.poll()}; see its log)")

    def wait_ready(self) -> None:
        if not self._reply().get("ready"):
            raise ShimError(f"the delay shim of {self.host} did not bind its queue")

    def send_delays(self, delays: dict[str, tuple[float, float]]) -> None:
        """Send a new table (source IP -> (delay ms, jitter ms)); `confirm` waits for it to
        be in force (split so that a driver can update all shims side by side)."""
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write((json.dumps({"delays": delays}) + "\n").encode())
            stdin.flush()
        except BrokenPipeError:
            raise ShimError(f"the delay shim of {self.host} has exited "
                            f"(code {self.proc.poll()})") from None
        self._sent = dict(delays)

    def confirm(self) -> None:
        if self._reply().get("applied") != sum(1 for d, j in self._sent.values() if d or j):
            raise ShimError(f"the delay shim of {self.host} did not apply its table")
        self.delays = self._sent

    def close(self, timeout_s: float = 2.0) -> None:
        """Closing stdin makes the shim accept what it holds and exit."""
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass  # the run's teardown SIGKILLs it by its record


def shim_argv(seed: int) -> list[str]:
    """The shim's command line (this interpreter: it has netfilterqueue, as probed)."""
    return [sys.executable, "-m", "testbed.emulation.delayshim", "--queue", str(SHIM_QUEUE),
            "--seed", str(seed)]
