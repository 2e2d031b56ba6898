"""Hostile clients and peers against the transport: each is refused or cut off, counted in /metrics, and
never starves genuine ones.

Real `wwwserve node` processes, real uvicorn and real sockets, on loopback only. Linux routes all of
127.0.0.0/8 to lo, so attackers bind 127.0.0.2 and per-source limits are exercised for real while
genuine clients and peers come from 127.0.0.1. Streams' flow control is checked on real overlays over
real sockets (tests/overlay_support.py). Every attack loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from tests.overlay_support import OverlayNode, RawPeer
from tests.support import ListeningChild, NodeProcess, until, wait_until
from wwwserve_gateway.network.genesis import NetworkGenesis
from wwwserve_gateway.overlay import PeerUnreachable, overlay_url
from wwwserve_gateway.overlay import frames as overlay_frames
from wwwserve_gateway.overlay.connection import CLOSE_FRAME_ERROR
from wwwserve_gateway.overlay.frames import Frame

ATTACKER = "127.0.0.2"
CHAT = {"model": "stub", "messages": [{"role": "user", "content": "hi"}]}
NETWORK_ID = NetworkGenesis().network_id  # the network of a node started without a genesis file


@pytest.fixture(scope="module")
def stub() -> Iterator[ListeningChild]:
    child = ListeningChild("stub", [sys.executable, "benchmarks/stub_server.py", "--port", "0"])
    yield child
    child.stop()


def stub_config(stub: ListeningChild, **node: Any) -> dict[str, Any]:
    return {
        "node": node,
        "model_list": [
            {
                "model_name": "stub",
                "litellm_params": {"model": "openai/stub", "api_base": stub.url + "/v1", "api_key": "x"},
            }
        ],
    }


@pytest.fixture(scope="module")
def node(stub: ListeningChild, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node with the default limits."""
    proc = NodeProcess(stub_config(stub), tmp_path_factory.mktemp("defaults")).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def tight(stub: ListeningChild, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node with small limits, so that reaching them is quick."""
    config = stub_config(
        stub,
        max_connections=30,
        max_connections_per_source=20,
        header_timeout=1.0,
        body_timeout=1.5,
        keep_alive_timeout=1.0,
    )
    proc = NodeProcess(config, tmp_path_factory.mktemp("tight")).start()
    yield proc
    proc.stop()


def rejected(node: NodeProcess, reason: str, metric: str = "wwwserve_http_rejected_total") -> float:
    return node.metric(metric, reason=reason)


def connect(node: NodeProcess, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=timeout, source_address=(source, 0))
    sock.settimeout(timeout)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One whole HTTP response from a raw socket: status, headers, body (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def assert_openai_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict:
    assert status == expected, body
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def genuine_chat(node: NodeProcess) -> None:
    """A genuine app from 127.0.0.1 is served."""
    resp = httpx.post(node.url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert resp.status_code == 200, resp.text


# -- 4. malformed framing: OpenAI's error shape, not uvicorn's text/plain ---------------------------

BODY = json.dumps(CHAT).encode()


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Length: 99999999999999999999\r\n",
        b"Content-Length: -5\r\n",
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Content-Length: 5\r\nContent-Length: 7\r\n",
    ],
    ids=["20-digit-length", "negative-length", "length-and-chunked", "two-lengths"],
)
def test_malformed_framing_gets_an_openai_error(node: NodeProcess, head: bytes) -> None:
    before = rejected(node, "malformed")
    with connect(node) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n" + BODY)
        status, headers, body = read_response(sock)
    error = assert_openai_error(status, headers, body, 400)
    assert error["type"] == "invalid_request_error" and error["param"] is None
    assert error["code"] == "invalid_http_request"
    assert rejected(node, "malformed") == before + 1
    genuine_chat(node)


# -- 3. slowloris, connection caps, header and body deadlines ---------------------------------------


def test_slowloris_connections_are_closed_at_the_header_deadline(node: NodeProcess) -> None:
    """Many connections from one source send header bytes slowly; each is answered 408 and closed
    once the default header deadline (10 s) passes, and genuine apps are served meanwhile."""
    wait_until(lambda: node.metric("wwwserve_http_connections") <= 1, what="no other connections")
    before = rejected(node, "header_timeout")
    socks = [connect(node, ATTACKER, timeout=1.0) for _ in range(40)]
    started = time.monotonic()
    try:
        for sock in socks:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        genuine_chat(node)
        open_ = dict(enumerate(socks))
        answered: list[int] = []

        def trickle() -> bool:
            """Read what the node sent to those it closed; one more header byte to the others."""
            readable = set(select.select(list(open_.values()), [], [], 0)[0])
            for i, sock in list(open_.items()):
                if sock in readable:
                    with contextlib.suppress(ConnectionResetError):
                        answered.append(read_response(sock)[0])
                    del open_[i]
            for sock in open_.values():
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(b"X")
            return not open_

        wait_until(trickle, timeout=60, interval=0.5, what="every slowloris connection closed")
        assert time.monotonic() - started >= 9.0  # not before the deadline (10 s from the connect)
        assert answered and set(answered) == {408}
        wait_until(lambda: rejected(node, "header_timeout") == before + len(socks), what="timeouts counted")
    finally:
        for sock in socks:
            sock.close()
    genuine_chat(node)


def test_one_source_cannot_take_every_connection(node: NodeProcess) -> None:
    """Past max_connections_per_source (default 256), a source's new connections are refused with
    429; another source is still served."""
    wait_until(lambda: node.metric("wwwserve_http_connections") <= 1, what="no other connections")
    before = rejected(node, "source_connections")
    socks: list[socket.socket] = []
    try:
        for _ in range(256):
            socks.append(connect(node, ATTACKER))
        for _ in range(5):
            with connect(node, ATTACKER) as extra:
                status, headers, body = read_response(extra)
                assert assert_openai_error(status, headers, body, 429)["code"] == "too_many_connections"
                assert headers["retry-after"] == "1"
        genuine_chat(node)
        assert rejected(node, "source_connections") == before + 5
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: node.metric("wwwserve_http_connections") <= 1, what="connections released")


def test_the_node_refuses_connections_beyond_its_cap(tight: NodeProcess) -> None:
    """max_connections (30 here) bounds connections from all sources together; the per-source cap
    (20 here) applies to each."""
    wait_until(lambda: tight.metric("wwwserve_http_connections") <= 1, what="no other connections")
    before = rejected(tight, "max_connections")
    socks: list[socket.socket] = []
    try:
        for source in ("127.0.0.2", "127.0.0.3"):  # 15 each: under the per-source cap, 30 in all
            socks += [connect(tight, source) for _ in range(15)]
        with connect(tight, "127.0.0.4") as extra:
            status, headers, body = read_response(extra)
        assert assert_openai_error(status, headers, body, 503)["code"] == "overloaded"
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: tight.metric("wwwserve_http_connections") <= 1, what="connections released")
    assert rejected(tight, "max_connections") >= before + 1
    genuine_chat(tight)


def test_header_and_body_deadlines(tight: NodeProcess) -> None:
    before = {r: rejected(tight, r) for r in ("header_timeout", "body_timeout")}
    with connect(tight, ATTACKER) as silent, connect(tight, ATTACKER) as half_body:
        started = time.monotonic()
        half_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        status, headers, body = read_response(silent)  # sent nothing at all
        assert assert_openai_error(status, headers, body, 408)["code"] == "timeout"
        assert 0.9 <= time.monotonic() - started
        status, headers, body = read_response(half_body)
        assert assert_openai_error(status, headers, body, 408)["code"] == "timeout"
        assert 1.4 <= time.monotonic() - started
        assert silent.recv(1) == b"" and half_body.recv(1) == b""  # and closed
    assert rejected(tight, "header_timeout") == before["header_timeout"] + 1
    assert rejected(tight, "body_timeout") == before["body_timeout"] + 1
    # A keep-alive connection that goes on sending whole requests is not cut off by the deadlines.
    with httpx.Client(base_url=tight.url, timeout=30) as client:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert rejected(tight, "header_timeout") == before["header_timeout"] + 1


def chat_on(sock: socket.socket) -> int:
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(BODY)}\r\n\r\n".encode()
        + BODY
    )
    return read_response(sock)[0]


def test_an_idle_keep_alive_connection_outlives_client_pools(node: NodeProcess, tight: NodeProcess) -> None:
    # httpx (the OpenAI SDK's client) drops an idle pooled connection after 5 s; a server that closed
    # it at the same moment (uvicorn's default) reset the request the client had just sent on it.
    with connect(node) as sock:
        assert chat_on(sock) == 200
        time.sleep(6.0)  # the idle time under test, past the 5 s both sides used to share
        assert chat_on(sock) == 200
    # The setting is what holds it open: at 1 s, the tight node closes an idle connection.
    with connect(tight) as sock:
        assert chat_on(sock) == 200
        started = time.monotonic()
        assert sock.recv(1) == b""
        assert 0.9 <= time.monotonic() - started < 8


def test_a_bad_limit_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    from wwwserve_gateway.config.loading import load_config
    from wwwserve_gateway.config.problems import ConfigError

    for node_section, key in [
        ({"header_timeout": 0}, "node.header_timeout"),
        ({"max_connections_per_source": 0}, "node.max_connections_per_source"),
        ({"overlay_stream_window_bytes": 1024}, "node.overlay_stream_window_bytes"),
        (
            {"overlay_stream_window_bytes": 8 << 20, "overlay_connection_window_bytes": 4 << 20},
            "node.overlay_connection_window_bytes",
        ),
    ]:
        path = tmp_path / "node.yaml"
        path.write_text(json.dumps({"node": node_section}))
        with pytest.raises(ConfigError) as raised:
            load_config(path)
        assert key in raised.value.render()


# -- 2. overlay admission: one source cannot hold it shut -------------------------------------------


async def test_half_open_overlay_handshakes_from_one_source_do_not_shut_out_a_peer(
    node: NodeProcess,
) -> None:
    """An attacker at 127.0.0.2 keeps 72 websocket handshakes open and silent, reopening each as the
    node closes it: more than the node's global cap (64). Only overlay_handshakes_per_source of them
    are admitted; a genuine peer from 127.0.0.1 joins meanwhile."""
    url = overlay_url("127.0.0.1", node.port)
    overlay_rejected = "wwwserve_overlay_rejected_total"
    before = {r: rejected(node, r, overlay_rejected) for r in ("source_overloaded", "handshake_timeout")}
    attempts = 0
    stop = asyncio.Event()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(ATTACKER, 0), limit=0))

    async def hold_one() -> None:
        """Open silent handshakes one after another until told to stop (at most 40)."""
        nonlocal attempts
        for _ in range(40):
            if stop.is_set():
                return
            try:
                ws = await session.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=1))
            except aiohttp.WSServerHandshakeError:  # refused at once: try again a little later
                attempts += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
                continue
            attempts += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):  # hold it until the node closes it
                    while not stop.is_set() and not ws.closed:
                        with contextlib.suppress(TimeoutError):
                            await ws.receive(timeout=0.5)
            await ws.close()

    attackers = [asyncio.create_task(hold_one()) for _ in range(72)]
    genuine = OverlayNode(network_id=NETWORK_ID)
    try:
        await until(lambda: attempts >= 72, within=60, what="the attack in place")
        assert await genuine.overlay.connect(url) == node.own_id()
        assert rejected(node, "source_overloaded", overlay_rejected) > before["source_overloaded"]
        # The attacker's silent handshakes are closed at the deadline, and counted.
        await until(
            lambda: rejected(node, "handshake_timeout", overlay_rejected) > before["handshake_timeout"],
            what="silent handshakes timed out",
        )
    finally:
        stop.set()
        await asyncio.gather(*attackers, return_exceptions=True)
        await session.close()
        await genuine.overlay.aclose()


# -- 5. an oversized frame is counted ---------------------------------------------------------------


async def test_a_5_mib_frame_is_refused_and_counted(node: NodeProcess) -> None:
    url = overlay_url("127.0.0.1", node.port)
    before = rejected(node, "oversized", "wwwserve_overlay_rejected_total")
    big = os.urandom(5 * 1024 * 1024)

    async def send_big(raw: RawPeer) -> None:
        # The node closes (1009) as soon as it reads the frame's length: the rest may not get out.
        with contextlib.suppress(ConnectionError):
            await raw.send(big)
            assert await raw.closed(within=30) == 1009

    async with RawPeer(url, network_id=NETWORK_ID) as raw:  # instead of a hello
        await send_big(raw)
    async with RawPeer(url, network_id=NETWORK_ID) as raw:  # after a correct handshake
        await raw.handshake()
        await send_big(raw)
    await until(
        lambda: rejected(node, "oversized", "wwwserve_overlay_rejected_total") == before + 2,
        what="both counted",
    )
    genuine_chat(node)


# -- 6. node state is private to its user ----------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_node_state_is_private(tmp_path: Path) -> None:
    node = NodeProcess({"node": {}}, tmp_path, "private")
    data = Path(node.config["node"]["data_dir"])
    node.start()
    try:
        wait_until(lambda: (data / "ledger.db").exists(), what="the ledger database")
    finally:
        node.stop()
    assert mode(data) == 0o700
    state = [p for p in data.rglob("*") if p.is_file()]
    assert {"identity.key", "ledger.db"} <= {p.name for p in state}
    assert {p.name: mode(p) for p in state} == {p.name: 0o600 for p in state}

    # An existing data dir that others can read is tightened on start, and the log says so.
    os.chmod(data, 0o755)
    os.chmod(data / "ledger.db", 0o644)
    (data / "logs").mkdir(mode=0o755, exist_ok=True)
    (data / "logs" / "old.log").write_text("x")
    os.chmod(data / "logs" / "old.log", 0o644)
    node.start()
    node.stop()
    assert mode(data) == 0o700 and mode(data / "ledger.db") == 0o600
    assert mode(data / "logs") == 0o700 and mode(data / "logs" / "old.log") == 0o600
    assert "tightened" in node.log()


# -- 1. overlay streams: flow control counts bytes --------------------------------------------------

ITEM_PAD = "x" * (100 * 1024)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[OverlayNode, OverlayNode]]:
    """a consumes what b produces."""
    a = await OverlayNode().start()
    b = await OverlayNode().start()
    a.overlay.learn(b.id, b.url)

    async def echo(peer_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return body

    a.overlay.on_request("echo", echo)
    b.overlay.on_request("echo", echo)
    yield a, b
    await a.stop()
    await b.stop()


def producer(node: OverlayNode, counts: dict[str, int]) -> None:
    async def endless(peer_id: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        for i in range(body.get("n", 10_000)):
            item = {"i": i, "pad": ITEM_PAD}
            counts["bytes"] += len(overlay_frames.encode(Frame("item", 1, "", item)))
            yield item

    node.overlay.on_stream("endless", endless)


async def test_a_stream_nobody_reads_leaves_at_most_its_window_queued(
    pair: tuple[OverlayNode, OverlayNode],
) -> None:
    a, b = pair
    counts = {"bytes": 0}
    producer(b, counts)
    stream = a.overlay.stream(b.id, "endless", {}, timeout=30)
    assert (await anext(stream))["i"] == 0  # then nobody reads
    sender = b.overlay.connection(a.id)
    receiver = a.overlay.connection(b.id)
    assert sender is not None and receiver is not None
    (inbound,) = receiver.streams.values()
    (credit,) = sender._credits.values()

    def blocked_and_delivered() -> bool:
        """The producer waits for the window, and all it sent has arrived."""
        return credit.waiting and inbound.received == inbound.granted - credit.available

    await until(blocked_and_delivered, what="the producer blocked")
    window = a.overlay.limits.stream_window
    item = len(overlay_frames.encode(Frame("item", 1, "", {"i": 10_000, "pad": ITEM_PAD})))
    # What the consumer's node holds unread: never more than the window (2 MiB), and nearly all of it...
    assert window - 2 * item < receiver.buffered_bytes <= window
    assert inbound.buffered == receiver.buffered_bytes
    assert a.registry.get_sample_value("wwwserve_overlay_buffered_bytes") == receiver.buffered_bytes
    # ... and the producer is at most the window plus the one item it waits to send ahead.
    assert counts["bytes"] - item <= window + item
    # Reading on resumes the producer, in order.
    assert [(await anext(stream))["i"] for _ in range(40)] == list(range(1, 41))
    await stream.aclose()
    await until(lambda: receiver.buffered_bytes == 0, what="dropped items given back")


async def test_the_connection_window_bounds_all_streams_and_spares_requests() -> None:
    a = await OverlayNode(
        max_frame_bytes=128 * 1024, stream_window=512 * 1024, connection_window=1 << 20
    ).start()
    b = await OverlayNode(max_frame_bytes=128 * 1024).start()
    counts = {"bytes": 0}
    producer(b, counts)
    got: list[str] = []

    async def on_ping(peer_id: str, body: dict[str, Any]) -> None:
        got.append(body["x"])

    async def echo(peer_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return body

    for node in (a, b):
        node.overlay.on_request("echo", echo)
    a.overlay.on_message("ping", on_ping)
    a.overlay.learn(b.id, b.url)
    try:
        # Four streams nobody reads: two fill the connection's window (1 MiB, 512 KiB each), and
        # the other two wait for it, not even their first item sent.
        streams = [a.overlay.stream(b.id, "endless", {"n": 40}, timeout=30) for _ in range(4)]
        firsts = [asyncio.ensure_future(anext(stream)) for stream in streams]
        await until(lambda: a.overlay.connection(b.id) and b.overlay.connection(a.id), what="connected")
        receiver, sender = a.overlay.connection(b.id), b.overlay.connection(a.id)
        assert receiver is not None and sender is not None
        window = sender._send_window

        def blocked_and_delivered() -> bool:
            """The producer waits for the connection's window, and all it sent has arrived."""
            return window.waiting and receiver._recv_total == receiver._recv_granted - window.available

        await until(blocked_and_delivered, what="the connection's window spent")
        assert len(receiver.streams) == 4
        assert 0 < receiver.buffered_bytes <= a.overlay.limits.connection_window
        assert all(s.buffered <= a.overlay.limits.stream_window for s in receiver.streams.values())
        # Requests and messages (gossip) on the same connection are not held up, both ways.
        for i in range(5):
            assert await a.overlay.request(b.id, "echo", {"i": i}, timeout=5) == {"i": i}
            assert await b.overlay.request(a.id, "echo", {"i": i}, timeout=5) == {"i": i}
            await b.overlay.send(a.id, "ping", {"x": str(i)}, timeout=5)
        await until(lambda: len(got) == 5, what="messages delivered")

        # Once read (each stream by its own reader, as apps do), every stream completes in order.
        async def rest(first: asyncio.Future[dict[str, Any]], stream: AsyncIterator[dict[str, Any]]) -> list:
            return [(await first)["i"]] + [item["i"] async for item in stream]

        assert await asyncio.gather(*map(rest, firsts, streams)) == [list(range(40))] * 4
        assert receiver.buffered_bytes == 0
    finally:
        await a.stop()
        await b.stop()


async def test_a_peer_that_overruns_the_connection_window_is_disconnected() -> None:
    node = await OverlayNode(
        max_frame_bytes=64 * 1024, stream_window=128 * 1024, connection_window=128 * 1024
    ).start()
    try:
        async with RawPeer(node.url) as raw:
            assert raw.channel is None
            channel = await raw.handshake()
            conn = node.overlay.connection(raw.identity.node_id)
            assert conn is not None
            streams = [node.overlay.stream(raw.identity.node_id, "feed", {}, timeout=10) for _ in range(2)]
            firsts = [asyncio.create_task(anext(s)) for s in streams]
            frames_in = [overlay_frames.decode(channel.open(await raw.recv())[0]) for _ in range(5)]
            opened = [f.s for f in frames_in if f.t == "open"]
            assert len(opened) == 2
            pad = "x" * (50 * 1024)
            # 2 x 100 KiB: each stream within its 128 KiB window, together beyond the connection's.
            for sid in opened:
                for i in range(2):
                    await raw.send(raw.seal(Frame("item", sid, "", {"i": i, "pad": pad})))
            assert await raw.closed() == CLOSE_FRAME_ERROR
            for first in firsts:
                with contextlib.suppress(PeerUnreachable):
                    await first
        assert node.rejected("malformed") == 1
    finally:
        await node.stop()
