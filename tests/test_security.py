"""CurveZMQ helpers on loopback: only a client holding an allowed keypair and the server's
public key gets a message through; plain, wrong-key and unknown-key clients do not. The same
for data hops authenticated by token (PLAIN, a password derived from the two keys): only the
admitted upstream's own token gets in, whatever name or mechanism a forger uses."""

from __future__ import annotations

import stat
import time
from collections.abc import Iterator

import pytest
import zmq

from stage_image.agent import curve_args, parse_args
from stage_image.security import (
    CurveKeyError,
    Gate,
    KeyPair,
    apply_client,
    apply_data_client,
    apply_data_server,
    apply_server,
    data_token,
    generate_deployment_keys,
    load_keypair,
    save_keypair,
    start_authenticator,
    start_gates,
)
from stage_image.worker import NextHop

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


def test_data_token_is_the_same_at_both_ends_and_differs_per_pair() -> None:
    keys = generate_deployment_keys(["a", "b", "c"])
    ab = data_token(keys["a"], keys["b"].public)
    assert ab == data_token(keys["b"], keys["a"].public)
    assert ab != data_token(keys["a"], keys["c"].public)
    assert ab != data_token(keys["c"], keys["b"].public)
    assert len(ab) == 64 and int(ab, 16) >= 0


def _token_server(ctx: zmq.Context, keys: KeyPair,
                  allowed: list[bytes]) -> tuple[zmq.Socket, str]:
    """A worker's PULL with `data_auth: token`: PLAIN, its Gate holding the server's keys."""
    _AUTHENTICATORS.append(start_gates(ctx, {"upstream": Gate(allowed, own=keys)}))
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    apply_data_server(pull, keys, "token")
    pull.zap_domain = b"upstream"
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    return pull, f"tcp://127.0.0.1:{port}"


def _plain(user: bytes, password: str):
    def configure(sock: zmq.Socket) -> None:
        sock.plain_username, sock.plain_password = user, password.encode()
    return configure


def test_token_hop_admits_its_upstream_only(ctx: zmq.Context) -> None:
    keys = generate_deployment_keys(["stage0", "dispatcher", "intruder"])
    server, upstream, intruder = keys["stage0"], keys["dispatcher"], keys["intruder"]
    pull, address = _token_server(ctx, server, [upstream.public])
    forgers = [
        lambda s: None,                                              # NULL: no credentials
        lambda s: apply_data_client(s, intruder, server.public, "token"),   # its own token
        # the upstream's name with a token the forger can compute, or any other password
        _plain(upstream.public, data_token(intruder, server.public)),
        _plain(upstream.public, data_token(upstream, intruder.public)),
        _plain(upstream.public, "0" * 64),
        lambda s: apply_data_client(s, upstream, server.public, "curve"),  # right keys, CURVE
    ]
    for configure in forgers:
        push = _deliver(ctx, address, configure)
        assert _received(pull) is None
        push.close()
    push = _deliver(ctx, address,
                    lambda s: apply_data_client(s, upstream, server.public, "token"))
    assert _received(pull) == b"hello"
    # ZAP's User-Id names the sender by its public key, as with CURVE
    push.send(b"again")
    assert pull.poll(WAIT_MS, zmq.POLLIN)
    assert pull.recv(copy=False).get("User-Id") == upstream.public.decode()
    push.close()


def test_token_gate_follows_its_allow_list(ctx: zmq.Context) -> None:
    keys = generate_deployment_keys(["stage1", "old", "new"])
    gate = Gate([keys["old"].public], own=keys["stage1"])
    assert gate.admits_plain(keys["old"].public.decode(),
                             data_token(keys["old"], keys["stage1"].public))
    gate.set([keys["new"].public])                  # a re-plan changes the upstream
    assert not gate.admits_plain(keys["old"].public.decode(),
                                 data_token(keys["old"], keys["stage1"].public))
    assert gate.admits_plain(keys["new"].public.decode(),
                             data_token(keys["new"], keys["stage1"].public))
    assert not Gate([keys["new"].public]).admits_plain(      # no own keys: no PLAIN at all
        keys["new"].public.decode(), data_token(keys["new"], keys["stage1"].public))


def test_refused_next_hop_is_dialled_again_once_admitted(ctx: zmq.Context) -> None:
    """A re-plan's routes reach the stages in any order: an upstream may dial before the next
    stage's Gate admits it. libzmq never retries a refused handshake (the plain PUSH below
    stays dead after the Gate opens); a worker's NextHop dials again and gets through."""
    keys = generate_deployment_keys(["stage2", "stage1"])
    gate = Gate(own=keys["stage2"])                         # admits nobody yet
    _AUTHENTICATORS.append(start_gates(ctx, {"upstream": gate}))
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    apply_data_server(pull, keys["stage2"], "token")
    pull.zap_domain = b"upstream"
    address = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"

    def secure(sock: zmq.Socket) -> None:
        apply_data_client(sock, keys["stage1"], keys["stage2"].public, "token")

    plain = ctx.socket(zmq.PUSH)
    plain.linger = 0
    plain.setsockopt(zmq.IMMEDIATE, 1)
    secure(plain)
    plain.connect(address)
    hop = NextHop(ctx, address, hwm=4, linger_ms=0, secure=secure)
    assert hop.monitor is not None and hop.monitor.poll(5000)     # refused
    gate.set([keys["stage1"].public])                             # the route arrives
    deadline = time.monotonic() + 5.0
    sent = False
    while not sent and time.monotonic() < deadline:
        hop.check(time.monotonic())
        try:
            hop.push.send(b"through", zmq.NOBLOCK)
            sent = True
        except zmq.Again:
            time.sleep(0.02)
    assert sent and hop.redials >= 1
    assert _received(pull) == b"through"
    with pytest.raises(zmq.Again):                  # the undialled PUSH never got a link
        plain.send(b"stuck", zmq.NOBLOCK)
    hop.close(0)
    plain.close()


def test_a_key_beginning_with_a_dash_reaches_the_agent() -> None:
    """Z85 keys begin with '-' one time in 85: passed as a separate argument, argparse took it
    for an option and the agent exited (a run then waited for its hello in vain)."""
    key = "-" + KeyPair.generate().public.decode()[1:]
    args = parse_args(["--host", "edge1", "--controller", "tcp://10.0.0.1:1", "--data-dir",
                       "/d", "--ip", "10.0.0.2", *curve_args(key, "/d/key")])
    assert (args.curve_server_key, args.curve_keypair) == (key, "/d/key")


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
