"""Hostile peers against a running pipeline (issue 15), on loopback without root: the
controller, agents and workers of tests.test_recovery's Cluster with the embedded backend's
default security (per-run CurveZMQ keys, one per agent, ZAP allow-lists). An attacker that
knows every public key (they are public) but holds no admitted secret key connects to every
port: the control port (as edge2, with a hello and a forged `worker failed`), the sink (forged
results for every request id) and each worker (frames); one holding a real agent's key tries
to speak for another host. Nothing may change: no re-plan, no restarted agent, every request
answered once and correctly, no duplicate. The admission rules themselves
(testbed.control.auth) are unit-tested first."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import zmq

from stage_image.agent import curve_args
from stage_image.security import KeyPair, apply_data_client, save_keypair
from stage_image.wire import encode_control, encode_tensors
from testbed.control.auth import AgentKeys, sink_senders, upstream_keys
from tests import test_recovery
from tests.test_recovery import DISPATCHER_IP, NODE_IPS, Cluster, finish

# Our block of ports (24000-24999): the cluster takes 40 from here.
PORT_BASE = 24000


# -- the rules ---------------------------------------------------------------------------------

def test_a_key_speaks_for_its_own_host_only():
    a, b = KeyPair.generate().public.decode(), KeyPair.generate().public.decode()
    keys = AgentKeys({"edge1": a, "edge2": b})
    assert keys.host_for(a, "edge1") == ("edge1", "")
    assert keys.host_for(a, None) == ("edge1", "")
    assert keys.host_for(None, "edge1")[0] is None                    # no key at all
    assert keys.host_for(KeyPair.generate().public.decode(), "edge1")[0] is None
    host, why = keys.host_for(a, "edge2")                             # edge1's key as edge2
    assert host is None and "edge1" in why and "edge2" in why
    with pytest.raises(ValueError):
        AgentKeys({"edge1": a, "edge2": a})


def _epoch(state: str, keys: list[KeyPair | None], chains: list[int]) -> SimpleNamespace:
    """An epoch as the auth rules read it: its slots' keys and its plan's stage order
    (`chains`: the stage count of each pipeline, stages listed pipeline after pipeline)."""
    heads, nxt = [], {}
    start = 0
    for count in chains:
        heads.append(start)
        for i in range(start, start + count):
            nxt[i] = i + 1 if i + 1 < start + count else None
        start += count
    plan = SimpleNamespace(heads=heads, next_stage=nxt.get, stages=list(range(start)))
    return SimpleNamespace(state=state, plan=plan,
                           slots=[SimpleNamespace(keys=k) for k in keys])


def test_sink_admits_the_last_stages_of_live_epochs_only():
    a, b, c, d = (KeyPair.generate() for _ in range(4))
    live = _epoch("active", [a, b], [2])
    two_pipelines = _epoch("draining", [a, c, d], [2, 1])
    gone = _epoch("retired", [c, d], [2])
    assert sink_senders([live]) == [b.public.decode()]
    assert sink_senders([two_pipelines]) == sorted([c.public.decode(), d.public.decode()])
    assert sink_senders([gone]) == []
    assert sink_senders([_epoch("active", [None, None], [2])]) == []     # plaintext


def test_workers_admit_their_upstream_only():
    a, b, c = (KeyPair.generate() for _ in range(3))
    epoch = _epoch("active", [a, b, c], [3])
    dispatcher = KeyPair.generate().public.decode()
    assert upstream_keys(epoch, 0, dispatcher) == [dispatcher]
    assert upstream_keys(epoch, 1, dispatcher) == [a.public.decode()]
    assert upstream_keys(epoch, 2, dispatcher) == [b.public.decode()]


# -- the attacks ---------------------------------------------------------------------------------

class KeyedCluster(Cluster):
    """Cluster with the embedded backend's keys: each agent its own keypair, the controller
    admitting only those (testbed.experiment.run.RunKeys does the same for a real run)."""

    def __init__(self, root: Path, hosts: dict[str, float], **config: Any) -> None:
        self.agent_keys = {h: KeyPair.generate() for h in hosts}
        for host, pair in self.agent_keys.items():
            save_keypair(root / f"{host}.key", pair)
        super().__init__(root, hosts, 0, curve=True,
                         agent_keys={h: p.public.decode() for h, p in self.agent_keys.items()},
                         **config)

    def start_agent(self, host: str) -> None:
        self.procs[host] = self._spawn(
            ["-m", "stage_image.agent", "--host", host, "--controller",
             f"tcp://{DISPATCHER_IP}:{self.port}", "--data-dir", str(self.root / host),
             "--ip", NODE_IPS[host], "--heartbeat-ms", "100",
             *curve_args(str(self.curve_public), self.root / f"{host}.key")],
            f"agent_{host}")


def _client(kind: int, address: str, own: KeyPair, server_public: str,
            identity: str | None = None, mode: str = "curve") -> zmq.Socket:
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity.encode())
    apply_data_client(sock, own, server_public, mode)
    sock.connect(address)
    return sock


def _send(sock: zmq.Socket, frames: list[Any]) -> bool:
    """Queue a message without waiting (whether it gets anywhere is what the test checks by
    its effects: a client queues before the server's ZAP handler has refused the handshake).
    False once nothing can be queued: the refused connection is gone, and a blocking send
    would wait for a peer that never comes (on a quiet machine, thousands of request ids
    times a send timeout)."""
    try:
        sock.send_multipart(frames, flags=zmq.NOBLOCK)
    except zmq.Again:
        return False
    return True


def _worker_keys(root: Path) -> tuple[dict[str, KeyPair], str | None]:
    """{bind address: keypair} of every worker the agents started, and the sink's public key
    (the route after a last stage)."""
    workers: dict[str, KeyPair] = {}
    sink_public = None
    for path in root.glob("edge*/logs/worker_*.json"):
        config = json.loads(path.read_text())
        workers[config["bind"]] = KeyPair.from_secret(config["curve_secret"])
        for route in config["routes"].values():
            if route["next"].endswith(f":{test_recovery.PORT_BASE + 1}"):
                sink_public = route["public"]
    return workers, sink_public


def test_hostile_peers_change_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(test_recovery, "PORT_BASE", PORT_BASE)
    # 2 s of silence before a host is suspected: on a loaded machine 3 missed 100 ms beats
    # re-plan by themselves, and the test is about what the attacker can make happen
    c = KeyedCluster(tmp_path, {"edge1": 1.0, "edge2": 1.0, "edge3": 1.0},
                     suspect_after_missed=20,
                     workload={"mode": "closed", "concurrency": 4, "duration_s": 5.0,
                               "timeout_s": 2.0, "drain_timeout_s": 8.0, "pool_size": 8})
    try:
        ready = c.ready()
        epoch = ready["epoch"]
        assert c("start_workload")["ok"]
        time.sleep(0.5)
        status = c("status")
        control = f"tcp://{DISPATCHER_IP}:{c.port}"
        sink = f"tcp://{DISPATCHER_IP}:{c.port + 1}"
        server = str(c.curve_public)
        stranger = KeyPair.generate()
        victim = ready["endpoints"][0]["host"]
        hello = encode_control("hello", host=victim, pid=1, ip=NODE_IPS[victim])
        failed = encode_control("worker", port=ready["endpoints"][0]["port"], epoch=epoch,
                                stage=0, state="failed", reason="exit", detail="forged")
        # 1. a wrong key, as the victim, on the control port
        sock = _client(zmq.DEALER, control, stranger, server, identity=victim)
        attackers = [sock]
        for _ in range(3):
            _send(sock, hello)
            _send(sock, failed)
        # 2. a real agent's key (another host's) with the victim's name in its hello and as
        # its identity frame
        other = next(h for h in c.agent_keys if h != victim)
        sock = _client(zmq.DEALER, control, c.agent_keys[other], server, identity=victim)
        attackers.append(sock)
        for _ in range(3):
            # (a `worker failed` without a host field would count as the key owner's own
            # report about its own worker: a host can always give up its own stage)
            _send(sock, hello)
        # The attacker learns every worker's and the sink's public key (here from the
        # workers' configs; on the wire they only travel encrypted): the handshakes below
        # fail on the allow-lists alone, not on a wrong server key.
        workers, sink_public = _worker_keys(tmp_path)
        assert len(workers) >= len(ready["endpoints"]) and sink_public
        # 3. forged results for every request id so far (and beyond), to the sink: from a
        # stranger, from an agent, and from a worker that is not a last stage
        rids = range(status["sent"] + 50)
        senders = [stranger, c.agent_keys[other]]
        senders += [pair for address, pair in workers.items()
                    if address == ready["endpoints"][0]["address"]
                    and len(ready["endpoints"]) > 1]
        # (data hops are authenticated by token: each forger tries its own token and CURVE)
        for key in senders:
            for mode in ("token", "curve"):
                push = _client(zmq.PUSH, sink, key, sink_public, mode=mode)
                for rid in rids:
                    if not _send(push, encode_tensors(rid, epoch, 1, 0.0,
                                                      {"y": np.zeros((1, 32), np.float32)})):
                        break
                attackers.append(push)
        # 4. frames to every worker from keys that are not its upstream
        for address, pair in workers.items():
            for key in (stranger, c.agent_keys[other]):
                for mode in ("token", "curve"):
                    push = _client(zmq.PUSH, address, key, pair.public.decode(), mode=mode)
                    for rid in rids:
                        if not _send(push, encode_tensors(rid, epoch, 1, 0.0,
                                                          {"x": np.ones((1, 32), np.float32)})):
                            break
                    attackers.append(push)
        time.sleep(1.0)         # the attackers keep trying to connect meanwhile
        for attacker in attackers:
            attacker.close(0)
        done = finish(c)
        # nothing forged was counted: a forged result would be a duplicate, a mismatch or
        # a bad or stale result; a frame a worker accepted would come out as one of those
        assert (done["duplicates"], done["bad_results"], done["stale_results"]) == (0, 0, 0)
        kinds = [e["type"] for e in c.events()]
        assert "agent.restarted" not in kinds
        reasons = [e["reason"] for e in c.events() if e["type"] == "replan.requested"]
        assert not reasons, reasons                         # no re-plan
        assert done["epoch"] == epoch
        assert not [e for e in c.events() if e["type"] == "plan.deployed"
                    and e["epoch"] != epoch]
        log = (tmp_path / "controller.log").read_text()
        assert f"the key of {other} claims to be '{victim}'" in log
    finally:
        c.close()
