"""One established, encrypted overlay connection to a peer, multiplexing calls in both directions.

A reader (run()) opens, decodes and dispatches every frame without ever waiting, so one slow
consumer cannot stall the connection: calls of the peer run as their own tasks (at most
`max_inflight` at once; more are answered `busy`), answers complete futures, and stream items go
into the stream's own queue. Streams are flow-controlled in bytes, per stream and per connection:
the consumer grants `more` bytes as it takes items, and a producer sends an item only while it fits
both windows, so what a consumer holds unread is bounded by `stream_window` per stream and
`connection_window` for all streams on the connection. A slow consumer slows its producer, never
the connection's requests and messages, which are not flow-controlled. Every frame leaves through
one bounded send queue drained by one writer task, which seals frames in queue order; when the peer
stops reading, the queue fills and senders wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from wwwserve_gateway.overlay import frames
from wwwserve_gateway.overlay.errors import (
    ChannelError,
    FrameError,
    OverlayError,
    PeerTimeout,
    PeerUnreachable,
    RemoteError,
)
from wwwserve_gateway.overlay.frames import Frame
from wwwserve_gateway.overlay.metrics import OverlayMetrics
from wwwserve_gateway.overlay.secure_channel import OVERHEAD, SecureChannel
from wwwserve_gateway.overlay.sockets import MessageSocket, SocketClosed

log = structlog.get_logger(__name__)

RequestHandler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
StreamHandler = Callable[[str, dict[str, Any]], AsyncIterator[dict[str, Any]]]
MessageHandler = Callable[[str, dict[str, Any]], Awaitable[None]]

# Websocket close codes the overlay uses (4000-4999 are private to applications).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
CLOSE_HANDSHAKE_FAILED = 4000
CLOSE_HANDSHAKE_TIMEOUT = 4001
CLOSE_FRAME_ERROR = 4002
CLOSE_OVERLOADED = 4003
CLOSE_DUPLICATE = 4009
CLOSE_SUPERSEDED = 4010

CLOSE_TIMEOUT_S = 1.0
MAX_ERROR_MESSAGE = 1000


@dataclass
class Handlers:
    """The node's handlers by kind, shared by all its connections."""

    requests: dict[str, RequestHandler] = field(default_factory=dict)
    streams: dict[str, StreamHandler] = field(default_factory=dict)
    messages: dict[str, MessageHandler] = field(default_factory=dict)


DEFAULT_STREAM_WINDOW = 2 * frames.DEFAULT_MAX_FRAME_BYTES
DEFAULT_CONNECTION_WINDOW = 16 * frames.DEFAULT_MAX_FRAME_BYTES


@dataclass(frozen=True)
class Limits:
    """What one connection may cost this node."""

    max_frame_bytes: int = frames.DEFAULT_MAX_FRAME_BYTES
    queue_size: int = 64  # frames waiting in the send queue
    max_inflight: int = 256  # the peer's calls running at once
    stream_window: int = DEFAULT_STREAM_WINDOW  # bytes of one stream's items held unread
    connection_window: int = DEFAULT_CONNECTION_WINDOW  # the same, all streams of the connection

    def __post_init__(self) -> None:
        # A consumer grants what it took once it has taken half a stream window (grant_bytes); the
        # other half must hold the largest item, or a producer could wait for a grant that never comes.
        if self.stream_window < 2 * self.max_frame_bytes:
            raise ValueError("stream_window must be at least twice max_frame_bytes")
        if self.connection_window < self.stream_window:
            raise ValueError("connection_window must be at least stream_window")

    @property
    def grant_bytes(self) -> int:
        """Bytes a consumer takes before it grants them back (per stream, and per connection)."""
        return self.stream_window // 2


class _QueueClosed(Exception):
    pass


_FINAL = object()


