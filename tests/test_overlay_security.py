"""Attacks on a node's overlay endpoint: each is refused and counted, and the node keeps serving.

Every attack runs against a live node that already has a legitimate peer connected; afterwards the
node must still answer HTTP /health, still serve that peer, and still accept a new one. The frame,
handshake, channel and record decoders are fuzzed with hypothesis.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.overlay_support import OverlayNode, RawPeer
from tests.support import until
from wwwserve_gateway.network.identity import InvalidSignature, NodeIdentity, verify_record
from wwwserve_gateway.overlay import HandshakeError, PeerUnreachable, RemoteError
from wwwserve_gateway.overlay import frames as overlay_frames
from wwwserve_gateway.overlay.connection import (
    CLOSE_FRAME_ERROR,
    CLOSE_HANDSHAKE_FAILED,
    CLOSE_HANDSHAKE_TIMEOUT,
)
from wwwserve_gateway.overlay.errors import ChannelError, FrameError
from wwwserve_gateway.overlay.frames import Frame
from wwwserve_gateway.overlay.handshake import (
    VERSION,
    Initiator,
    Responder,
    parse_finish,
    parse_greeting,
    transcript,
)
from wwwserve_gateway.overlay.secure_channel import SecureChannel

MAX_FRAME = 64 * 1024
HANDSHAKE_TIMEOUT = 0.5


async def echo(peer_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"peer": peer_id, **body}


@pytest.fixture
async def target() -> AsyncIterator[tuple[OverlayNode, OverlayNode]]:
    """The node under attack, and a legitimate peer connected to it before the attack."""
    node = await OverlayNode(max_frame_bytes=MAX_FRAME, handshake_timeout=HANDSHAKE_TIMEOUT).start()
    node.overlay.on_request("echo", echo)
    friend = OverlayNode()
    assert await friend.overlay.connect(node.url) == node.id
    yield node, friend
    await friend.overlay.aclose()
    await node.stop()


async def assert_still_serving(node: OverlayNode, friend: OverlayNode) -> None:
    assert await node.health() == 200
    assert await friend.overlay.request(node.id, "echo", {"ok": 1}, timeout=5) == {"peer": friend.id, "ok": 1}
    newcomer = OverlayNode()
    try:
        assert await newcomer.overlay.connect(node.url) == node.id
        assert (await newcomer.overlay.request(node.id, "echo", {}, timeout=5))["peer"] == newcomer.id
    finally:
        await newcomer.overlay.aclose()
    assert friend.id in node.overlay.connected()


async def refused(
    node: OverlayNode, friend: OverlayNode, attack: Callable[[RawPeer], Awaitable[None]]
) -> int | None:
    """Run `attack` from a raw peer; the close code the node answered with."""
    async with RawPeer(node.url) as raw:
        await attack(raw)
        code = await raw.closed()
    await assert_still_serving(node, friend)
    return code


# -- handshake attacks -----------------------------------------------------------------------------


async def test_wrong_network_is_refused(target: tuple[OverlayNode, OverlayNode]) -> None:
    node, friend = target

    async def attack(raw: RawPeer) -> None:
        await raw.send(Initiator(raw.identity, "0" * 64).hello())

    assert await refused(node, friend, attack) == CLOSE_HANDSHAKE_FAILED
    assert node.rejected("wrong_network") == 1

    # A real node of another network learns why.
    stranger = OverlayNode(network_id="e" * 64)
    try:
        with pytest.raises(HandshakeError) as raised:
            await stranger.overlay.connect(node.url)
        assert raised.value.reason == "wrong_network"
    finally:
        await stranger.overlay.aclose()
    assert node.rejected("wrong_network") == 2


async def test_forged_handshake_signature_is_refused(target: tuple[OverlayNode, OverlayNode]) -> None:
    node, friend = target
    victim, forger = friend.identity, NodeIdentity.generate()  # claim the friend's id, sign with another key

    async def attack(raw: RawPeer) -> None:
        initiator = Initiator(victim, node.network_id)
        await raw.send(initiator.hello())
        welcome = orjson.loads(await raw.recv())
        sig = forger.sign(transcript(initiator.hello_msg, welcome))
        await raw.send(orjson.dumps({"t": "finish", "sig": sig.hex()}))

    assert await refused(node, friend, attack) == CLOSE_HANDSHAKE_FAILED
    assert node.rejected("bad_signature") == 1


async def test_forged_welcome_is_refused_by_the_dialler(target: tuple[OverlayNode, OverlayNode]) -> None:
    """The other direction: a responder that claims the node's id but cannot sign for it."""
    node, friend = target
    impostor = OverlayNode(node.identity)
    forger = NodeIdentity.generate()

    async def forged_endpoint(websocket: Any) -> None:
        await websocket.accept()
        responder = Responder(node.identity, node.network_id)
        welcome = orjson.loads(responder.on_hello(await websocket.receive_bytes()))
        hello = responder.hello_msg
        unsigned = {k: v for k, v in welcome.items() if k != "sig"}
        welcome["sig"] = forger.sign(transcript(hello, unsigned)).hex()
        await websocket.send_bytes(orjson.dumps(welcome))
        await websocket.receive()

    impostor.overlay.websocket_endpoint = forged_endpoint  # type: ignore[method-assign]
    await impostor.start()
    dialler = OverlayNode()
    try:
        with pytest.raises(HandshakeError) as raised:
            await dialler.overlay.connect(impostor.url, node.id)
        assert raised.value.reason == "bad_signature"
        assert dialler.rejected("bad_signature") == 1
    finally:
        await dialler.overlay.aclose()
        await impostor.stop()
    await assert_still_serving(node, friend)


