"""The overlay: authenticated, encrypted, multiplexed connections between the nodes of one network.

One websocket per connected peer pair, at ws://host:port/overlay on each node's own HTTP port, opened
by whichever side needs it first and then used by both. Callers name peers by node id; the address
book (filled by gossip) says where to dial a peer that is not connected yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import structlog
from prometheus_client import CollectorRegistry
from starlette.websockets import WebSocket

from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.overlay import frames
from wwwserve_gateway.overlay.connection import (
    CLOSE_DUPLICATE,
    CLOSE_GOING_AWAY,
    CLOSE_HANDSHAKE_FAILED,
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_OVERLOADED,
    CLOSE_TIMEOUT_S,
    DEFAULT_CONNECTION_WINDOW,
    DEFAULT_STREAM_WINDOW,
    Handlers,
    Limits,
    MessageHandler,
    PeerConnection,
    RequestHandler,
    StreamHandler,
)
from wwwserve_gateway.overlay.errors import (
    REJECT_REASONS,
    ChannelError,
    FrameError,
    HandshakeError,
    PeerTimeout,
    PeerUnreachable,
)
from wwwserve_gateway.overlay.handshake import HandshakeResult, Initiator, Responder
from wwwserve_gateway.overlay.metrics import OverlayMetrics
from wwwserve_gateway.overlay.secure_channel import SecureChannel
from wwwserve_gateway.overlay.sockets import AiohttpSocket, MessageSocket, SocketClosed, StarletteSocket

log = structlog.get_logger(__name__)

PATH = "/overlay"
HEARTBEAT_S = 20.0
# How long a connection that lost a simultaneous-dial race keeps serving the calls already on it.
RETIRE_GRACE_S = 10.0

PeerCallback = Callable[[str, bool], None]


def overlay_url(host: str, port: int) -> str:
    """The overlay address of a node listening on host:port."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"ws://{host}:{port}{PATH}"


def _check_kind(kind: str) -> None:
    if not frames.valid_kind(kind):
        raise ValueError(f"a kind is 1-64 of A-Z a-z 0-9 _ . : / -, not {kind!r}")


class _Backoff:
    """Exponential backoff per address: a dial that failed is not retried before its delay passes."""

    def __init__(self, base: float, cap: float) -> None:
        self.base = base
        self.cap = cap
        self._state: dict[str, tuple[int, float]] = {}

    def remaining(self, key: str) -> float:
        until = self._state.get(key, (0, 0.0))[1]
        return max(0.0, until - time.monotonic())

    def failed(self, key: str) -> None:
        failures = self._state.get(key, (0, 0.0))[0] + 1
        delay = min(self.cap, self.base * 2 ** (failures - 1)) * random.uniform(0.8, 1.0)
        self._state[key] = (failures, time.monotonic() + delay)

    def succeeded(self, key: str) -> None:
        self._state.pop(key, None)


