"""The project's Docker daemon: started by hand when needed (no systemd on these machines),
stopped by the PID we recorded, and the iptables FORWARD rules that keep Linux-bridge
switches working while a dockerd with iptables is around.

Division of labour: this module only runs and stops `dockerd` and talks to it through the
`docker` CLI; building the stage image is testbed/emulation/images.py, Docker hosts in the
emulated network are testbed/emulation/containers.py (wired in by testbed/emulation/network.py).

Daemons for runs: a network with Docker hosts starts the private daemon if nothing answers
(`start_for_runs`, which leaves a marker naming the daemon's PID) and every run's teardown
calls `release_for_runs`: the daemon is stopped once no container of any run is left, and
only if it was started for runs. A daemon someone started by hand (`python -m
testbed.emulation.dockerd start`, `make image --keep-daemon`) has no marker and is left running.

Why a private daemon: by default we run our own dockerd with its own socket, data root and
exec root (`/run/edgepipe/docker.sock`, `/var/lib/edgepipe/docker`), so it can neither collide
with a daemon someone else runs on the machine nor be stopped by them. It runs with
`--iptables=false --ip-forward=false --bridge=none`: our containers never use Docker
networking (they start with `--network none` and get a veth from the testbed), and a daemon
that leaves iptables alone cannot set the FORWARD policy to DROP under the Mininet bridges.
Where a system dockerd already runs (the lab VM), point EDGEPIPE_DOCKER_HOST at its socket and
use `allow_bridge_forwarding()` for each bridge we create.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ENV_HOST = "EDGEPIPE_DOCKER_HOST"
RULE_TAG = "edgepipe"
RUN_LABEL = "edgepipe.run"     # every container of a run carries its run id under this label


class DockerError(RuntimeError):
    """dockerd or the docker CLI failed; the message carries the reason (and log tail)."""


@dataclass(frozen=True)
class DaemonPaths:
    """Where our private daemon keeps its state. Images persist in `data_root` across runs,
    so the (slow) base image and stage image are built once per machine."""

    socket: Path = Path("/run/edgepipe/docker.sock")
    data_root: Path = Path("/var/lib/edgepipe/docker")
    exec_root: Path = Path("/run/edgepipe/docker-exec")
    pidfile: Path = Path("/run/edgepipe/dockerd.pid")
    log: Path = Path("/run/edgepipe/dockerd.log")
    runs_marker: Path = Path("/run/edgepipe/dockerd.for-runs")   # PID, if started for runs


def docker_cli() -> str:
    """The docker client to use. Prefer the one packaged with dockerd (apt docker.io puts both
    in /usr/bin): a newer stray client on PATH may refuse an older daemon's API."""
    override = os.environ.get("EDGEPIPE_DOCKER_CLI")
    if override:
        return override
    dockerd = shutil.which("dockerd")
    if dockerd:
        for candidate in (Path(dockerd).resolve().parent.parent / "bin" / "docker",
                          Path("/usr/bin/docker")):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("docker")
    if not found:
        raise DockerError("no docker client found: install the apt package docker.io")
    return found