async def test_stale_timestamp_is_refused(target: tuple[OverlayNode, OverlayNode]) -> None:
    node, friend = target

    async def attack(raw: RawPeer) -> None:
        await raw.send(Initiator(raw.identity, node.network_id, clock=lambda: time.time() - 120).hello())

    assert await refused(node, friend, attack) == CLOSE_HANDSHAKE_FAILED
    assert node.rejected("stale") == 1


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (os.urandom(200), "malformed"),
        (b'{"t": "hello"}', "version"),
        (orjson.dumps({"t": "hello", "v": VERSION}), "malformed"),
        (b"x" * 5000, "oversized"),
    ],
    ids=["garbage", "no-version", "missing-fields", "oversized-hello"],
)
async def test_garbage_instead_of_hello_is_refused(
    target: tuple[OverlayNode, OverlayNode], payload: bytes, reason: str
) -> None:
    node, friend = target

    async def attack(raw: RawPeer) -> None:
        await raw.send(payload)

    assert await refused(node, friend, attack) == CLOSE_HANDSHAKE_FAILED
    assert node.rejected(reason) == 1


async def test_text_message_is_refused(target: tuple[OverlayNode, OverlayNode]) -> None:
    node, friend = target

    async def attack(raw: RawPeer) -> None:
        assert raw.ws is not None
        await raw.ws.send_str("hello")

    assert await refused(node, friend, attack) == CLOSE_HANDSHAKE_FAILED
    assert node.rejected("malformed") == 1


@pytest.mark.parametrize("stage", ["silent", "after-hello"])
async def test_half_finished_handshake_is_closed_after_the_timeout(
    target: tuple[OverlayNode, OverlayNode], stage: str
) -> None:
    node, friend = target
    started = time.monotonic()

    async def attack(raw: RawPeer) -> None:
        if stage == "after-hello":
            await raw.send(Initiator(raw.identity, node.network_id).hello())
            await raw.recv()  # the welcome; the finish never comes

    assert await refused(node, friend, attack) == CLOSE_HANDSHAKE_TIMEOUT
    assert time.monotonic() - started >= HANDSHAKE_TIMEOUT
    assert node.rejected("handshake_timeout") == 1


