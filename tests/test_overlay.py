"""The overlay between real nodes on 127.0.0.1: calls both ways, streams, timeouts, reconnects, races."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.overlay_support import OverlayNode
from tests.support import until
from wwwserve_gateway.overlay import HandshakeError, PeerTimeout, PeerUnreachable, RemoteError
from wwwserve_gateway.overlay import frames as overlay_frames
from wwwserve_gateway.overlay.connection import PeerConnection
from wwwserve_gateway.overlay.frames import Frame


def add_echo(node: OverlayNode) -> None:
    async def echo(peer_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"by": node.id, "peer": peer_id, **body}

    node.overlay.on_request("echo", echo)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[OverlayNode, OverlayNode]]:
    a = await OverlayNode(queue_size=8, backoff_base=0.05, handshake_timeout=2.0).start()
    b = await OverlayNode(queue_size=8, backoff_base=0.05, handshake_timeout=2.0).start()
    add_echo(a)
    add_echo(b)
    a.overlay.learn(b.id, b.url)
    yield a, b
    await a.stop()
    await b.stop()


def only_connection(node: OverlayNode, peer: OverlayNode) -> PeerConnection:
    conn = node.overlay.connection(peer.id)
    assert conn is not None
    return conn


async def test_requests_both_ways_over_one_connection(pair: tuple[OverlayNode, OverlayNode]) -> None:
    a, b = pair
    assert await a.overlay.request(b.id, "echo", {"n": 1}, timeout=5) == {"by": b.id, "peer": a.id, "n": 1}
    # B never learned A's address: it answers over the connection A opened.
    assert await b.overlay.request(a.id, "echo", {"n": 2}, timeout=5) == {"by": a.id, "peer": b.id, "n": 2}
    answers = await asyncio.gather(
        *(a.overlay.request(b.id, "echo", {"i": i}, timeout=5) for i in range(40)),
        *(b.overlay.request(a.id, "echo", {"i": i}, timeout=5) for i in range(40)),
    )
    assert [r["i"] for r in answers] == list(range(40)) * 2
    assert a.overlay.connected() == [b.id] and b.overlay.connected() == [a.id]
    assert a.gauge() == b.gauge() == 1
    assert only_connection(a, b).initiator_id == only_connection(b, a).initiator_id == a.id
    assert await a.overlay.connect(b.url) == b.id  # reused, not a second connection
    assert len(a.overlay._all) == len(b.overlay._all) == 1


async def test_remote_errors_leave_the_connection_up(pair: tuple[OverlayNode, OverlayNode]) -> None:
    a, b = pair

    async def fail(peer_id: str, body: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("no such model")

    async def wrong(peer_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"x": object()}

    b.overlay.on_request("fail", fail)
    b.overlay.on_request("wrong", wrong)
    with pytest.raises(RemoteError) as raised:
        await a.overlay.request(b.id, "fail", {}, timeout=5)
    assert (raised.value.type, raised.value.message) == ("handler_error", "no such model")
    with pytest.raises(RemoteError) as raised:
        await a.overlay.request(b.id, "nope", {}, timeout=5)
    assert raised.value.type == "unknown_kind"
    with pytest.raises(RemoteError) as raised:
        await a.overlay.request(b.id, "wrong", {}, timeout=5)
    assert raised.value.type == "invalid_response"
    assert (await a.overlay.request(b.id, "echo", {}, timeout=5))["by"] == b.id
    assert a.gauge() == 1


async def test_fire_and_forget(pair: tuple[OverlayNode, OverlayNode]) -> None:
    a, b = pair
    got: list[tuple[str, dict[str, Any]]] = []

    async def note(peer_id: str, body: dict[str, Any]) -> None:
        got.append((peer_id, body))

    b.overlay.on_message("note", note)
    for i in range(20):
        await a.overlay.send(b.id, "note", {"i": i})
    await until(lambda: len(got) == 20, what="20 messages")
    assert got == [(a.id, {"i": i}) for i in range(20)]


async def test_request_timeout_cancels_the_remote_handler(pair: tuple[OverlayNode, OverlayNode]) -> None:
    a, b = pair
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hang(peer_id: str, body: dict[str, Any]) -> dict[str, Any]:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    b.overlay.on_request("hang", hang)
    with pytest.raises(PeerTimeout):
        await a.overlay.request(b.id, "hang", {}, timeout=0.3)
    await asyncio.wait_for(cancelled.wait(), 5)

    # Cancelling the caller's task propagates the same way.
    started.clear()
    cancelled.clear()
    call = asyncio.create_task(a.overlay.request(b.id, "hang", {}, timeout=30))
    await asyncio.wait_for(started.wait(), 5)
    call.cancel()
    await asyncio.wait_for(cancelled.wait(), 5)
    await until(lambda: not only_connection(b, a)._serving, what="handler gone")
    assert (await a.overlay.request(b.id, "echo", {}, timeout=5))["by"] == b.id


async def test_stream_delivers_every_item_in_order_to_a_slow_consumer(
    pair: tuple[OverlayNode, OverlayNode],
) -> None:
    a, b = pair
    pad = "x" * (64 * 1024)
    produced = 0

    async def count(peer_id: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        nonlocal produced
        for i in range(body["n"]):
            produced += 1
            yield {"i": i, "pad": pad}

    b.overlay.on_stream("count", count)
    # Flow control counts bytes: the producer can never run more than the stream's window ahead
    # (plus the item it is waiting to send). Every item is at least this big on the wire:
    smallest = len(overlay_frames.encode(Frame("item", 1, "", {"i": 0, "pad": pad})))
    ahead = a.overlay.limits.stream_window // smallest + 1
    received = []
    async for item in a.overlay.stream(b.id, "count", {"n": 120}, timeout=5):
        received.append(item["i"])
        assert produced - len(received) <= ahead
        if len(received) % 40 == 0:
            await asyncio.sleep(0.05)  # a slow consumer: the producer waits instead of buffering
            assert produced - len(received) <= ahead
    assert received == list(range(120))
    assert produced == 120


async def test_a_stalled_stream_does_not_block_other_calls(pair: tuple[OverlayNode, OverlayNode]) -> None:
    a, b = pair

    async def endless(peer_id: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        i = 0
        while True:
            yield {"i": i, "pad": "x" * 1000}
            i += 1

    b.overlay.on_stream("endless", endless)
    stream = a.overlay.stream(b.id, "endless", {}, timeout=5)
    assert (await anext(stream))["i"] == 0
    # Nobody reads the stream now; its window fills, yet requests both ways still pass.
    for _ in range(5):
        assert (await a.overlay.request(b.id, "echo", {}, timeout=2))["by"] == b.id
        assert (await b.overlay.request(a.id, "echo", {}, timeout=2))["by"] == a.id
    assert (await anext(stream))["i"] == 1
    await stream.aclose()


async def test_closing_a_stream_cancels_the_remote_handler(pair: tuple[OverlayNode, OverlayNode]) -> None:
    a, b = pair
    cancelled = asyncio.Event()

    async def ticks(peer_id: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        try:
            i = 0
            while True:
                yield {"i": i, "pad": "x" * body.get("pad", 0)}
                i += 1
                await asyncio.sleep(0.001)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    b.overlay.on_stream("ticks", ticks)
    stream = a.overlay.stream(b.id, "ticks", {}, timeout=5)
    assert [(await anext(stream))["i"] for _ in range(3)] == [0, 1, 2]
    await stream.aclose()
    await asyncio.wait_for(cancelled.wait(), 5)
    await until(lambda: not only_connection(b, a)._serving, what="stream handler gone")

    # A handler blocked on its window (the consumer stopped reading) is cancelled too.
    cancelled.clear()
    stream = a.overlay.stream(b.id, "ticks", {"pad": 100_000}, timeout=5)
    await anext(stream)
    conn = only_connection(b, a)
    await until(lambda: any(c.waiting for c in conn._credits.values()), what="window used up")
    await stream.aclose()
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_stream_timeout_and_remote_failure(pair: tuple[OverlayNode, OverlayNode]) -> None:
    a, b = pair
    cancelled = asyncio.Event()

    async def one_then_hang(peer_id: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield {"i": 0}
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        yield {"i": 1}

    async def two_then_fail(peer_id: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield {"i": 0}
        yield {"i": 1}
        raise RuntimeError("backend died")

    b.overlay.on_stream("hang", one_then_hang)
    b.overlay.on_stream("fail", two_then_fail)
    got = []
    with pytest.raises(PeerTimeout):
        async for item in a.overlay.stream(b.id, "hang", {}, timeout=0.3):
            got.append(item)
    assert got == [{"i": 0}]
    await asyncio.wait_for(cancelled.wait(), 5)

    got = []
    with pytest.raises(RemoteError, match="backend died"):
        async for item in a.overlay.stream(b.id, "fail", {}, timeout=5):
            got.append(item)
    assert got == [{"i": 0}, {"i": 1}]
    with pytest.raises(RemoteError) as raised:
        async for _ in a.overlay.stream(b.id, "nope", {}, timeout=5):
            pass
    assert raised.value.type == "unknown_kind"


async def test_reconnect_after_the_peer_restarts(pair: tuple[OverlayNode, OverlayNode]) -> None:
    a, b = pair
    changes: list[tuple[str, bool]] = []
    a.overlay.on_peer_change(lambda peer, up: changes.append((peer, up)))
    assert (await a.overlay.request(b.id, "echo", {}, timeout=5))["by"] == b.id
    await b.stop()
    await until(lambda: not a.overlay.connected(), what="A sees B go")
    assert changes == [(b.id, True), (b.id, False)] and a.gauge() == 0
    with pytest.raises(PeerUnreachable):
        await a.overlay.request(b.id, "echo", {}, timeout=2)

    b2 = await b.renewed().start()  # same identity and port, new process state
    add_echo(b2)
    try:
        # The failed dial left a backoff; the request waits it out within its timeout.
        assert (await a.overlay.request(b.id, "echo", {"again": True}, timeout=5))["again"] is True
        assert a.overlay.connected() == [b.id] and b2.overlay.connected() == [a.id]
        assert changes[-1] == (b.id, True)
    finally:
        await b2.stop()


async def test_backoff_fails_fast_when_it_outlasts_the_timeout() -> None:
    a = await OverlayNode(backoff_base=5.0).start()
    ghost = OverlayNode()  # never started: nothing listens on its port
    a.overlay.learn(ghost.id, ghost.url)
    try:
        with pytest.raises(PeerUnreachable, match="cannot reach"):
            await a.overlay.request(ghost.id, "echo", {}, timeout=2)
        with pytest.raises(PeerUnreachable, match="failed recently"):
            await a.overlay.request(ghost.id, "echo", {}, timeout=2)
        with pytest.raises(PeerUnreachable, match="no address"):
            await a.overlay.request("ab" * 32, "echo", {}, timeout=2)
    finally:
        await a.stop()


@pytest.mark.parametrize("round_", range(4))
async def test_simultaneous_dials_settle_on_one_connection(round_: int) -> None:
    a = await OverlayNode(handshake_timeout=2.0).start()
    b = await OverlayNode(handshake_timeout=2.0).start()
    add_echo(a)
    add_echo(b)
    a.overlay.learn(b.id, b.url)
    b.overlay.learn(a.id, a.url)
    try:
        ids = await asyncio.gather(a.overlay.connect(b.url, b.id), b.overlay.connect(a.url, a.id))
        assert ids == [b.id, a.id]
        smaller = min(a.id, b.id)
        await until(
            lambda: len(a.overlay._all) == len(b.overlay._all) == 1,
            what="the losing connection closed",
        )
        assert only_connection(a, b).initiator_id == only_connection(b, a).initiator_id == smaller
        assert a.gauge() == b.gauge() == 1
        assert (await a.overlay.request(b.id, "echo", {}, timeout=5))["by"] == b.id
        assert (await b.overlay.request(a.id, "echo", {}, timeout=5))["by"] == a.id
    finally:
        await a.stop()
        await b.stop()


async def test_a_second_connection_from_a_connected_id_is_refused(
    pair: tuple[OverlayNode, OverlayNode],
) -> None:
    a, b = pair
    assert await a.overlay.connect(b.url) == b.id
    impostor = OverlayNode(a.identity, handshake_timeout=0.5)  # same key, another process
    try:
        with pytest.raises(HandshakeError) as raised:
            await impostor.overlay.connect(b.url, b.id)
        assert raised.value.reason == "duplicate"
        assert b.rejected("duplicate") == 1
        assert (await a.overlay.request(b.id, "echo", {}, timeout=5))["by"] == b.id
        assert b.gauge() == 1
    finally:
        await impostor.overlay.aclose()


async def test_connect_checks_the_expected_id(pair: tuple[OverlayNode, OverlayNode]) -> None:
    a, b = pair
    with pytest.raises(HandshakeError) as raised:
        await a.overlay.connect(b.url, "ab" * 32)
    assert raised.value.reason == "identity_mismatch"
    assert a.rejected("identity_mismatch") == 1
    assert a.overlay.connected() == []
