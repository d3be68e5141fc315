"""`run_scenario.py` with the embedded run's change for Docker hosts applied, for the tests
until `testbed/run.py` has it (then delete this file and call run_scenario.py).

The change (the H8 report has it as a patch): `start_agent` starts the agent with
`net.popen_python`, which runs a Docker host's agent inside its container from the image's
Python and code, and the network shares the results directory with Docker hosts, so their
agents write worker logs where process hosts' do.

    python -m tests.docker_driver SCENARIO --out DIR [--duration 20s]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from testbed import network, run
from testbed.driver import CONTROL_PORT, main

AGENT_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_agent(net: Any, out_dir: Path, host: str) -> None:
    """run.start_agent through `popen_python` (the interpreter and code of the host's kind)."""
    dispatcher = net.topology.dispatcher().name
    host_logs = out_dir / "logs" / host
    host_logs.mkdir(parents=True, exist_ok=True)
    net.popen_python(host, ["-m", "stage_image.agent", "--host", host,
                            "--controller", f"tcp://{net.ip(dispatcher)}:{CONTROL_PORT}",
                            "--data-dir", str(net.data_dir(host)), "--ip", net.ip(host),
                            "--log-dir", str(host_logs)],
                     host_logs / "agent.log", env=AGENT_ENV)


def with_shared_results(out_dir: Path) -> type[network.EmulatedNetwork]:
    """EmulatedNetwork that shares `out_dir` with Docker hosts (run_embedded builds it)."""

    class SharedResults(network.EmulatedNetwork):
        def __init__(self, topology: Any, **kwargs: Any) -> None:
            super().__init__(topology, shared_dirs=[out_dir], **kwargs)

    return SharedResults


if __name__ == "__main__":
    args = sys.argv[1:]
    out = Path(args[args.index("--out") + 1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run.start_agent = start_agent
    network.EmulatedNetwork = with_shared_results(out)  # type: ignore[misc]
    sys.exit(main(args))