async def test_connection_from_our_own_id_is_refused(target: tuple[OverlayNode, OverlayNode]) -> None:
    node, friend = target

    async def attack(raw: RawPeer) -> None:
        await raw.send(Initiator(node.identity, node.network_id).hello())

    assert await refused(node, friend, attack) == CLOSE_HANDSHAKE_FAILED
    assert node.rejected("self") == 1


async def test_too_many_handshakes_at_once_are_refused(target: tuple[OverlayNode, OverlayNode]) -> None:
    node, friend = target
    node.overlay.max_handshakes = 2
    async with RawPeer(node.url), RawPeer(node.url):  # two silent handshakes in progress
        await until(lambda: node.overlay._handshaking == 2, what="two handshakes pending")
        with pytest.raises(aiohttp.WSServerHandshakeError):
            async with RawPeer(node.url):
                pass
        assert node.rejected("overloaded") == 1
    node.overlay.max_handshakes = 64
    await until(lambda: node.overlay._handshaking == 0, what="pending handshakes gone")
    await assert_still_serving(node, friend)


# -- attacks on sealed frames ----------------------------------------------------------------------


def ping(i: int) -> Frame:
    return Frame("msg", 0, "ping", {"i": i})


Attack = Callable[[RawPeer, OverlayNode], Awaitable[None]]


async def _replayed(raw: RawPeer, node: OverlayNode) -> None:
    first = raw.seal(ping(1))
    await raw.send(first)
    await raw.send(first)