class Overlay:
    def __init__(
        self,
        identity: NodeIdentity,
        network_id: str,
        *,
        metrics: CollectorRegistry,
        max_frame_bytes: int = frames.DEFAULT_MAX_FRAME_BYTES,
        handshake_timeout: float = 5.0,
        queue_size: int = 64,
        max_inflight: int = 256,
        max_handshakes: int = 64,
        max_handshakes_per_source: int = 8,
        stream_window: int | None = None,
        connection_window: int | None = None,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        """`max_handshakes` handshakes may be pending at once, `max_handshakes_per_source` of them from
        one IP address, each for at most `handshake_timeout` s. A peer's streams may leave at most
        `stream_window` bytes of items unread here per stream, `connection_window` for all of them
        (defaults: 2 and 16 MiB, at least 2 and 16 frames)."""
        if max_frame_bytes < 1024 or queue_size < 1 or max_inflight < 1:
            raise ValueError("max_frame_bytes >= 1024, queue_size >= 1 and max_inflight >= 1")
        if max_handshakes < 1 or max_handshakes_per_source < 1 or handshake_timeout <= 0:
            raise ValueError("max_handshakes >= 1, max_handshakes_per_source >= 1 and handshake_timeout > 0")
        self.identity = identity
        self.node_id = identity.node_id
        self.network_id = network_id
        self.handshake_timeout = handshake_timeout
        self.max_handshakes = max_handshakes
        self.max_handshakes_per_source = max_handshakes_per_source
        stream_window = stream_window or max(DEFAULT_STREAM_WINDOW, 2 * max_frame_bytes)
        connection_window = connection_window or max(DEFAULT_CONNECTION_WINDOW, 16 * max_frame_bytes)
        self.limits = Limits(max_frame_bytes, queue_size, max_inflight, stream_window, connection_window)
        self.metrics = OverlayMetrics(metrics)
        self.metrics.buffered.set_function(lambda: sum(c.buffered_bytes for c in self._all))
        self.handlers = Handlers()
        self._conns: dict[str, PeerConnection] = {}
        self._all: set[PeerConnection] = set()
        self._book: dict[str, str] = {}
        self._url_peer: dict[str, str] = {}
        self._dials: dict[str, asyncio.Task[PeerConnection]] = {}
        self._dialling: dict[str, int] = {}
        self._backoff = _Backoff(backoff_base, backoff_max)
        self._callbacks: list[PeerCallback] = []
        self._readers: set[asyncio.Task[None]] = set()
        self._registered = asyncio.Event()
        self._handshaking = 0
        self._handshaking_from: dict[str, int] = {}  # pending handshakes by source address
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    # -- handlers --------------------------------------------------------------------------------

    def on_request(self, kind: str, handler: RequestHandler) -> None:
        """Answer requests of `kind`: handler(peer_id, body) -> response body."""
        _check_kind(kind)
        self.handlers.requests[kind] = handler

    def on_stream(self, kind: str, handler: StreamHandler) -> None:
        """Answer streams of `kind`: handler(peer_id, body) is an async iterator of items."""
        _check_kind(kind)
        self.handlers.streams[kind] = handler

    def on_message(self, kind: str, handler: MessageHandler) -> None:
        """Take fire-and-forget messages of `kind`: handler(peer_id, body)."""
        _check_kind(kind)
        self.handlers.messages[kind] = handler

    def on_peer_change(self, callback: PeerCallback) -> None:
        """callback(peer_id, connected) when a peer's connection is established or lost."""
        self._callbacks.append(callback)

    # -- peers -----------------------------------------------------------------------------------

    def learn(self, peer_id: str, url: str) -> None:
        """Record where `peer_id` listens (its ws:// or wss:// overlay URL)."""
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"an overlay URL is ws:// or wss://, not {url!r}")
        if peer_id != self.node_id:
            self._book[peer_id] = url

    def address(self, peer_id: str) -> str | None:
        return self._book.get(peer_id)

    def connected(self) -> list[str]:
        return sorted(p for p, c in self._conns.items() if c.usable)

    def connection(self, peer_id: str) -> PeerConnection | None:
        """The live connection to `peer_id`, if any (for inspection)."""
        conn = self._conns.get(peer_id)
        return conn if conn is not None and conn.usable else None

    async def connect(self, url: str, expected_id: str | None = None) -> str:
        """Connect to the node at `url` (or reuse the connection to it) and return its node id."""
        # A dial ends within handshake_timeout on its own; the margin lets it report why it failed.
        deadline = time.monotonic() + self.handshake_timeout + CLOSE_TIMEOUT_S
        conn = await self._connect(url, expected_id, deadline)
        self._book.setdefault(conn.peer_id, url)
        return conn.peer_id

    async def disconnect(self, peer_id: str) -> None:
        conn = self._conns.get(peer_id)
        if conn is not None:
            await conn.aclose(reason="disconnect")

    def drop(self, peer_id: str, reason: str) -> None:
        """Give up on a peer now (membership found it gone): its calls and streams fail at once,
        and the next call dials it again."""
        conn = self._conns.get(peer_id)
        if conn is not None:
            conn.abort(reason)

    # -- calls -----------------------------------------------------------------------------------

    # The calls take a per-message `timeout` (hence ASYNC109): on expiry the peer is told to cancel.
    async def request(
        self,
        peer_id: str,
        kind: str,
        body: dict[str, Any],
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """One request and its response. `timeout` covers dialling (if needed) and the answer; on
        timeout or cancellation the peer's handler is cancelled."""
        _check_kind(kind)
        deadline = time.monotonic() + timeout
        conn = await self._ensure(peer_id, deadline)
        return await conn.request(kind, body, self._left(deadline, peer_id))

    async def stream(
        self,
        peer_id: str,
        kind: str,
        body: dict[str, Any],
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> AsyncIterator[dict[str, Any]]:
        """The items of a server-streamed response. `timeout` bounds opening and each wait for an
        item. Leaving the loop early, aclose(), a timeout or cancellation cancel the peer's handler."""
        _check_kind(kind)
        deadline = time.monotonic() + timeout
        conn = await self._ensure(peer_id, deadline)
        try:
            async with asyncio.timeout(self._left(deadline, peer_id)):
                opened = await conn.open_stream(kind, body)
        except TimeoutError:
            raise PeerTimeout(f"{kind} to {peer_id[:16]}: could not open within {timeout:g} s") from None
        try:
            while (item := await opened.next(timeout)) is not None:
                yield item
        finally:
            opened.cancel()

    async def send(
        self,
        peer_id: str,
        kind: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        """Fire-and-forget: returns once the message is queued on the connection."""
        _check_kind(kind)
        timeout = self.handshake_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        conn = await self._ensure(peer_id, deadline)
        try:
            async with asyncio.timeout(self._left(deadline, peer_id)):
                await conn.send_message(kind, body)
        except TimeoutError:
            raise PeerTimeout(f"{kind} to {peer_id[:16]}: send queue full for {timeout:g} s") from None

    @staticmethod
    def _left(deadline: float, peer_id: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerTimeout(f"{peer_id[:16]}: timed out while connecting")
        return left

    # -- accepting -------------------------------------------------------------------------------

    async def websocket_endpoint(self, websocket: WebSocket) -> None:
        """The /overlay websocket route: handshake, then serve the connection until it closes.

        Admission is bounded so that idle sockets cannot hold it shut: at most `max_handshakes`
        pending at once, `max_handshakes_per_source` of them from one address, each for at most
        `handshake_timeout` s. Beyond a cap the upgrade is refused (HTTP 403) before it is accepted."""
        if self._closed:
            await websocket.close(CLOSE_GOING_AWAY)
            return
        source = websocket.client.host if websocket.client is not None else ""
        if self._handshaking >= self.max_handshakes:
            self.metrics.reject("overloaded")
            await websocket.close(CLOSE_OVERLOADED)
            return
        if self._handshaking_from.get(source, 0) >= self.max_handshakes_per_source:
            self.metrics.reject("source_overloaded")
            await websocket.close(CLOSE_OVERLOADED)
            return
        sock = StarletteSocket(websocket)
        self._handshaking += 1
        self._handshaking_from[source] = self._handshaking_from.get(source, 0) + 1
        try:
            async with asyncio.timeout(self.handshake_timeout):
                await websocket.accept()
                conn = await self._respond(sock)
        except TimeoutError:
            self._refuse("handshake_timeout", "the handshake did not finish in time")
            await _close(sock, CLOSE_HANDSHAKE_TIMEOUT, "handshake_timeout")
            return
        except (HandshakeError, FrameError) as exc:
            self._refuse(exc.reason, str(exc))
            code = CLOSE_DUPLICATE if exc.reason == "duplicate" else CLOSE_HANDSHAKE_FAILED
            await _close(sock, code, exc.reason)
            return
        except SocketClosed:
            return
        finally:
            self._handshaking -= 1
            left = self._handshaking_from.pop(source) - 1
            if left:
                self._handshaking_from[source] = left
        await conn.run()

    async def _respond(self, sock: MessageSocket) -> PeerConnection:
        responder = Responder(self.identity, self.network_id)
        await sock.send(responder.on_hello(await sock.recv()))
        result = responder.on_finish(await sock.recv())
        self._admit(result.peer_id)
        conn = self._new_connection(sock, result)
        conn.start(ready=True)
        self._register(conn)
        return conn

    def _refuse(self, reason: str, message: str) -> None:
        self.metrics.reject(reason)
        # Losing a simultaneous-dial race is routine; everything else deserves attention.
        level = log.info if reason == "duplicate" else log.warning
        level("overlay handshake refused", reason=reason, error=message)

    def _admit(self, peer_id: str) -> None:
        """Refuse a second connection from a peer, except the loser of a simultaneous-dial race.

        When both nodes dial each other at once, the connection the smaller node id opened wins on
        both sides; the other is refused or retired. A new connection from a peer that already has a
        live one is refused (it must use that one)."""
        existing = self._live(peer_id)
        if existing is not None and existing.initiator_id == peer_id:
            raise HandshakeError("duplicate", f"{peer_id[:16]} is already connected")
        racing = self._dialling.get(peer_id, 0) > 0 or (
            existing is not None and time.monotonic() - existing.established_at <= self.handshake_timeout
        )
        if existing is not None and not racing:
            raise HandshakeError("duplicate", f"{peer_id[:16]} is already connected")
        if racing and not peer_id < self.node_id:
            raise HandshakeError("duplicate", f"our own connection to {peer_id[:16]} wins the race")

    # -- dialling --------------------------------------------------------------------------------

    async def _ensure(self, peer_id: str, deadline: float) -> PeerConnection:
        conn = self._live(peer_id)
        if conn is not None:
            return conn
        url = self._book.get(peer_id)
        if url is None:
            raise PeerUnreachable(f"no address known for {peer_id[:16]}")
        return await self._connect(url, peer_id, deadline)

    async def _connect(self, url: str, expected_id: str | None, deadline: float) -> PeerConnection:
        if self._closed:
            raise PeerUnreachable("the overlay is closed")
        if expected_id == self.node_id:
            raise PeerUnreachable("a node does not connect to itself")
        reused = self._reusable(url, expected_id)
        if reused is not None:
            return reused
        task = self._dials.get(url)
        if task is None:
            wait = self._backoff.remaining(url)
            if wait > 0:
                if wait >= deadline - time.monotonic():
                    raise PeerUnreachable(f"{url} failed recently; next attempt in {wait:.2f} s")
                await asyncio.sleep(wait)
                reused = self._reusable(url, expected_id)
                if reused is not None:
                    return reused
                task = self._dials.get(url)
        if task is None:
            task = asyncio.create_task(self._dial(url, expected_id), name=f"overlay-dial-{url}")
            self._dials[url] = task
            task.add_done_callback(lambda t: self._dialled(url, t))
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                conn = await asyncio.shield(task)
        except TimeoutError:
            raise PeerTimeout(f"connecting to {url} took too long") from None
        if expected_id is not None and conn.peer_id != expected_id:
            raise HandshakeError("identity_mismatch", f"{url} is {conn.peer_id[:16]}, not {expected_id[:16]}")
        return conn

    def _reusable(self, url: str, expected_id: str | None) -> PeerConnection | None:
        peer_id = expected_id or self._url_peer.get(url)
        return None if peer_id is None else self._live(peer_id)

    def _dialled(self, url: str, task: asyncio.Task[PeerConnection]) -> None:
        if self._dials.get(url) is task:
            del self._dials[url]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self._backoff.succeeded(url)
            self._url_peer[url] = task.result().peer_id
        else:
            self._backoff.failed(url)

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session

    async def _dial(self, url: str, expected_id: str | None) -> PeerConnection:
        initiator = Initiator(self.identity, self.network_id, expected_id=expected_id)
        marked: list[str] = []
        sock: AiohttpSocket | None = None

        def mark(peer_id: str) -> None:
            self._dialling[peer_id] = self._dialling.get(peer_id, 0) + 1
            marked.append(peer_id)

        if expected_id is not None:
            mark(expected_id)
        deadline = time.monotonic() + self.handshake_timeout
        try:
            try:
                async with asyncio.timeout_at(_loop_time(deadline)):
                    ws = await self._client_session().ws_connect(
                        url,
                        max_msg_size=2 * self.limits.max_frame_bytes,
                        heartbeat=HEARTBEAT_S,
                        timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S),
                    )
                    sock = AiohttpSocket(ws)
                    result, channel = await self._initiate(
                        sock, initiator, mark if expected_id is None else None
                    )
            except TimeoutError:
                if sock is None:
                    raise PeerUnreachable(f"cannot reach {url}: connect timed out") from None
                self._refuse("handshake_timeout", f"{url} did not finish the handshake")
                raise HandshakeError("handshake_timeout", f"{url} did not finish the handshake") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise PeerUnreachable(f"cannot reach {url}: {exc}") from None
            except (HandshakeError, FrameError, ChannelError) as exc:
                self._refuse(exc.reason, str(exc))
                raise HandshakeError(exc.reason, f"{url}: {exc}") from None
            except SocketClosed as exc:
                winner = await self._refused(exc, initiator.peer_id, deadline)
                if winner is not None:
                    return winner
                reason = exc.reason if exc.reason in REJECT_REASONS else "refused"
                raise HandshakeError(reason, f"{url} closed the handshake ({exc.code})") from None
        except BaseException:
            if sock is not None:
                await _close(sock, CLOSE_HANDSHAKE_FAILED, "")
            raise
        finally:
            for peer_id in marked:
                self._dialling[peer_id] -= 1
                if not self._dialling[peer_id]:
                    del self._dialling[peer_id]
        conn = self._new_connection(sock, result, channel)
        conn.start()
        reader = asyncio.create_task(conn.run(), name=f"overlay-reader-{conn.peer_id[:8]}")
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        return self._register(conn)

    async def _initiate(
        self, sock: AiohttpSocket, initiator: Initiator, mark: Callable[[str], None] | None
    ) -> tuple[HandshakeResult, SecureChannel]:
        await sock.send(initiator.hello())
        finish, result = initiator.on_welcome(await sock.recv())
        if mark is not None:
            mark(result.peer_id)
        await sock.send(finish)
        channel = SecureChannel(result.tx_key, result.rx_key)
        first = await sock.recv()
        if len(first) > self.limits.max_frame_bytes:
            raise FrameError("oversized", f"a {len(first)}-byte frame")
        plaintext, final = channel.open(first)
        if final or frames.decode(plaintext).t != "ready":
            raise FrameError("malformed", "the responder's first frame is not ready")
        return result, channel

    async def _refused(
        self, exc: SocketClosed, peer_id: str | None, deadline: float
    ) -> PeerConnection | None:
        """After a `duplicate` refusal, the peer's own connection (which won the race) if it arrives."""
        if exc.code != CLOSE_DUPLICATE or peer_id is None:
            return None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(_loop_time(deadline)):
                while (conn := self._live(peer_id)) is None:
                    event = self._registered
                    await event.wait()
                return conn
        return None

    # -- the connection table --------------------------------------------------------------------

    def _new_connection(
        self, sock: MessageSocket, result: HandshakeResult, channel: SecureChannel | None = None
    ) -> PeerConnection:
        return PeerConnection(
            sock,
            channel or SecureChannel(result.tx_key, result.rx_key),
            local_id=self.node_id,
            peer_id=result.peer_id,
            initiator=result.initiator,
            handlers=self.handlers,
            metrics=self.metrics,
            limits=self.limits,
            on_closed=self._closed_connection,
        )

    def _live(self, peer_id: str) -> PeerConnection | None:
        conn = self._conns.get(peer_id)
        return conn if conn is not None and conn.usable else None

    def _register(self, conn: PeerConnection) -> PeerConnection:
        """Make `conn` the peer's connection, or keep the existing one; returns the one kept."""
        self._all.add(conn)
        peer_id = conn.peer_id
        existing = self._live(peer_id)
        if existing is None:
            self._conns[peer_id] = conn
            self._changed(peer_id, True)
            return conn
        winner = min(self.node_id, peer_id)
        if conn.initiator_id == winner and existing.initiator_id != winner:
            self._conns[peer_id] = conn
            existing.retire(RETIRE_GRACE_S)
            self._wake()
            return conn
        conn.retire(RETIRE_GRACE_S)
        return existing

    def _closed_connection(self, conn: PeerConnection) -> None:
        self._all.discard(conn)
        if self._conns.get(conn.peer_id) is conn:
            del self._conns[conn.peer_id]
            self._changed(conn.peer_id, False)

    def _changed(self, peer_id: str, connected: bool) -> None:
        self.metrics.connections.set(len(self._conns))
        log.info("overlay peer " + ("connected" if connected else "disconnected"), peer=peer_id[:16])
        for callback in self._callbacks:
            try:
                callback(peer_id, connected)
            except Exception:
                log.exception("peer-change callback failed", peer=peer_id[:16])
        if connected:
            self._wake()

    def _wake(self) -> None:
        self._registered.set()
        self._registered = asyncio.Event()

    async def aclose(self) -> None:
        """Close every connection (each peer sees a clean end) and stop dialling."""
        self._closed = True
        for task in list(self._dials.values()):
            task.cancel()
        await asyncio.gather(*self._dials.values(), return_exceptions=True)
        conns = list(self._all)
        await asyncio.gather(
            *(c.aclose(CLOSE_GOING_AWAY, "shutting down") for c in conns), return_exceptions=True
        )
        for conn in conns:
            conn.cancel_messages()
        if self._readers:
            await asyncio.wait(list(self._readers), timeout=CLOSE_TIMEOUT_S)
        for task in list(self._readers):
            task.cancel()
        if self._session is not None:
            await self._session.close()


def _loop_time(deadline: float) -> float:
    """A time.monotonic() deadline on the event loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


async def _close(sock: MessageSocket, code: int, reason: str) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await sock.close(code, reason)