def ping(host: str, timeout: float = 2.0) -> bool:
    """True when a Docker API answers `GET /_ping` on `host` (unix:///path only)."""
    if not host.startswith("unix://"):
        raise ValueError(f"only unix:// docker hosts are supported, got {host!r}")
    path = host[len("unix://"):]
    if not os.path.exists(path):
        return False

    class _UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path)

    conn = _UnixConnection("localhost", timeout=timeout)
    try:
        conn.request("GET", "/_ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _pid_is_our_dockerd(pid: int, sock: Path) -> bool:
    """Guard against PID reuse: only signal a process that is a dockerd on *our* socket."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not argv or not argv[0].endswith(b"dockerd"):
        return False
    return any(str(sock).encode() in arg for arg in argv)


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
            if finished == pid:
                return True
        except ChildProcessError:
            # Not our child (a daemon recorded by an earlier run): poll /proc instead.
            if not Path(f"/proc/{pid}").exists():
                return True
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1]
            if state == "Z":
                return True
        time.sleep(0.1)
    return False


@dataclass
class Dockerd:
    """One Docker daemon we talk to: ours (started and stopped here) or an existing one.

    `start()` is idempotent: when something already answers on the socket it is used and not
    owned, so `stop()` leaves it alone. Only a daemon we started is ever signalled, by PID."""

    paths: DaemonPaths = field(default_factory=DaemonPaths)
    host: str = ""
    iptables: bool = False
    pid: int | None = None          # set only when we started the daemon
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.host:
            self.host = os.environ.get(ENV_HOST) or f"unix://{self.paths.socket}"

    @property
    def owned(self) -> bool:
        return self.pid is not None

    @property
    def private(self) -> bool:
        """True when `host` is our private socket (so we may start a daemon for it)."""
        return self.host == f"unix://{self.paths.socket}"

    def running(self) -> bool:
        return ping(self.host)

    def argv(self) -> list[str]:
        dockerd = shutil.which("dockerd")
        if dockerd is None:
            raise DockerError("dockerd not found: install the apt package docker.io")
        argv = [dockerd, "--host", self.host,
                "--data-root", str(self.paths.data_root),
                "--exec-root", str(self.paths.exec_root),
                "--pidfile", str(self.paths.pidfile),
                "--storage-driver", "overlay2"]
        if not self.iptables:
            # No iptables, no forwarding sysctl, no docker0: nothing of the host's packet
            # path changes, which is what keeps Mininet's Linux bridges forwarding.
            argv += ["--iptables=false", "--ip-forward=false", "--bridge=none"]
        return argv

    def start(self, timeout: float = 30.0) -> Dockerd:
        if self.running():
            return self
        if not self.private:
            raise DockerError(f"no Docker daemon answers on {self.host} ({ENV_HOST}); "
                              "start it, or unset the variable to use the project's own")
        if os.geteuid() != 0:
            raise DockerError("starting dockerd needs root")
        clear_stale(self.paths)
        for directory in (self.paths.socket.parent, self.paths.data_root, self.paths.exec_root):
            directory.mkdir(parents=True, exist_ok=True)
        log = open(self.paths.log, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            # A new session: a Ctrl-C in the caller's terminal must not take the daemon down
            # half-way; we stop it ourselves, in order.
            self._proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        self.pid = self._proc.pid
        # The pidfile dockerd writes is our record for a later run to clear a dead one.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.pid = None
                raise DockerError(f"dockerd exited with {self._proc.returncode}:\n"
                                  + self.log_tail())
            if self.running():
                return self
            time.sleep(0.1)
        self.stop()
        raise DockerError(f"dockerd did not answer on {self.host} within {timeout:g}s:\n"
                          + self.log_tail())

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the daemon if (and only if) we started it: SIGTERM, then SIGKILL by PID."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        _terminate(pid, timeout)
        self._proc = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.paths.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no dockerd log)"

    def docker(self, *args: str, check: bool = True, capture: bool = True,
               input: bytes | None = None, timeout: float | None = None,
               ) -> subprocess.CompletedProcess[bytes]:
        """Run the docker CLI against this daemon."""
        cmd = [docker_cli(), "-H", self.host, *args]
        proc = subprocess.run(cmd, input=input, timeout=timeout,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.PIPE if capture else None)
        if check and proc.returncode != 0:
            err = (proc.stderr or b"").decode(errors="replace").strip()
            raise DockerError(f"{' '.join(cmd[3:5])} failed ({proc.returncode}): {err}")
        return proc

    def image_exists(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False).returncode == 0

    def __enter__(self) -> Dockerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate(pid: int, timeout: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    # dockerd needs a few seconds to stop containerd and unmount; kill only if it hangs.
    if not _wait_exit(pid, timeout):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        _wait_exit(pid, 5.0)


def clear_stale(paths: DaemonPaths = DaemonPaths()) -> int | None:
    """Stop a private daemon a dead run left behind (from its pidfile); returns its PID.
    Only a dockerd whose command line names our socket is signalled."""
    try:
        pid = int(paths.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    if not _pid_is_our_dockerd(pid, paths.socket):
        return None
    if ping(f"unix://{paths.socket}"):
        # Still alive and answering: maybe another live run of ours uses it. Leave it.
        return None
    _terminate(pid, 20.0)
    return pid


# --- iptables: keep Linux-bridge switches forwarding next to a dockerd -----------------------

def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["iptables", "-w", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise DockerError(f"iptables {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def forward_chain() -> str:
    """DOCKER-USER when a dockerd with iptables made it (it is evaluated before Docker's own
    rules and Docker never flushes it); plain FORWARD otherwise."""
    return "DOCKER-USER" if _iptables("-S", "DOCKER-USER", check=False).returncode == 0 \
        else "FORWARD"


@dataclass(frozen=True)
class ForwardRule:
    """An ACCEPT rule for traffic bridged within one bridge; `remove()` deletes exactly it."""

    chain: str
    bridge: str
    tag: str

    def spec(self) -> list[str]:
        return ["-i", self.bridge, "-o", self.bridge,
                "-m", "comment", "--comment", f"{RULE_TAG}:{self.tag}", "-j", "ACCEPT"]

    def present(self) -> bool:
        return _iptables("-C", self.chain, *self.spec(), check=False).returncode == 0

    def remove(self) -> None:
        while self.present():
            _iptables("-D", self.chain, *self.spec())


def forward_policy() -> str:
    """The FORWARD chain's policy ('ACCEPT' or 'DROP')."""
    for line in _iptables("-S", "FORWARD").stdout.splitlines():
        if line.startswith("-P FORWARD "):
            return line.split()[2]
    return "ACCEPT"


def allow_bridge_forwarding(bridge: str, tag: str = "run") -> ForwardRule:
    """Let frames bridged inside `bridge` pass a FORWARD chain whose policy dockerd set to
    DROP (br_netfilter hands bridged frames to iptables, so the policy hits our switches).
    Idempotent; the tag (e.g. the run prefix) lets `remove_forward_rules` clear a dead run."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", tag):
        raise ValueError(f"rule tag {tag!r}: letters, digits, '_', '.', '-' only")
    rule = ForwardRule(forward_chain(), bridge, tag)
    if not rule.present():
        _iptables("-I", rule.chain, *rule.spec())
    return rule


def remove_forward_rules(tag: str | None = None,
                         chains: Sequence[str] = ("DOCKER-USER", "FORWARD")) -> int:
    """Delete every rule we tagged (all of ours, or only `tag`'s); returns how many."""
    removed = 0
    for chain in chains:
        listing = _iptables("-S", chain, check=False)
        if listing.returncode != 0:
            continue
        for line in listing.stdout.splitlines():
            # `-S` prints a rule as `-D` takes it; the quotes around the comment are for a
            # shell (and some iptables builds omit them), so drop them. Tags have no spaces.
            args = line.replace('"', "").split()
            if args[:2] != ["-A", chain] or "--comment" not in args:
                continue
            comment = args[args.index("--comment") + 1]
            if comment == f"{RULE_TAG}:{tag}" or (tag is None
                                                  and comment.startswith(f"{RULE_TAG}:")):
                if _iptables("-D", chain, *args[2:], check=False).returncode == 0:
                    removed += 1
    return removed


def stop_private(paths: DaemonPaths = DaemonPaths(), timeout: float = 20.0) -> int | None:
    """Stop our private daemon whoever started it (e.g. a run killed with -9 left it), by the
    PID in its pidfile, verified to be a dockerd on our socket. Returns the PID or None."""
    try:
        pid = int(paths.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    if not _pid_is_our_dockerd(pid, paths.socket):
        return None
    _terminate(pid, timeout)
    return pid


def start_for_runs(daemon: Dockerd) -> Dockerd:
    """Make sure `daemon` answers, for an emulated network's Docker hosts. When it is the
    private daemon and we start it, the marker records its PID so that the last run's
    teardown stops it (`release_for_runs`), even if that run is not the one that started it."""
    if daemon.running():
        return daemon
    daemon.start()
    if daemon.pid is not None:
        daemon.paths.runs_marker.write_text(f"{daemon.pid}\n")
    return daemon


def release_for_runs(host: str, paths: DaemonPaths = DaemonPaths()) -> int | None:
    """A run that used Docker hosts is over: stop the private daemon if it was started for
    runs and no run's container is left on it (another run may still be using it). Returns
    the PID stopped, or None."""
    if host != f"unix://{paths.socket}":
        return None                      # a daemon we only use (EDGEPIPE_DOCKER_HOST)
    try:
        pid = int(paths.runs_marker.read_text().strip())
    except (OSError, ValueError):
        return None
    if not _pid_is_our_dockerd(pid, paths.socket):
        paths.runs_marker.unlink(missing_ok=True)    # that daemon is gone
        return None
    daemon = Dockerd(paths=paths, host=host)
    if daemon.running():
        listing = daemon.docker("ps", "-aq", "--filter", f"label={RUN_LABEL}", check=False)
        if listing.returncode != 0 or listing.stdout.strip():
            return None
    paths.runs_marker.unlink(missing_ok=True)
    _terminate(pid, 20.0)
    return pid


def run_containers(host: str, run_id: str) -> list[str]:
    """Names of the containers (running or not) labelled with this run id; [] when no
    daemon answers on `host` (or it is not a unix socket, which `ping` cannot ask)."""
    if not host.startswith("unix://") or not ping(host):
        return []
    listing = Dockerd(host=host).docker("ps", "-a", "--format", "{{.Names}}", "--filter",
                                        f"label={RUN_LABEL}={run_id}", check=False)
    return listing.stdout.decode().split() if listing.returncode == 0 else []


def main(argv: list[str] | None = None) -> int:
    """`python -m testbed.emulation.dockerd status|start|stop` for the private daemon (root)."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m testbed.emulation.dockerd")
    parser.add_argument("action", choices=("status", "start", "stop"))
    args = parser.parse_args(argv)
    daemon = Dockerd()
    if args.action == "status":
        state = "running" if daemon.running() else "not running"
        print(f"{daemon.host}: {state}")
        return 0 if daemon.running() else 1
    if args.action == "start":
        daemon.start()
        print(f"{daemon.host}: running (pid {daemon.pid or 'not ours'}); stop it with "
              "`python -m testbed.emulation.dockerd stop`")
        return 0
    pid = stop_private()
    print(f"stopped dockerd {pid}" if pid else "no private dockerd of ours is running")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# The digest of the agent/worker code an image was built from (testbed.emulation.images).
APP_LABEL = "edgepipe.app-sha256"


def image_label(daemon: Dockerd, tag: str, label: str) -> str | None:
    """A label of an image ('' when it has no such label), None when there is no image."""
    proc = daemon.docker("image", "inspect", "-f",
                         "{{ index .Config.Labels \"" + label + "\" }}", tag, check=False)
    return proc.stdout.decode().strip() if proc.returncode == 0 else None
