"""Binary-message sockets: one interface over a Starlette server websocket and an aiohttp client one."""

from __future__ import annotations

import contextlib
from typing import Protocol

import aiohttp
from starlette.websockets import WebSocket

from wwwserve_gateway.overlay.errors import FrameError

MESSAGE_TOO_BIG = 1009


class SocketClosed(Exception):
    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"websocket closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class MessageSocket(Protocol):
    async def recv(self) -> bytes:
        """The next binary message; SocketClosed when the socket closes, FrameError for a text or
        oversized message."""
        ...

    async def send(self, data: bytes) -> None:
        """Send one binary message (waits while the peer is not reading); SocketClosed if closed."""
        ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


class StarletteSocket:
    """The accepting side: the websocket of the node's /overlay route."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self._closed = False

    async def recv(self) -> bytes:
        if self._closed:
            raise SocketClosed(1006, "closed")
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            self._closed = True
            code = message.get("code", 1006)
            if code == MESSAGE_TOO_BIG:  # the server's websocket layer refused it (ws_max_size)
                raise FrameError("oversized", "a websocket message over the server's size limit")
            raise SocketClosed(code, message.get("reason") or "")
        data = message.get("bytes")
        if data is None:
            raise FrameError("malformed", "a text websocket message")
        return data

    async def send(self, data: bytes) -> None:
        if self._closed:
            raise SocketClosed(1006, "closed")
        try:
            await self.websocket.send_bytes(data)
        except Exception as exc:  # the server's own disconnect errors differ between implementations
            self._closed = True
            raise SocketClosed(1006, type(exc).__name__) from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self.websocket.close(code, reason[:120])


class AiohttpSocket:
    """The dialling side: an aiohttp client websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def recv(self) -> bytes:
        message = await self.ws.receive()
        if message.type == aiohttp.WSMsgType.BINARY:
            return message.data
        if message.type == aiohttp.WSMsgType.TEXT:
            raise FrameError("malformed", "a text websocket message")
        if message.type == aiohttp.WSMsgType.ERROR:
            exc = message.data
            if getattr(exc, "code", None) == MESSAGE_TOO_BIG:
                raise FrameError("oversized", "a websocket message over the client's size limit")
            raise SocketClosed(1006, str(exc))
        if message.type == aiohttp.WSMsgType.CLOSE:
            raise SocketClosed(int(message.data or 1005), message.extra or "")
        raise SocketClosed(self.ws.close_code or 1006, "")

    async def send(self, data: bytes) -> None:
        if self.ws.closed:
            raise SocketClosed(self.ws.close_code or 1006, "closed")
        try:
            await self.ws.send_bytes(data)
        except Exception as exc:  # ConnectionResetError and aiohttp's client errors
            raise SocketClosed(1006, type(exc).__name__) from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, message=reason[:120].encode())