class SendQueue:
    """A bounded FIFO of sealed-frame payloads that can be closed, waking everyone who waits on it."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[Any] = deque()
        self._not_full = asyncio.Event()
        self._not_full.set()
        self._not_empty = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: Any) -> None:
        while len(self._items) >= self.maxsize and not self._closed:
            self._not_full.clear()
            await self._not_full.wait()
        self.put_nowait(item, force=True)

    def put_nowait(self, item: Any, *, force: bool = False) -> bool:
        """Queue `item` unless the queue is full (and not forced); False if it was not queued."""
        if self._closed:
            raise _QueueClosed
        if len(self._items) >= self.maxsize and not force:
            return False
        self._items.append(item)
        self._not_empty.set()
        return True

    async def get(self) -> Any:
        while not self._items:
            if self._closed:
                raise _QueueClosed
            self._not_empty.clear()
            await self._not_empty.wait()
        item = self._items.popleft()
        if len(self._items) < self.maxsize:
            self._not_full.set()
        return item

    def close(self) -> None:
        self._closed = True
        self._items.clear()
        self._not_full.set()
        self._not_empty.set()


class _Credit:
    """Bytes the peer lets us send: on one stream it consumes, or on the whole connection.

    take(n) waits until n bytes are available; waiters are served in arrival order, so small items
    cannot starve a large one."""

    def __init__(self) -> None:
        self.available = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> bool:
        """Whether a sender waits for the peer to grant more."""
        return any(not future.done() for _, future in self._waiters)

    def grant(self, n: int) -> None:
        if self.available + n > frames.MAX_WINDOW:
            raise FrameError("malformed", "flow-control window overflow")
        self.available += n
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            need, future = self._waiters[0]
            if future.done():  # its taker was cancelled
                self._waiters.popleft()
                continue
            if need > self.available:
                return
            self._waiters.popleft()
            self.available -= need
            future.set_result(None)

    async def take(self, n: int) -> None:
        if not self._waiters and self.available >= n:
            self.available -= n
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((n, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted as we were cancelled: give it back
                self.available += n
                self._wake()
            raise


_END = object()


class InboundStream:
    """The consumer's end of a stream this node opened: items wait here until taken.

    The peer may send only the bytes granted: `window` at the start, then what the consumer takes,
    granted back every `grant_every` bytes. So at most `window` bytes of items wait here."""

    def __init__(self, conn: PeerConnection, sid: int, window: int, grant_every: int) -> None:
        self.conn = conn
        self.sid = sid
        self.window = window
        self.done = False
        self._queue: asyncio.Queue[Any] = asyncio.Queue()  # (item, size)s, then the end: bounded in bytes
        self.granted = 0  # bytes of items the peer may send in all
        self.received = 0
        self.buffered = 0  # bytes received and not yet taken
        self._taken = 0  # bytes taken since the last grant
        self._grant_every = grant_every

    def deliver(self, item: dict[str, Any], size: int) -> None:
        if self.received + size > self.granted:
            raise FrameError("malformed", f"stream {self.sid}: an item beyond the granted window")
        self.received += size
        self.buffered += size
        self._queue.put_nowait((item, size))

    def finish(self, outcome: BaseException | None) -> None:
        self._queue.put_nowait(_END if outcome is None else outcome)

    async def next(self, wait_s: float) -> dict[str, Any] | None:
        """The next item (waiting at most `wait_s`), or None at the end of the stream."""
        if self.done:
            return None
        if self._queue.empty():
            try:
                async with asyncio.timeout(wait_s):
                    entry = await self._queue.get()
            except TimeoutError:
                self.cancel()
                raise PeerTimeout(f"stream {self.sid}: no item within {wait_s:g} s") from None
        else:
            entry = self._queue.get_nowait()
        if entry is _END:
            self.done = True
            return None
        if isinstance(entry, BaseException):
            self.done = True
            raise entry
        item, size = entry
        self.buffered -= size
        self._taken += size
        if self._taken >= self._grant_every and self.sid in self.conn.streams:
            self.grant(self._taken)
            self._taken = 0
        self.conn.release(size)
        return item

    def grant(self, n: int) -> None:
        """Let the peer send `n` more bytes of items on this stream."""
        self.granted += n
        self.conn.send_control(Frame("more", self.sid, "", {"n": n}))

    def cancel(self) -> None:
        """Stop the stream here and tell the peer to stop its handler."""
        if self.done:
            return
        self.done = True
        if self.buffered:  # items nobody will take: the connection's window gets them back
            self.conn.release(self.buffered)
            self.buffered = 0
        if self.conn.streams.pop(self.sid, None) is not None:
            self.conn.send_control(Frame("cancel", self.sid))
        self.conn.check_idle()


def _error(sid: int, type_: str, message: str) -> Frame:
    return Frame("err", sid, "", {"message": message[:MAX_ERROR_MESSAGE], "type": type_})


class PeerConnection:
    def __init__(
        self,
        sock: MessageSocket,
        channel: SecureChannel,
        *,
        local_id: str,
        peer_id: str,
        initiator: bool,
        handlers: Handlers,
        metrics: OverlayMetrics,
        limits: Limits,
        on_closed: Callable[[PeerConnection], None] = lambda conn: None,
    ) -> None:
        self.sock = sock
        self.channel = channel
        self.peer_id = peer_id
        self.initiator = initiator
        self.initiator_id = local_id if initiator else peer_id
        self.established_at = time.monotonic()
        self.handlers = handlers
        self.metrics = metrics
        self.limits = limits
        self.on_closed = on_closed
        self.closed = asyncio.Event()
        self.close_reason = ""
        self.retiring = False
        self.streams: dict[int, InboundStream] = {}
        self._next_sid = 1 if initiator else 2
        self._outq = SendQueue(limits.queue_size)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._serving: dict[int, asyncio.Task[None]] = {}
        self._credits: dict[int, _Credit] = {}
        # Flow control of the whole connection: what the peer lets us send (all our streams)...
        self._send_window = _Credit()
        # ... and what we let it send: granted in all, received in all, held unread, taken since
        # the last grant.
        self._recv_granted = 0
        self._recv_total = 0
        self.buffered_bytes = 0
        self._recv_taken = 0
        self._messages: set[asyncio.Task[None]] = set()
        self._spare: set[asyncio.Task[Any]] = set()
        self._writer: asyncio.Task[None] | None = None
        self._closers: set[asyncio.Task[None]] = set()  # socket closes after an abort
        self._closing = False
        self._idle = asyncio.Event()

    def __repr__(self) -> str:
        return f"<PeerConnection {self.peer_id[:12]} initiator={self.initiator_id[:12]}>"

    @property
    def usable(self) -> bool:
        return not (self.closed.is_set() or self._closing or self.retiring)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, *, ready: bool = False) -> None:
        """Start the writer; the responder first sends `ready`, which admits the initiator."""
        if ready:
            self.send_control(Frame("ready"))
        self._grant_connection(self.limits.connection_window)
        self._writer = asyncio.create_task(self._write_loop(), name=f"overlay-writer-{self.peer_id[:8]}")

    async def run(self) -> None:
        """Read and dispatch frames until the connection closes."""
        try:
            while not self.closed.is_set():
                data = await self.sock.recv()
                if len(data) > self.limits.max_frame_bytes:
                    raise FrameError(
                        "oversized", f"a {len(data)}-byte frame (limit {self.limits.max_frame_bytes})"
                    )
                plaintext, final = self.channel.open(data)
                if final:
                    self._shutdown("closed by the peer")
                    await self._close_socket(CLOSE_NORMAL, "")
                    return
                frame = frames.decode(plaintext)
                self.metrics.received.labels(frame.t).inc()
                self._dispatch(frame, len(plaintext))
        except SocketClosed as exc:
            self._shutdown(f"connection lost ({exc.code} {exc.reason})".strip())
        except (FrameError, ChannelError) as exc:
            if not self.closed.is_set():
                self.metrics.reject(exc.reason)
                log.warning(
                    "overlay frame refused", peer=self.peer_id[:16], reason=exc.reason, error=str(exc)
                )
            self._shutdown(f"frame refused: {exc.reason}")
            await self._close_socket(CLOSE_FRAME_ERROR, exc.reason)
        except asyncio.CancelledError:
            self._shutdown("reader cancelled")
            await self._close_socket(CLOSE_GOING_AWAY, "")
            raise
        except Exception:  # a bug here must cost this connection only
            log.exception("overlay connection failed", peer=self.peer_id[:16])
            self._shutdown("internal error")
            await self._close_socket(CLOSE_INTERNAL_ERROR, "")

    def abort(self, reason: str) -> None:
        """Drop the connection now, without flushing: its calls and streams fail at once (used
        when the peer is known to be gone, e.g. frozen)."""
        if self.closed.is_set():
            return
        self._shutdown(reason)
        task = asyncio.get_running_loop().create_task(self._close_socket(CLOSE_NORMAL, reason))
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    async def aclose(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Flush what is queued, end our direction (secretstream FINAL) and close the socket."""
        if self._closing or self.closed.is_set():
            await self._close_socket(code, reason)
            return
        self._closing = True
        with contextlib.suppress(_QueueClosed):
            self._outq.put_nowait(_FINAL, force=True)
        writer = self._writer
        try:
            if writer is not None and writer is not asyncio.current_task():
                await asyncio.wait({writer}, timeout=CLOSE_TIMEOUT_S)
        finally:
            self._shutdown(reason or "closed")
        await self._close_socket(code, reason)

    def retire(self, grace: float) -> None:
        """Take no new calls from this side; close once the calls in flight end (or after `grace` s)."""
        if self.retiring or self.closed.is_set():
            return
        self.retiring = True
        task = asyncio.create_task(self._close_when_idle(grace))
        self._spare.add(task)
        task.add_done_callback(self._spare.discard)

    async def _close_when_idle(self, grace: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while not self._is_idle():
                    self._idle.clear()
                    await self._idle.wait()
        await self.aclose(CLOSE_SUPERSEDED, "superseded")

    def cancel_messages(self) -> None:
        for task in self._messages:
            task.cancel()

    def _is_idle(self) -> bool:
        return not (self._pending or self.streams or self._serving) or self.closed.is_set()

    def check_idle(self) -> None:
        if self._is_idle():
            self._idle.set()

    def _shutdown(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        self._idle.set()
        self._outq.close()
        error = PeerUnreachable(f"connection to {self.peer_id[:16]} closed: {reason}")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        for stream in self.streams.values():
            stream.finish(error)
        self.streams.clear()
        # Calls of the peer are cancelled (nobody is left to answer); fire-and-forget messages
        # already taken finish on their own (the overlay cancels them when it closes).
        current = asyncio.current_task()
        for task in [*self._serving.values(), self._writer]:
            if task is not None and task is not current:
                task.cancel()
        self.on_closed(self)

    async def _close_socket(self, code: int, reason: str) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.sock.close(code, reason)

    # -- sending ---------------------------------------------------------------------------------

    def _encode(self, frame: Frame) -> bytes:
        data = frames.encode(frame)
        if len(data) + OVERHEAD > self.limits.max_frame_bytes:
            raise FrameError("oversized", f"a {frame.t} frame of {len(data)} bytes is over the frame limit")
        return data

    async def send_frame(self, frame: Frame) -> None:
        """Queue a frame, waiting while the send queue is full; PeerUnreachable once closed."""
        self._check_open()
        await self._queue_frame(self._encode(frame), frame.t)

    def _check_open(self) -> None:
        if self._closing or self.closed.is_set():
            raise PeerUnreachable(f"connection to {self.peer_id[:16]} is closed")

    async def _queue_frame(self, data: bytes, t: str) -> None:
        try:
            await self._outq.put(data)
        except _QueueClosed:
            raise PeerUnreachable(f"connection to {self.peer_id[:16]} is closed") from None
        self.metrics.sent.labels(t).inc()

    async def _send_item(self, sid: int, item: dict[str, Any], credit: _Credit) -> None:
        """Send one item of a stream we serve, once it fits the stream's window and the connection's."""
        self._check_open()
        data = self._encode(Frame("item", sid, "", item))
        await credit.take(len(data))
        await self._send_window.take(len(data))
        await self._queue_frame(data, "item")

    def send_control(self, frame: Frame, *, droppable: bool = False) -> None:
        """Queue a small control frame without waiting (a droppable one is dropped when full)."""
        if self._closing or self.closed.is_set():
            return
        try:
            queued = self._outq.put_nowait(self._encode(frame), force=not droppable)
        except _QueueClosed:
            return
        if queued:
            self.metrics.sent.labels(frame.t).inc()

    async def _write_loop(self) -> None:
        try:
            while True:
                item = await self._outq.get()
                if item is _FINAL:
                    await self.sock.send(self.channel.seal(b"", final=True))
                    return
                await self.sock.send(self.channel.seal(item))
        except _QueueClosed:
            return
        except SocketClosed as exc:
            self._shutdown(f"send failed ({exc.code})")

    # -- calls from this side --------------------------------------------------------------------

    def _new_sid(self) -> int:
        sid = self._next_sid
        self._next_sid += 2
        return sid

    def _mine(self, sid: int) -> bool:
        return (sid % 2 == 1) == self.initiator

    async def request(self, kind: str, body: dict[str, Any], wait_s: float) -> dict[str, Any]:
        sid = self._new_sid()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[sid] = future
        sent = False
        try:
            async with asyncio.timeout(wait_s):
                await self.send_frame(Frame("req", sid, kind, body))
                sent = True
                return await future
        except TimeoutError:
            raise PeerTimeout(f"{kind} to {self.peer_id[:16]}: no answer within {wait_s:g} s") from None
        finally:
            # Still pending (the reader removes answered ones): timed out or cancelled here, so
            # stop the handler there. (The future itself is cancelled with the awaiting task.)
            if self._pending.pop(sid, None) is not None and sent:
                self.send_control(Frame("cancel", sid))
            if not future.done():
                future.cancel()
            self.check_idle()

    async def open_stream(self, kind: str, body: dict[str, Any]) -> InboundStream:
        sid = self._new_sid()
        stream = InboundStream(self, sid, self.limits.stream_window, self.limits.grant_bytes)
        self.streams[sid] = stream
        try:
            await self.send_frame(Frame("open", sid, kind, body))
        except BaseException:
            self.streams.pop(sid, None)
            self.check_idle()
            raise
        stream.grant(stream.window)
        return stream

    async def send_message(self, kind: str, body: dict[str, Any]) -> None:
        await self.send_frame(Frame("msg", 0, kind, body))

    # -- flow control of what the peer sends us ---------------------------------------------------

    def _grant_connection(self, n: int) -> None:
        self._recv_granted += n
        self.send_control(Frame("more", 0, "", {"n": n}))

    def release(self, size: int) -> None:
        """`size` bytes of stream items were taken (or dropped): the peer may send as many again."""
        self.buffered_bytes -= size
        self._recv_taken += size
        if self._recv_taken >= self.limits.grant_bytes:
            self._grant_connection(self._recv_taken)
            self._recv_taken = 0

    # -- frames from the peer --------------------------------------------------------------------

    def _dispatch(self, f: Frame, size: int) -> None:
        t, sid = f.t, f.s
        if t in ("req", "open"):
            if self._mine(sid) or sid in self._serving:
                raise FrameError("malformed", f"{t} on stream {sid}")
            if len(self._serving) + len(self._messages) >= self.limits.max_inflight:
                self.metrics.reject("busy")
                self.send_control(_error(sid, "busy", "too many calls in flight"), droppable=True)
                return
            if t == "req":
                self._serving[sid] = asyncio.create_task(self._serve_request(sid, f.k, f.b))
            else:  # the credit exists before the task runs: `more` follows `open` at once
                credit = self._credits[sid] = _Credit()
                self._serving[sid] = asyncio.create_task(self._serve_stream(sid, f.k, f.b, credit))
        elif t == "msg":
            if len(self._serving) + len(self._messages) >= self.limits.max_inflight:
                self.metrics.reject("busy")
                return
            task = asyncio.create_task(self._serve_message(f.k, f.b))
            self._messages.add(task)
            task.add_done_callback(self._messages.discard)
        elif t == "cancel":
            if self._mine(sid):
                raise FrameError("malformed", f"cancel of our own stream {sid}")
            task = self._serving.get(sid)
            if task is not None:
                task.cancel()
        elif t == "more":
            if sid == 0:
                self._send_window.grant(f.b["n"])
                return
            if self._mine(sid):
                raise FrameError("malformed", f"credit for our own stream {sid}")
            credit = self._credits.get(sid)
            if credit is not None:
                credit.grant(f.b["n"])
        elif t in ("res", "err", "item", "end"):
            self._answer(f, size)
        else:  # ready: only ever the responder's first frame, consumed by the handshake
            raise FrameError("malformed", f"unexpected {t} frame")

    def _answer(self, f: Frame, size: int) -> None:
        t, sid = f.t, f.s
        if not self._mine(sid):
            raise FrameError("malformed", f"{t} for stream {sid}, which the peer opened")
        if t == "item":  # every item counts against the connection's window, wherever it goes
            self._recv_total += size
            if self._recv_total > self._recv_granted:
                raise FrameError("malformed", "an item beyond the connection's granted window")
            self.buffered_bytes += size
        future = self._pending.pop(sid, None)
        if future is not None:
            if t not in ("res", "err"):
                raise FrameError("malformed", f"{t} answering a request")
            if not future.done():
                if t == "res":
                    future.set_result(f.b)
                else:
                    future.set_exception(RemoteError(f.b["message"], f.b["type"]))
            self.check_idle()
            return
        stream = self.streams.get(sid)
        if stream is None:  # a late answer to a call that timed out or was cancelled here
            if t == "item":
                self.release(size)
            return
        if t == "item":
            stream.deliver(f.b, size)
        elif t == "res":
            raise FrameError("malformed", "res answering a stream")
        else:
            del self.streams[sid]
            stream.finish(None if t == "end" else RemoteError(f.b["message"], f.b["type"]))
            self.check_idle()

    async def _serve_request(self, sid: int, kind: str, body: dict[str, Any]) -> None:
        try:
            handler = self.handlers.requests.get(kind)
            if handler is None:
                reply = _error(sid, "unknown_kind", f"no request handler for {kind!r}")
            else:
                reply = await self._call(sid, handler, body)
            await self._reply(reply)
        except OverlayError:
            pass  # the connection closed under us
        finally:
            self._serving.pop(sid, None)
            self.check_idle()

    async def _call(self, sid: int, handler: RequestHandler, body: dict[str, Any]) -> Frame:
        try:
            result = await handler(self.peer_id, body)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("overlay handler failed", peer=self.peer_id[:16], error=repr(exc))
            return _error(sid, "handler_error", str(exc) or type(exc).__name__)
        if not isinstance(result, dict):
            return _error(sid, "invalid_response", f"the handler returned {type(result).__name__}")
        return Frame("res", sid, "", result)

    async def _reply(self, frame: Frame) -> None:
        try:
            await self.send_frame(frame)
        except FrameError as exc:  # an oversized or unserializable answer: say so instead
            await self.send_frame(_error(frame.s, "invalid_response", str(exc)))

    async def _serve_stream(self, sid: int, kind: str, body: dict[str, Any], credit: _Credit) -> None:
        handler = self.handlers.streams.get(kind)
        items: Any = None
        in_handler = False
        try:
            if handler is None:
                await self._reply(_error(sid, "unknown_kind", f"no stream handler for {kind!r}"))
                return
            try:
                items = handler(self.peer_id, body).__aiter__()
                while True:
                    in_handler = True
                    try:
                        item = await items.__anext__()
                    except StopAsyncIteration:
                        break
                    finally:
                        in_handler = False
                    if not isinstance(item, dict):
                        raise TypeError(f"stream items must be objects, not {type(item).__name__}")
                    await self._send_item(sid, item, credit)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing or self.closed.is_set():
                    return
                log.info("overlay stream handler failed", peer=self.peer_id[:16], error=repr(exc))
                await self._reply(_error(sid, "handler_error", str(exc) or type(exc).__name__))
                return
            await self._reply(Frame("end", sid))
        except asyncio.CancelledError:
            # Waiting for a window or the send queue, the handler sits at a yield: raise the
            # cancellation there too, so a handler always sees CancelledError when it is stopped.
            if items is not None and not in_handler and hasattr(items, "athrow"):
                with contextlib.suppress(BaseException):
                    await items.athrow(asyncio.CancelledError())
            raise
        except OverlayError:
            pass  # the connection closed under us
        finally:
            if items is not None and hasattr(items, "aclose"):
                with contextlib.suppress(BaseException):
                    await items.aclose()
            self._credits.pop(sid, None)
            self._serving.pop(sid, None)
            self.check_idle()

    async def _serve_message(self, kind: str, body: dict[str, Any]) -> None:
        handler = self.handlers.messages.get(kind)
        if handler is None:
            log.debug("overlay message of unknown kind", peer=self.peer_id[:16], kind=kind)
            return
        try:
            await handler(self.peer_id, body)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("overlay message handler failed", peer=self.peer_id[:16], kind=kind, error=repr(exc))
