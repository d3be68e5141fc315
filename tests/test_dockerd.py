"""The project's dockerd wrapper: its daemon leaves iptables alone, a PID is only signalled
when it is our dockerd, and the bridge ACCEPT rules are added and removed exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

from testbed.emulation import dockerd
from testbed.emulation.dockerd import DaemonPaths, Dockerd


def test_private_daemon_leaves_the_packet_path_alone(tmp_path) -> None:
    if shutil.which("dockerd") is None:
        pytest.skip("dockerd not installed")
    argv = Dockerd(paths=DaemonPaths(socket=tmp_path / "d.sock"), host="").argv()
    for flag in ("--iptables=false", "--ip-forward=false", "--bridge=none"):
        assert flag in argv
    assert f"unix://{tmp_path / 'd.sock'}" in argv
    with_iptables = Dockerd(paths=DaemonPaths(socket=tmp_path / "d.sock"), iptables=True)
    assert "--iptables=false" not in with_iptables.argv()


def test_ping_on_a_socket_nobody_serves(tmp_path) -> None:
    assert dockerd.ping(f"unix://{tmp_path / 'none.sock'}") is False
    with pytest.raises(ValueError):
        dockerd.ping("tcp://127.0.0.1:2375")


def test_stop_never_signals_a_daemon_it_did_not_start(tmp_path) -> None:
    d = Dockerd(paths=DaemonPaths(socket=tmp_path / "d.sock"))
    d.stop()            # nothing started: a no-op, no signal anywhere
    assert not d.owned


def test_stale_pidfile_of_another_process_is_ignored(tmp_path) -> None:
    # The pidfile names a live process that is not our dockerd (this test): left alone.
    paths = DaemonPaths(socket=tmp_path / "d.sock", pidfile=tmp_path / "dockerd.pid")
    paths.pidfile.write_text(str(os.getpid()))
    assert dockerd.clear_stale(paths) is None
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        paths.pidfile.write_text(str(sleeper.pid))
        assert dockerd.clear_stale(paths) is None
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.root
def test_forward_rules_are_added_and_removed() -> None:
    if shutil.which("iptables") is None:
        pytest.skip("iptables not installed")
    tag = f"t{uuid.uuid4().hex[:8]}"
    bridge = f"epbr{uuid.uuid4().hex[:6]}"   # no such interface is needed for the rule
    rule = dockerd.allow_bridge_forwarding(bridge, tag=tag)
    try:
        assert rule.present()
        again = dockerd.allow_bridge_forwarding(bridge, tag=tag)   # idempotent
        listing = subprocess.run(["iptables", "-S", rule.chain], capture_output=True,
                                 text=True).stdout
        assert listing.count(f"edgepipe:{tag}") == 1
        assert again == rule
        other = dockerd.allow_bridge_forwarding(bridge + "x", tag=tag)
        assert dockerd.remove_forward_rules(tag) == 2
        assert not rule.present() and not other.present()
    finally:
        rule.remove()
    with pytest.raises(ValueError):
        dockerd.allow_bridge_forwarding(bridge, tag="bad tag")
