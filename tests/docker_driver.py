"""`run_scenario.py` with the embedded run's change for Docker hosts applied, for the tests
until `testbed/run.py` has it (then delete this file and call run_scenario.py).

The change (the H8 report has it as a patch): `start_agent` starts the agent with
`net.popen_python(host, ["-m", "stage_image.agent", ...], log, env)` instead of
`net.popen(host, [sys.executable, "-m", ...], log, env)` (PYTHONPATH left to popen_python),
so a Docker host's agent runs inside its container from the image's Python and code; and
`run_embedded` builds `EmulatedNetwork(topology, shared_dirs=[out_dir])`, so those agents
write worker logs into the results directory like process hosts' do. Here both are done by
wrapping run.py's own functions, so this follows run.py as it changes.

    python -m tests.docker_driver SCENARIO --out DIR [--duration 20s]
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from testbed import network, run
from testbed.driver import main


class _AgentsByKind:
    """The network as run.start_agent sees it, with its `popen` of the driver's Python
    going through `popen_python` (the interpreter and code of the host's kind)."""

    def __init__(self, net: network.EmulatedNetwork) -> None:
        self._net = net

    def __getattr__(self, name: str) -> Any:
        return getattr(self._net, name)

    def popen(self, host: str, argv: Sequence[str], log_path: Path,
              env: Mapping[str, str] | None = None) -> Any:
        assert argv[0] == sys.executable, argv
        extra = {k: v for k, v in (env or {}).items() if k != "PYTHONPATH"}
        return self._net.popen_python(host, argv[1:], log_path, extra)


def main_with_docker_hosts(args: list[str]) -> int:
    out = Path(args[args.index("--out") + 1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start_agent = run.start_agent

    def start_agent_by_kind(net: network.EmulatedNetwork, *rest: Any) -> None:
        start_agent(_AgentsByKind(net), *rest)

    class SharedResults(network.EmulatedNetwork):
        def __init__(self, topology: Any, **kwargs: Any) -> None:
            super().__init__(topology, shared_dirs=[out], **kwargs)

    run.start_agent = start_agent_by_kind
    network.EmulatedNetwork = SharedResults  # type: ignore[misc]
    return main(args)


if __name__ == "__main__":
    sys.exit(main_with_docker_hosts(sys.argv[1:]))