async def _altered(raw: RawPeer, node: OverlayNode) -> None:
    await raw.send(raw.seal(ping(1)))
    frame = bytearray(raw.seal(ping(2)))
    frame[len(frame) // 2] ^= 0x01
    await raw.send(bytes(frame))


async def _reordered(raw: RawPeer, node: OverlayNode) -> None:
    await raw.send(raw.seal(ping(1)))
    second, third = raw.seal(ping(2)), raw.seal(ping(3))
    await raw.send(third)
    await raw.send(second)


async def _truncated(raw: RawPeer, node: OverlayNode) -> None:
    await raw.send(raw.seal(ping(1)))
    await raw.send(raw.seal(ping(2))[:-1])


async def _oversized(raw: RawPeer, node: OverlayNode) -> None:
    await raw.send(raw.seal(ping(1)))
    await raw.send(os.urandom(MAX_FRAME + 1))


async def _malformed(raw: RawPeer, node: OverlayNode) -> None:
    assert raw.channel is not None
    await raw.send(raw.seal(ping(1)))
    await raw.send(raw.channel.seal(b'{"t": "req", "s": 1}'))


async def _wrong_parity(raw: RawPeer, node: OverlayNode) -> None:
    # The initiator's streams are odd: an even request id is a protocol violation.
    await raw.send(raw.seal(ping(1)))
    await raw.send(raw.seal(Frame("req", 2, "echo", {})))


async def _window_overrun(raw: RawPeer, node: OverlayNode) -> None:
    """The node opens a stream to the raw peer, which sends more bytes of items than the node granted."""
    assert raw.channel is not None
    await raw.send(raw.seal(ping(1)))
    stream = node.overlay.stream(raw.identity.node_id, "feed", {}, timeout=5)
    first = asyncio.create_task(anext(stream))
    sent = [overlay_frames.decode(raw.channel.open(await raw.recv())[0]) for _ in range(3)]
    assert [(f.t, f.s == 0) for f in sent] == [("more", True), ("open", False), ("more", False)]
    opened, granted = sent[1], sent[2].b["n"]  # the connection's window, then the stream's
    assert granted == node.overlay.limits.stream_window
    pad = "x" * (MAX_FRAME // 2)

    def item(i: int) -> Frame:
        return Frame("item", opened.s, "", {"i": i, "pad": pad})

    fits, total = 0, 0
    while total + len(overlay_frames.encode(item(fits))) <= granted:
        total += len(overlay_frames.encode(item(fits)))
        fits += 1
    for i in range(fits + 2):
        await raw.send(raw.seal(item(i)))
    assert (await first)["i"] == 0  # then the consumer pauses, so it grants nothing more
    await until(lambda: node.overlay.connection(raw.identity.node_id) is None, what="connection closed")
    received = [item["i"] async for item in _until_error(stream, PeerUnreachable)]
    assert received == list(range(1, fits))  # what was granted arrives, then the error


async def _until_error(stream: AsyncIterator[dict[str, Any]], error: type[Exception]) -> AsyncIterator[dict]:
    with pytest.raises(error):
        async for item in stream:
            yield item


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        (_replayed, "undecryptable"),
        (_altered, "undecryptable"),
        (_reordered, "undecryptable"),
        (_truncated, "undecryptable"),
        (_oversized, "oversized"),
        (_malformed, "malformed"),
        (_wrong_parity, "malformed"),
        (_window_overrun, "malformed"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
async def test_bad_sealed_frames_close_the_connection(
    target: tuple[OverlayNode, OverlayNode], attack: Attack, reason: str
) -> None:
    node, friend = target
    pings: list[int] = []

    async def on_ping(peer_id: str, body: dict[str, Any]) -> None:
        pings.append(body["i"])

    node.overlay.on_message("ping", on_ping)

    async def handshake_then_attack(raw: RawPeer) -> None:
        await raw.handshake()
        await attack(raw, node)

    assert await refused(node, friend, handshake_then_attack) == CLOSE_FRAME_ERROR
    assert node.rejected(reason) == 1
    assert pings == [1]  # the valid frame before the attack was delivered, nothing after it
    assert node.gauge() == 1  # only the friend remains


async def test_oversized_calls_are_refused_locally(target: tuple[OverlayNode, OverlayNode]) -> None:
    node, friend = target
    with pytest.raises(FrameError) as raised:
        await friend.overlay.request(node.id, "echo", {"pad": "x" * (1 << 21)}, timeout=5)
    assert raised.value.reason == "oversized"
    # An answer too big for the node's frames becomes an error, not a broken connection.
    assert (await friend.overlay.request(node.id, "echo", {"pad": "x" * 1000}, timeout=5))["pad"]
    with pytest.raises(RemoteError, match="frame limit") as remote:
        await friend.overlay.request(node.id, "echo", {"pad": "x" * (MAX_FRAME - 100)}, timeout=5)
    assert remote.value.type == "invalid_response"
    await assert_still_serving(node, friend)


async def test_flood_of_requests_is_answered_busy() -> None:
    node = await OverlayNode(max_inflight=4).start()
    release = asyncio.Event()

    async def hold(peer_id: str, body: dict[str, Any]) -> dict[str, Any]:
        await release.wait()
        return {}

    node.overlay.on_request("hold", hold)
    node.overlay.on_request("echo", echo)
    caller = OverlayNode()
    caller.overlay.learn(node.id, node.url)
    try:
        calls = [
            asyncio.create_task(caller.overlay.request(node.id, "hold", {}, timeout=5)) for _ in range(10)
        ]
        results = await asyncio.wait_for(asyncio.gather(*calls[4:], return_exceptions=True), 5)
        assert all(getattr(r, "type", None) == "busy" for r in results)
        release.set()
        assert await asyncio.gather(*calls[:4]) == [{}] * 4
        assert node.rejected("busy") == 6
        assert (await caller.overlay.request(node.id, "echo", {}, timeout=5))["peer"] == caller.id
    finally:
        await caller.overlay.aclose()
        await node.stop()


# -- fuzzing the decoders --------------------------------------------------------------------------

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
frame_like = st.fixed_dictionaries(
    {},
    optional={
        "t": st.sampled_from(sorted(overlay_frames.TYPES)) | json_values,
        "s": st.integers(min_value=-2, max_value=2**54) | json_values,
        "k": st.sampled_from(["", "echo", "a" * 65, "bad kind"]) | json_values,
        "b": st.dictionaries(st.sampled_from(["n", "message", "type", "x"]), json_values, max_size=3),
    },
)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode(data: bytes) -> None:
    try:
        frame = overlay_frames.decode(data)
    except FrameError as exc:
        assert exc.reason == "malformed"
        return
    assert overlay_frames.decode(overlay_frames.encode(frame)) == frame


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_frame_decoder_with_bytes(data: bytes) -> None:
    _decode(data)


@FUZZ
@given(json_values | frame_like)
def test_fuzz_frame_decoder_with_json(value: Any) -> None:
    _decode(orjson.dumps(value))


@FUZZ
@given(st.binary(max_size=300) | json_values.map(orjson.dumps) | frame_like.map(orjson.dumps))
def test_fuzz_handshake_parsers(data: bytes) -> None:
    for parse in (
        lambda: parse_greeting(data, "hello", "f" * 64, time.time()),
        lambda: parse_greeting(data, "welcome", "f" * 64, time.time()),
        lambda: parse_finish(data),
        lambda: Responder(NodeIdentity.generate(), "f" * 64).on_hello(data),
    ):
        try:
            parse()
        except HandshakeError:
            pass


def test_secure_channel_round_trip_and_end() -> None:
    key_ab, key_ba = os.urandom(32), os.urandom(32)
    a, b = SecureChannel(key_ab, key_ba), SecureChannel(key_ba, key_ab)
    sealed = [a.seal(b"one"), a.seal(b"two")]
    assert b.open(sealed[0]) == (b"one", False)
    with pytest.raises(ChannelError):
        b.open(sealed[0])  # a replay
    assert b.open(sealed[1]) == (b"two", False)
    assert b.open(a.seal(b"", final=True)) == (b"", True)
    with pytest.raises(ChannelError):
        a.seal(b"more")
    with pytest.raises(ChannelError):
        b.open(sealed[1])  # anything after the end
    assert a.open(b.seal(b"back")) == (b"back", False)  # the other direction is independent


@FUZZ
@given(st.lists(st.binary(max_size=80), min_size=1, max_size=3))
def test_fuzz_secure_channel(frames_in: list[bytes]) -> None:
    channel = SecureChannel(os.urandom(32), os.urandom(32))
    for data in frames_in:
        try:
            channel.open(data)
        except ChannelError:
            return
        raise AssertionError("a random frame opened")


SIGNER = NodeIdentity.generate()
records = st.fixed_dictionaries(
    {
        "body": st.dictionaries(st.text(max_size=6), json_values, max_size=4).map(
            lambda b: {**b, "id": SIGNER.node_id}
        )
        | json_values,
        "sig": st.sampled_from([SIGNER.sign(b"x").hex(), "zz", "", "00" * 64]) | json_values,
    },
    optional={"extra": json_values},
)


@FUZZ
@given(st.binary(max_size=300) | json_values.map(orjson.dumps) | records.map(orjson.dumps))
def test_fuzz_record_verification(data: bytes) -> None:
    try:
        record = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    try:
        body = verify_record(record)
    except InvalidSignature:
        return
    raise AssertionError(f"an unsigned record verified: {body}")


@FUZZ
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=4), st.data())
def test_fuzz_signed_records_reject_any_change(extra: dict[str, Any], data: st.DataObject) -> None:
    record = SIGNER.sign_record({**extra, "id": SIGNER.node_id})
    assert verify_record(orjson.loads(orjson.dumps(record))) == record["body"]
    key = data.draw(st.text(max_size=6))
    value = data.draw(json_values)
    changed = {**record["body"], key: value}
    if changed != record["body"]:
        with pytest.raises(InvalidSignature):
            verify_record({"body": changed, "sig": record["sig"]})
