"""Overlay nodes behind real uvicorn servers on 127.0.0.1, and a hand-driven peer for attacks."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import httpx
import uvicorn
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from tests.support import free_port, until
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.overlay import Overlay, overlay_url
from wwwserve_gateway.overlay import frames as overlay_frames
from wwwserve_gateway.overlay.frames import Frame
from wwwserve_gateway.overlay.handshake import Initiator
from wwwserve_gateway.overlay.secure_channel import SecureChannel

NETWORK = "f" * 64


class OverlayNode:
    """An Overlay served at /overlay by an in-process uvicorn server, with an HTTP /health beside it."""

    def __init__(
        self,
        identity: NodeIdentity | None = None,
        *,
        network_id: str = NETWORK,
        port: int | None = None,
        **overlay_options: Any,
    ) -> None:
        self.identity = identity or NodeIdentity.generate()
        self.network_id = network_id
        self.port = port or free_port()
        self.options = overlay_options
        self.registry = CollectorRegistry()
        self.overlay = Overlay(self.identity, network_id, metrics=self.registry, **overlay_options)
        self.server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.identity.node_id

    @property
    def url(self) -> str:
        return overlay_url("127.0.0.1", self.port)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> OverlayNode:
        async def health(request: Request) -> JSONResponse:
            return JSONResponse({"status": "ok"})

        app = Starlette(
            routes=[
                Route("/health", health),
                WebSocketRoute("/overlay", self.overlay.websocket_endpoint),
            ]
        )
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            ws="websockets-sansio",
            # Above the overlay's own limit, so an oversized frame reaches (and is counted by) it.
            ws_max_size=4 * self.overlay.limits.max_frame_bytes,
            lifespan="off",
            log_config=None,
            log_level="warning",
        )
        self.server = uvicorn.Server(config)
        self._task = asyncio.create_task(self.server.serve())
        server = self.server
        await until(lambda: server.started or self._task.done(), what="uvicorn started")
        if self._task.done():
            self._task.result()
        return self

    async def stop(self) -> None:
        await self.overlay.aclose()
        if self.server is not None and self._task is not None:
            self.server.should_exit = True
            await asyncio.wait_for(self._task, 10)

    def rejected(self, reason: str) -> float:
        return self.registry.get_sample_value("wwwserve_overlay_rejected_total", {"reason": reason}) or 0.0

    def gauge(self) -> float:
        return self.registry.get_sample_value("wwwserve_overlay_connections") or 0.0

    async def health(self) -> int:
        async with httpx.AsyncClient(timeout=5) as client:
            return (await client.get(self.http_url + "/health")).status_code

    def renewed(self) -> OverlayNode:
        """The same node after a restart: same identity and port, new process state."""
        return OverlayNode(self.identity, network_id=self.network_id, port=self.port, **self.options)


class RawPeer:
    """A peer driven by hand over a plain aiohttp websocket, to send what a real node never would."""

    def __init__(self, url: str, identity: NodeIdentity | None = None, *, network_id: str = NETWORK) -> None:
        self.url = url
        self.identity = identity or NodeIdentity.generate()
        self.network_id = network_id
        self.channel: SecureChannel | None = None
        self._session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def __aenter__(self) -> RawPeer:
        self._session = aiohttp.ClientSession()
        self.ws = await self._session.ws_connect(self.url, max_msg_size=0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._session is not None:
            await self._session.close()

    async def send(self, data: bytes) -> None:
        assert self.ws is not None
        await self.ws.send_bytes(data)

    async def recv(self, within: float = 5.0) -> bytes:
        assert self.ws is not None
        message = await self.ws.receive(timeout=within)
        assert message.type == aiohttp.WSMsgType.BINARY, message
        return message.data

    async def handshake(self, initiator: Initiator | None = None) -> SecureChannel:
        """A correct handshake; returns the channel after the responder's `ready`."""
        initiator = initiator or Initiator(self.identity, self.network_id)
        await self.send(initiator.hello())
        finish, result = initiator.on_welcome(await self.recv())
        await self.send(finish)
        self.channel = SecureChannel(result.tx_key, result.rx_key)
        plaintext, _ = self.channel.open(await self.recv())
        assert overlay_frames.decode(plaintext).t == "ready"
        return self.channel

    def seal(self, frame: Frame) -> bytes:
        assert self.channel is not None
        return self.channel.seal(overlay_frames.encode(frame))

    async def closed(self, within: float = 5.0) -> int | None:
        """Wait for the node to close the websocket; its close code."""
        assert self.ws is not None
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            message = await self.ws.receive(timeout=max(0.01, deadline - time.monotonic()))
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return self.ws.close_code
            if message.type == aiohttp.WSMsgType.ERROR:
                return self.ws.close_code
        raise TimeoutError("the node did not close the connection")
