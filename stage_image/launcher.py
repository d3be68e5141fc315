"""Forks workers from a process that has already imported what they need.

    python -m stage_image.launcher FD AGENT_PID      (started by the agent, never by hand)

A worker started as `python -m stage_image.worker` spends ~0.3 s of full-core CPU importing
numpy, onnxruntime and zmq before it loads its model: 1.5-3 s on a 0.1-0.2-core host, and
~15 s for a warm standby held to a tenth of such a host (docs/architecture.md "Recovery").
The launcher pays that once, when the agent starts (before the host serves anything), and
forks each worker from there, so a start costs a fork and the worker's own session.

Division of labour: the agent decides which workers run and tracks them; `Launcher` is its
end of the conversation and hands it a `LaunchedWorker` per worker (the part of
`subprocess.Popen` the agent uses, so its bookkeeping is the same for both); the launcher
process only forks on request and reports exits; `stage_image.worker` does the work.

The two talk over a Unix SEQPACKET socket pair the agent creates (local, never the network);
every message is one JSON object, checked on arrival:
- launcher -> agent: {"ready": true} once the imports are done;
- agent -> launcher: {"config": PATH, "cwd": DIR} with the worker's stdin, stdout and stderr
  passed as file descriptors (SCM_RIGHTS);
- launcher -> agent: {"pid": N} for each request, in order ({"error": TEXT} when it could not
  fork), and {"exited": N, "code": C} when a worker ends (C < 0: killed by signal -C).
The launcher dies with the agent (PR_SET_PDEATHSIG), and each worker with the launcher.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any

MESSAGE_BYTES = 4096
REPLY_TIMEOUT_S = 2.0     # a fork answers in milliseconds, even at a tenth of a core
PR_SET_NAME = 15


def _message(data: bytes) -> dict[str, Any]:
    """One protocol message, or ValueError."""
    message = json.loads(data.decode("utf-8"))
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    return message


# -- the agent's end --------------------------------------------------------------------------
class LaunchedWorker:
    """A worker the launcher forked, seen by the agent as it sees a `subprocess.Popen`: pid,
    stdin, stdout, poll, wait, send_signal, kill. Signals go through a pidfd, so a recycled
    PID is never hit."""

    def __init__(self, launcher: Launcher, pid: int, stdin: IO[bytes], stdout: IO[bytes]):
        self.launcher, self.pid = launcher, pid
        self.stdin: IO[bytes] | None = stdin
        self.stdout: IO[bytes] | None = stdout
        self.returncode: int | None = None
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:       # it ended (and was reaped) already: nothing to signal
            self.pidfd = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.launcher.collect()
            code = self.launcher.exits.pop(self.pid, None)
            if code is None and not self.launcher.alive():
                code = -signal.SIGKILL        # the launcher died: PR_SET_PDEATHSIG took it
            if code is not None:
                self.returncode = code
                self.close_pidfd()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            self.launcher.collect(0.02)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.pidfd is not None and self.returncode is None:
            try:
                signal.pidfd_send_signal(self.pidfd, signum)
            except ProcessLookupError:
                pass                      # it exited; the launcher's report says how

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class Launcher:
    """Starts the launcher process and asks it for workers. Until it has said it is ready (its
    imports take a second or more on a small host), or after it died, `spawn` is not
    possible and the agent starts workers as processes of their own."""

    def __init__(self, python: str, env: dict[str, str], stderr_path: Path) -> None:
        self.python, self.env, self.stderr_path = python, env, stderr_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.ready = False
        self.exits: dict[int, int] = {}

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with open(self.stderr_path, "ab") as stderr:
            self.proc = subprocess.Popen(
                [self.python, "-m", "stage_image.launcher", str(theirs.fileno()),
                 str(os.getpid())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=stderr, env=self.env)
        theirs.close()
        self.sock, self.ready = ours, False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.sock is not None

    def usable(self) -> bool:
        """Can a worker be forked now (started, imports done, not dead)?"""
        self.collect()
        return self.ready and self.alive()

    def collect(self, timeout: float = 0.0) -> dict[str, Any] | None:
        """Take the launcher's messages waiting (up to `timeout` for the first): `ready` and
        exits are kept; a pid reply is returned (the caller of `spawn` is waiting for it)."""
        while self.sock is not None:
            if not select.select([self.sock], [], [], timeout)[0]:
                return None
            timeout = 0.0
            try:
                message = _message(self.sock.recv(MESSAGE_BYTES))
            except (OSError, ValueError):       # EOF (b"" is not JSON) or garbage: dead
                self.stop()
                return None
            if message.get("ready") is True:
                self.ready = True
            elif isinstance(message.get("exited"), int) and isinstance(message.get("code"),
                                                                       int):
                self.exits[message["exited"]] = message["code"]
            elif "pid" in message or "error" in message:
                return message
        return None

    def spawn(self, config: Path, cwd: Path, stderr: IO[bytes]) -> LaunchedWorker:
        """Fork a worker running `stage_image.worker CONFIG`; OSError if the launcher does not
        answer (it is then stopped, and the caller starts the worker itself)."""
        assert self.sock is not None
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        try:
            request = json.dumps({"config": str(config), "cwd": str(cwd)}).encode()
            socket.send_fds(self.sock, [request], [stdin_r, stdout_w, stderr.fileno()])
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            reply = None
            while reply is None and self.sock is not None and time.monotonic() < deadline:
                reply = self.collect(deadline - time.monotonic())
        except OSError:
            reply = None
        finally:
            os.close(stdin_r)
            os.close(stdout_w)
        if reply is None or not isinstance(reply.get("pid"), int):
            os.close(stdin_w)
            os.close(stdout_r)
            self.stop()
            raise OSError(f"the worker launcher did not fork: "
                          f"{reply.get('error') if reply else 'no answer'}")
        return LaunchedWorker(self, reply["pid"], os.fdopen(stdin_w, "wb", 0),
                              os.fdopen(stdout_r, "rb", 0))

    def stop(self) -> None:
        """Close our end: the launcher exits when it reads EOF (its workers die with it), and
        is killed if it does not."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.ready = False
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the launcher process ---------------------------------------------------------------------
def _fork_worker(request: dict[str, Any], fds: list[int], closing: list[int]) -> int:
    """Fork a worker for one request; returns its pid (the child never returns)."""
    config, cwd = request.get("config"), request.get("cwd")
    if not isinstance(config, str) or not isinstance(cwd, str) or len(fds) != 3:
        raise ValueError("a request is {config, cwd} with stdin, stdout and stderr")
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in closing:
            os.close(fd)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(cwd)
        sys.argv = ["stage_image.worker", config]
        # its argv is the launcher's: its name says which worker it is (`ps -o comm`, 15
        # bytes: `worker_PORT_` and the model's hash begun, from the config's file name)
        ctypes.CDLL(None).prctl(PR_SET_NAME, Path(config).stem.encode()[:15])
        from stage_image import worker
        code = worker.main([config])
    except BaseException:          # noqa: BLE001 - whatever it was, it goes to the log
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(sock: socket.socket) -> int:
    """Answer the agent's requests until it closes its end."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)       # a handler, so the wake-up fd fires
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    sock.send(json.dumps({"ready": True}).encode())
    while True:
        readable = select.select([sock, wake_r], [], [])[0]
        if wake_r in readable:
            os.read(wake_r, 512)
        while True:                                    # reap and report every ended worker
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            sock.send(json.dumps({"exited": pid,
                                  "code": os.waitstatus_to_exitcode(status)}).encode())
        if sock not in readable:
            continue
        data, fds, _flags, _addr = socket.recv_fds(sock, MESSAGE_BYTES, 3)
        if not data:
            return 0                                   # the agent closed its end
        try:
            reply: dict[str, Any] = {"pid": _fork_worker(_message(data), fds,
                                                         [sock.fileno(), wake_r, wake_w])}
        except (OSError, ValueError) as exc:
            reply = {"error": str(exc)}
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(json.dumps(reply).encode())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m stage_image.launcher FD AGENT_PID (the agent starts it)",
              file=sys.stderr)
        return 2
    from stage_image.worker import die_with_parent
    die_with_parent(int(argv[1]))
    sock = socket.socket(fileno=int(argv[0]))
    # what every worker imports, paid once here (the fork shares it)
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401
    import zmq  # noqa: F401

    import stage_image.worker  # noqa: F401
    return serve(sock)


if __name__ == "__main__":
    sys.exit(main())
