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

Data plane: encrypted, or authenticated only (`DATA_AUTH`). CURVE encrypts every byte, which
on a 600 KB frame costs more CPU than everything else a stage does outside onnxruntime
(benchmarks/frame_overhead.py --curve). The threat is forged peers (a process in another host
connecting and sending frames), not eavesdroppers inside root's machine (every emulated host
is a root process that could read the key files anyway), so the embedded backend's data hops
use `token`: ZeroMQ's PLAIN mechanism, the client's public key as user name and a password
only the two ends can compute (`data_token`: X25519 of one's secret key and the other's
public key, the same agreement CURVE itself makes, hashed). The server's ZAP Gate admits a
connection only if the user is on its allow-list and the password is that pair's token;
afterwards the connection carries plaintext frames, and ZAP's User-Id is still the sender's
public key. A process without an admitted secret key cannot compute any token, so it is
refused at the handshake exactly as CURVE refuses it. What `token` gives up: a passive
eavesdropper on a data link reads the frames and that one pair's token (and could then
connect as that sender to that receiver). The control plane stays CURVE.

Allow-lists that change while a socket serves (a worker's upstream changes with each re-plan,
the sink's senders with each epoch) are `Gate`s: one per ZAP domain of a context, started with
`start_gates`, updated with `Gate.set` from the socket's own thread (the ZAP thread only reads
the frozenset, replaced whole). Authenticated messages carry the sender's public key as their
ZAP User-Id (`user_id`), which is what decides who sent them, not any name inside.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import hmac
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

KEY_LENGTH = 40  # Z85 text of a 32-byte Curve25519 key
# How a data hop (worker PULL, the next PUSH, the sink) is secured when keys are on.
DATA_AUTH = ("curve", "token")
_TOKEN_CONTEXT = b"edgepipe data-plane token v1"


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


@functools.cache
def _sodium() -> ctypes.CDLL:
    """The libsodium that libzmq's CURVE uses, already mapped into this process (pyzmq's
    wheel ships it beside libzmq): its X25519 is constant-time and vetted, unlike anything
    we could write here."""
    with open("/proc/self/maps") as maps:
        paths = sorted({line.split()[-1] for line in maps if "libsodium" in line})
    if not paths:
        raise CurveKeyError("data tokens need the libsodium libzmq uses; none is loaded "
                            "(a libzmq built without libsodium)")
    lib = ctypes.CDLL(paths[0])
    lib.crypto_scalarmult.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
    return lib


def data_token(own: KeyPair, peer_public: bytes | str) -> str:
    """The PLAIN password of the data hop between `own` and the holder of `peer_public`:
    both ends compute the same one (Diffie-Hellman), nobody else can."""
    shared = ctypes.create_string_buffer(32)
    peer = z85.decode(_check_key(peer_public, "peer public key"))
    if _sodium().crypto_scalarmult(shared, z85.decode(own.secret), peer) != 0:
        raise CurveKeyError("peer public key is a low-order point")
    return hashlib.blake2b(_TOKEN_CONTEXT, key=shared.raw, digest_size=32).hexdigest()


def apply_data_server(sock: zmq.Socket, own: KeyPair, mode: str) -> None:
    """Secure a data hop's receiving socket (set before bind): CURVE, or PLAIN checked by a
    Gate holding `own` (`token`: without that Gate on the socket's ZAP domain, PLAIN would
    admit anyone)."""
    if mode == "curve":
        apply_server(sock, own)
    elif mode == "token":
        sock.plain_server = True
    else:
        raise ValueError(f"data_auth must be one of {DATA_AUTH}, got {mode!r}")


def apply_data_client(sock: zmq.Socket, own: KeyPair, server_public: bytes | str,
                      mode: str) -> None:
    """Secure a data hop's sending socket for the server with `server_public` (set before
    each connect)."""
    if mode == "curve":
        apply_client(sock, own, server_public)
    elif mode == "token":
        sock.plain_username = own.public
        sock.plain_password = data_token(own, server_public).encode()
    else:
        raise ValueError(f"data_auth must be one of {DATA_AUTH}, got {mode!r}")


class _AllowList:
    """ZAP credentials provider: accept exactly the listed client public keys."""

    def __init__(self, keys: Iterable[bytes | str]) -> None:
        self.keys = {_check_key(k, "client public key") for k in keys}

    def callback(self, domain: str, key: bytes) -> bool:
        return bytes(key) in self.keys


class Gate:
    """A ZAP credentials provider whose allow-list can be replaced at any time. CURVE clients
    get in by their key; with `own` (the server's keypair) PLAIN clients get in too, by
    their key as user name and the pair's `data_token` as password."""

    def __init__(self, keys: Iterable[bytes | str] = (), own: KeyPair | None = None) -> None:
        self.own = own
        self.keys: frozenset[bytes] = frozenset()
        self.tokens: dict[str, str] = {}
        self.set(keys)

    def set(self, keys: Iterable[bytes | str]) -> None:
        admitted = frozenset(_check_key(k, "client public key") for k in keys)
        # tokens computed here, in the socket owner's thread: the ZAP thread only looks up
        tokens = ({k.decode(): self.tokens.get(k.decode()) or data_token(self.own, k)
                   for k in admitted} if self.own is not None else {})
        self.keys, self.tokens = admitted, tokens

    def callback(self, domain: str, key: bytes) -> bool:
        return bytes(key) in self.keys

    def admits_plain(self, username: str, password: str) -> bool:
        expected = self.tokens.get(username)
        return expected is not None and hmac.compare_digest(expected.encode(),
                                                            password.encode())


class _GateAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler, with PLAIN decided by the domain's Gate (pyzmq's own PLAIN check
    takes a fixed password table and compares with ==)."""

    def __init__(self, context: zmq.Context, gates: dict[str, Gate]) -> None:
        super().__init__(context)
        self.gates = gates

    def _authenticate_plain(self, domain: str, username: str,
                            password: str) -> tuple[bool, bytes]:
        gate = self.gates.get(domain)
        if gate is not None and gate.admits_plain(username, password):
            return True, b""
        return False, b"not admitted"


def start_gates(context: zmq.Context, gates: dict[str, Gate]) -> ThreadAuthenticator:
    """A ZAP handler on `context` with one Gate per ZAP domain (set `sock.zap_domain` to the
    domain's name on each CURVE or PLAIN server socket before bind). Stop it with
    `.stop()`."""
    auth = _GateAuthenticator(context, gates)
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
