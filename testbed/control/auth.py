"""Who may talk to the controller and to the sink, decided by CurveZMQ keys (issue 15).

Division of labour: this module is pure: it maps authenticated public keys (the ZAP User-Id of
a message, Z85 text) to host names and holds the allow-lists; the controller's ZeroMQ shell
asks it at two call sites: when an agent's message arrives (`host_for`) and whenever the set of
live epochs changes (`sink_senders`, fed to the sink's Gate). Socket options and the ZAP
thread are stage_image.security's.

Rules:
- an agent is known by its key: the driver generates one keypair per host for the run and
  gives the controller the public halves (`agents`: host -> public key). A message counts as
  from host H only if CURVE authenticated H's key, and a `host` field in it must say H too, or
  it is dropped (a process holding edge5's key cannot speak for edge4, and one holding no key
  does not get through the handshake at all). The DEALER identity frame names nobody: keyed
  agents leave it to the ROUTER (a random one per connection) and the controller answers a
  host on the connection its key last spoke from (`Peers`), so no connection can take over
  another host's name (with names as identities, ROUTER_HANDOVER let any admitted key hand
  itself another host's connection);
- the sink accepts results only from the last stage's workers of live epochs (active,
  deploying, draining): their public keys are the sink's allow-list;
- a worker accepts frames only from its upstream (`senders`: the stage before it, or the
  dispatcher). The k3s backend applies the same rule through `senders`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from partitioner.instance import Plan
from testbed.control.core.reconcile import LIVE_STATES
from testbed.control.core.records import Epoch


@dataclass
class AgentKeys:
    """host -> Z85 public key of its agent, and the reverse."""

    agents: Mapping[str, str]
    by_key: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.by_key = {key: host for host, key in self.agents.items()}
        if len(self.by_key) != len(self.agents):
            raise ValueError("two hosts share an agent key")

    def publics(self) -> list[str]:
        return list(self.agents.values())

    def host_for(self, authenticated: str | None,
                 claimed: str | None) -> tuple[str | None, str]:
        """(host, "") when the message is from a known agent (and its `host` field, if it has
        one, names the host its key belongs to); (None, why) if not."""
        host = self.by_key.get(authenticated or "")
        if host is None:
            return None, "no agent key authenticated this message"
        if claimed is not None and claimed != host:
            return None, f"the key of {host} claims to be {str(claimed)[:64]!r}"
        return host, ""


@dataclass
class Peers:
    """host -> the ROUTER identity of the connection its key last spoke from: where the
    controller sends to that host (a restarted or reconnected agent moves it)."""

    identities: dict[str, bytes] = field(default_factory=dict)

    def heard(self, host: str, identity: bytes) -> None:
        self.identities[host] = identity

    def identity(self, host: str) -> bytes | None:
        return self.identities.get(host)


def senders(plan: Plan, stage: int | None) -> list[int | None]:
    """Who sends to `stage` of `plan` (None: to the sink): the stages before it, one per
    pipeline feeding it (for the sink, every pipeline's last stage), then None, the
    dispatcher, where `stage` heads a pipeline. The one rule behind every data-plane
    allow-list: the embedded controller's (below, with its slots' keys) and the k3s
    backend's (testbed.k8s.manifests and loop, with each epoch's endpoint keys)."""
    before: list[int | None] = [i for i in range(len(plan.stages))
                                if plan.next_stage(i) == stage]
    return before + [None] if stage is not None and stage in plan.heads else before


def sink_senders(epochs: Iterable[Epoch]) -> list[str]:
    """The sink's allow-list: the public keys of the last stages of every live epoch (slots
    without keys, plaintext, add none)."""
    return sorted({key for epoch in epochs if epoch.state in LIVE_STATES
                   for key in _slot_keys(epoch, senders(epoch.plan, None), None)})


def upstream_keys(epoch: Epoch, stage: int, dispatcher_public: str | None) -> list[str]:
    """Public keys of whoever sends to `stage` in `epoch`: the stages before it (one per
    pipeline feeding it), or the dispatcher for a pipeline's first stage."""
    return _slot_keys(epoch, senders(epoch.plan, stage), dispatcher_public)


def _slot_keys(epoch: Epoch, indices: list[int | None], dispatcher_public: str | None,
               ) -> list[str]:
    keys = [epoch.slots[i].keys for i in indices if i is not None]
    out = [pair.public.decode() for pair in keys if pair is not None]
    if None in indices and dispatcher_public is not None:
        out.append(dispatcher_public)
    return out
