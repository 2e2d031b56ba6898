"""Calibration baseline: the plainest aiohttp pass-through proxy (no parsing, no accounting).

    python benchmarks/aiohttp_proxy.py --upstream http://127.0.0.1:P --port 0

Prints 'listening http://127.0.0.1:PORT' once bound; exits when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp
import uvloop
from aiohttp import web

SSE = "text/event-stream"


def make_app(upstream: str) -> web.Application:
    app = web.Application()

    async def start(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Content-Type": "application/json"}
        async with app["session"].post(upstream + request.path, data=body, headers=headers) as up:
            if not up.content_type.startswith(SSE):
                return web.Response(body=await up.read(), status=up.status, content_type=up.content_type)
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": SSE})
            await resp.prepare(request)
            async for data in up.content.iter_any():
                await resp.write(data)
            await resp.write_eof()
            return resp

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_post("/v1/chat/completions", forward)
    return app


async def serve(upstream: str, port: int) -> None:
    runner = web.AppRunner(make_app(upstream), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    sock = site._server.sockets[0]  # type: ignore[union-attr]
    print(f"listening http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--upstream", required=True, help="base URL of the backend, e.g. http://127.0.0.1:8000"
    )
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    uvloop.run(serve(args.upstream.rstrip("/"), args.port))
