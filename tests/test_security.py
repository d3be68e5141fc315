"""CurveZMQ helpers on loopback: only a client holding an allowed keypair and the server's
public key gets a message through; plain, wrong-key and unknown-key clients do not."""

from __future__ import annotations

import stat
from collections.abc import Iterator

import pytest
import zmq

from stage_image.security import (
    CurveKeyError,
    KeyPair,
    apply_client,
    apply_server,
    generate_deployment_keys,
    load_keypair,
    save_keypair,
    start_authenticator,
)

WAIT_MS = 600   # a CURVE handshake on loopback takes well under a millisecond


_AUTHENTICATORS: list = []


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    while _AUTHENTICATORS:
        _AUTHENTICATORS.pop().stop()
    context.destroy(linger=0)


def _server(ctx: zmq.Context, keys: KeyPair, allowed: list[bytes]) -> tuple[zmq.Socket, str]:
    # Keep a reference: a garbage-collected authenticator stops answering ZAP requests.
    _AUTHENTICATORS.append(start_authenticator(ctx, allowed))
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    apply_server(pull, keys)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    return pull, f"tcp://127.0.0.1:{port}"


def _deliver(ctx: zmq.Context, address: str, configure) -> zmq.Socket:
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.sndtimeo = WAIT_MS
    configure(push)
    push.connect(address)
    try:
        push.send(b"hello")
    except zmq.Again:
        pass            # no handshake completed: the message never left, as it should be
    return push


def _received(pull: zmq.Socket) -> bytes | None:
    if pull.poll(WAIT_MS, zmq.POLLIN):
        return pull.recv(zmq.NOBLOCK)
    return None


def test_allowed_client_gets_through(ctx: zmq.Context) -> None:
    keys = generate_deployment_keys(["stage0", "dispatcher"])
    pull, address = _server(ctx, keys["stage0"], [keys["dispatcher"].public])
    push = _deliver(ctx, address,
                    lambda s: apply_client(s, keys["dispatcher"], keys["stage0"].public))
    assert _received(pull) == b"hello"
    push.close()


def test_plain_client_is_refused(ctx: zmq.Context) -> None:
    keys = generate_deployment_keys(["stage0", "dispatcher"])
    pull, address = _server(ctx, keys["stage0"], [keys["dispatcher"].public])
    push = _deliver(ctx, address, lambda s: None)          # NULL mechanism, no keys at all
    assert _received(pull) is None
    push.close()


def test_client_not_on_allow_list_is_refused(ctx: zmq.Context) -> None:
    keys = generate_deployment_keys(["stage0", "dispatcher", "intruder"])
    pull, address = _server(ctx, keys["stage0"], [keys["dispatcher"].public])
    # Knows the server's public key, but its own key was not issued for this deployment.
    push = _deliver(ctx, address,
                    lambda s: apply_client(s, keys["intruder"], keys["stage0"].public))
    assert _received(pull) is None
    push.close()


def test_client_with_wrong_server_key_is_refused(ctx: zmq.Context) -> None:
    keys = generate_deployment_keys(["stage0", "dispatcher", "other"])
    pull, address = _server(ctx, keys["stage0"], [keys["dispatcher"].public])
    push = _deliver(ctx, address,
                    lambda s: apply_client(s, keys["dispatcher"], keys["other"].public))
    assert _received(pull) is None
    push.close()


def test_keys_are_fresh_per_deployment() -> None:
    first = generate_deployment_keys(["a", "b"])
    second = generate_deployment_keys(["a", "b"])
    assert first["a"].public != second["a"].public
    assert first["a"].public != first["b"].public
    with pytest.raises(ValueError):
        generate_deployment_keys(["a", "a"])


def test_keypair_file_roundtrip(tmp_path) -> None:
    pair = KeyPair.generate()
    path = tmp_path / "stage0.json"
    save_keypair(path, pair)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_keypair(path) == pair
    stranger = KeyPair.generate().public.decode()
    path.write_text(f'{{"public": "{stranger}", "secret": "{pair.secret.decode()}"}}')
    with pytest.raises(CurveKeyError, match="does not belong"):
        load_keypair(path)
    with pytest.raises(CurveKeyError):
        KeyPair.from_secret("too-short")
