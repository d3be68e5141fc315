"""CurveZMQ for real networks: per-deployment keys, server/client socket options, and an
allow-list of client keys enforced through ZAP.

Division of labour: this module only knows keys and socket options. Which socket is a server
(the side that binds: a worker's PULL, the controller's ROUTER, the sink's PULL) and which is a
client (PUSH to the next stage, an agent's DEALER) is decided by the worker and agent that call
it; generating the keys for a deployment and handing them out (files, a Kubernetes Secret) is
the controller's.

Model: every endpoint of a deployment (each stage, the dispatcher, the controller) gets its own
keypair, generated fresh for that deployment with `zmq.curve_keypair()`, so keys never outlive
an epoch. A server knows its own secret key and the public keys of the clients allowed to talk
to it; a client knows its own keypair and the server's public key. Without the allow-list
(ZAP) CURVE still encrypts, but any client that knows the server's public key gets in.
Keys are Z85 text (40 characters), the form ZeroMQ's options take.

Allow-lists that change while a socket serves (a worker's upstream changes with each re-plan,
the sink's senders with each epoch) are `Gate`s: one per ZAP domain of a context, started with
`start_gates`, updated with `Gate.set` from the socket's own thread (the ZAP thread only reads
the frozenset, replaced whole). Authenticated messages carry the sender's public key as their
ZAP User-Id (`user_id`), which is what decides who sent them, not any name inside.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

KEY_LENGTH = 40  # Z85 text of a 32-byte Curve25519 key


class CurveKeyError(ValueError):
    """A key is malformed (not 40 characters of Z85) or a key file is unreadable."""


def _check_key(key: bytes | str, what: str) -> bytes:
    raw = key.encode("ascii") if isinstance(key, str) else bytes(key)
    if len(raw) != KEY_LENGTH:
        raise CurveKeyError(f"{what}: a CURVE key is {KEY_LENGTH} Z85 characters, got {len(raw)}")
    try:
        z85.decode(raw)
    except (ValueError, KeyError) as exc:
        raise CurveKeyError(f"{what}: not Z85 text") from exc
    return raw


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def from_secret(cls, secret: bytes | str) -> KeyPair:
        """Rebuild a keypair from its secret key (the only part that must be stored)."""
        raw = _check_key(secret, "secret key")
        return cls(zmq.curve_public(raw), raw)

    def to_json(self) -> dict[str, str]:
        return {"public": self.public.decode(), "secret": self.secret.decode()}


def generate_deployment_keys(endpoints: Iterable[str]) -> dict[str, KeyPair]:
    """A fresh keypair for every endpoint name of one deployment (epoch)."""
    names = list(endpoints)
    if len(set(names)) != len(names):
        raise ValueError(f"endpoint names must be unique: {names}")
    return {name: KeyPair.generate() for name in names}


def save_keypair(path: str | Path, pair: KeyPair) -> None:
    """Write a keypair as JSON, readable by the owner only (it holds a secret key)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(pair.to_json(), out)
    os.chmod(path, 0o600)   # O_CREAT's mode does not apply to an existing file


def load_keypair(path: str | Path) -> KeyPair:
    try:
        data = json.loads(Path(path).read_text())
        pair = KeyPair.from_secret(data["secret"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CurveKeyError(f"{path}: cannot load a CURVE keypair: {exc}") from exc
    if "public" in data and data["public"].encode() != pair.public:
        raise CurveKeyError(f"{path}: the public key does not belong to the secret key")
    return pair


def apply_server(sock: zmq.Socket, own: KeyPair) -> None:
    """Make `sock` a CURVE server (set before bind). Clients must know `own.public`."""
    sock.curve_secretkey = own.secret
    sock.curve_publickey = own.public
    sock.curve_server = True


def apply_client(sock: zmq.Socket, own: KeyPair, server_public: bytes | str) -> None:
    """Make `sock` a CURVE client of the server with `server_public` (set before connect)."""
    sock.curve_serverkey = _check_key(server_public, "server public key")
    sock.curve_secretkey = own.secret
    sock.curve_publickey = own.public


class _AllowList:
    """ZAP credentials provider: accept exactly the listed client public keys."""

    def __init__(self, keys: Iterable[bytes | str]) -> None:
        self.keys = {_check_key(k, "client public key") for k in keys}

    def callback(self, domain: str, key: bytes) -> bool:
        return bytes(key) in self.keys


class Gate:
    """A ZAP credentials provider whose allow-list can be replaced at any time."""

    def __init__(self, keys: Iterable[bytes | str] = ()) -> None:
        self.keys: frozenset[bytes] = frozenset()
        self.set(keys)

    def set(self, keys: Iterable[bytes | str]) -> None:
        self.keys = frozenset(_check_key(k, "client public key") for k in keys)

    def callback(self, domain: str, key: bytes) -> bool:
        return bytes(key) in self.keys


def start_gates(context: zmq.Context, gates: dict[str, Gate]) -> ThreadAuthenticator:
    """A ZAP handler on `context` with one Gate per ZAP domain (set `sock.zap_domain` to the
    domain's name on each CURVE server socket before bind). Stop it with `.stop()`."""
    auth = ThreadAuthenticator(context)
    auth.start()
    for domain, gate in gates.items():
        auth.configure_curve_callback(domain, gate)
    return auth


def user_id(frame: zmq.Frame) -> str | None:
    """The Z85 public key CURVE authenticated for the sender of `frame` (ZAP's User-Id; None
    without ZAP)."""
    try:
        return frame.get("User-Id") or None
    except zmq.ZMQError:
        return None


def start_authenticator(context: zmq.Context, allowed_clients: Iterable[bytes | str],
                        ) -> ThreadAuthenticator:
    """Start a ZAP handler on `context` that admits only `allowed_clients` to any CURVE server
    socket of that context. One per process (ZAP is per context); stop it with `.stop()`."""
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve_callback("*", _AllowList(allowed_clients))
    return auth
