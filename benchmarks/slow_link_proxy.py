"""A delaying TCP proxy for emulating slow, lossy links on loopback (this kernel has no netem).

    python benchmarks/slow_link_proxy.py --link 4001@120 --link 4002:5002@250 [--jitter 0.15]
        [--stall-every-s 30] [--stall-s 1-3] [--bandwidth-kbps 0] [--seed 1]

Each `--link TARGET_PORT[:LISTEN_PORT][@LATENCY_MS]` listens on 127.0.0.1:LISTEN_PORT (0 or left out:
a free port) and forwards every connection to 127.0.0.1:TARGET_PORT, byte for byte, so HTTP,
server-sent events and websockets all pass. What a link does to the bytes, in each direction of every
connection through it (`LinkSpec`):

- one-way latency: each read is written out LATENCY_MS later, plus jitter (uniform within
  +-`jitter` x latency, or +-`jitter_ms`); order is kept (a byte never overtakes an earlier one),
  so jitter delays, it never reorders;
- stalls: now and then (exponential gaps, mean `stall_every_s` per connection) the connection freezes
  in both directions for `stall_s` (uniform in a range, e.g. 1-3 s): nothing is forwarded meanwhile,
  then what piled up goes out (a TCP connection across a congested or flapping path);
- bandwidth: at most `bandwidth_kbps` kilobits per second per direction (0: no cap);
- backpressure: at most `max_buffer` bytes wait in the proxy per direction; beyond, it stops reading.

A closed side is closed on the other after the data in flight (with the latency); a connection to a
target that does not answer is closed at once (the client sees the connection close, as with a dead
peer behind a live router).

Per pair of nodes (`--pairs JSON`, {TARGET_PORT: {NODE_ID: LATENCY_MS}}): a node reaches a peer at
one address (its gossiped public URL, the peer's proxy), so a proxy in front of each node cannot tell
who dialled from the address. It reads it from the connection instead: a wwwserve overlay connection
opens with an HTTP upgrade and then the dialler's handshake `hello`, a (masked) websocket message
holding its node id in clear JSON. Once that message has crossed, the connection's latency becomes the
pair's (both directions), so a link between A and B has the same delay whoever dialled. What crosses
before (the upgrade request and answer) has the link's own latency. Connections whose dialler is not
in the table keep the link's latency (`identified`/`unidentified` in the stats).

Prints 'listening http://127.0.0.1:LISTEN -> 127.0.0.1:TARGET @LATENCY ms' per link once bound, and
exits when stdin closes, printing one last line 'stats {JSON}' (per link: connections, bytes each
way, stalls, stalled seconds). As a library: `SlowLinkProxy(target_port, spec).start()` in a running
event loop, or `ProxyProcess(links)` for the same in a child process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import subprocess
import sys
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
READ_SIZE = 65536


@dataclass(frozen=True)
class LinkSpec:
    latency_ms: float = 50.0
    jitter: float = 0.0  # a fraction of the latency: delays vary uniformly within +-jitter*latency
    jitter_ms: float = 0.0  # or an absolute jitter, added to the former
    stall_every_s: float = 0.0  # mean seconds between stalls of one connection; 0: never
    stall_s: tuple[float, float] = (1.0, 3.0)
    bandwidth_kbps: float = 0.0  # per direction per connection; 0: unlimited
    max_buffer: int = 4 * 2**20

    def delay(self, rng: random.Random) -> float:
        spread = self.jitter * self.latency_ms + self.jitter_ms
        return max(0.0, self.latency_ms + (rng.uniform(-spread, spread) if spread else 0.0)) / 1000


@dataclass
class LinkStats:
    connections: int = 0
    open: int = 0
    refused: int = 0  # the target did not accept
    bytes_in: int = 0  # client -> target
    bytes_out: int = 0  # target -> client
    stalls: int = 0
    stalled_s: float = 0.0
    identified: int = 0  # connections whose dialler was found in the pair table
    unidentified: int = 0  # overlay connections from a node not in the table


HELLO_ID = re.compile(rb'"id"\s*:\s*"([0-9a-f]{64})"')
SNIFF_LIMIT = 16384  # bytes of a connection's start searched for the dialler's hello


def first_ws_message(data: bytes) -> bytes | None:
    """The unmasked payload of the first websocket frame after an HTTP request's headers in `data`,
    or None while it is incomplete (or when `data` is no websocket upgrade)."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0 or b"websocket" not in data[:head_end].lower():
        return None
    at = head_end + 4
    if len(data) < at + 2:
        return None
    masked, size = data[at + 1] & 0x80, data[at + 1] & 0x7F
    at += 2
    if size == 126:
        if len(data) < at + 2:
            return None
        size, at = int.from_bytes(data[at : at + 2], "big"), at + 2
    elif size == 127:
        if len(data) < at + 8:
            return None
        size, at = int.from_bytes(data[at : at + 8], "big"), at + 8
    key = b""
    if masked:
        if len(data) < at + 4:
            return None
        key, at = data[at : at + 4], at + 4
    if len(data) < at + size:
        return None
    payload = data[at : at + size]
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return payload


class _Direction:
    """One direction of one connection: reads go into a queue with their due times; a writer task
    writes each at its due time, unless the connection is frozen."""

    def __init__(
        self, conn: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, inbound: bool
    ):
        self.conn = conn
        self.reader = reader
        self.writer = writer
        self.inbound = inbound
        self.queue: deque[tuple[float, bytes | None]] = deque()
        self.queued = 0
        self.wake = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.last_due = 0.0
        self.bw_free_at = 0.0

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self.room.wait()
                data = await self.reader.read(READ_SIZE)
                if self.inbound and data and self.conn.sniffing:
                    self.conn.sniff(data)
                spec = self.conn.spec
                now = loop.time()
                due = max(self.last_due, now + spec.delay(self.conn.rng))
                if data and spec.bandwidth_kbps > 0:
                    start = max(due, self.bw_free_at)
                    self.bw_free_at = start + len(data) * 8 / (spec.bandwidth_kbps * 1000)
                    due = self.bw_free_at
                self.last_due = due
                self.queue.append((due, data or None))
                self.wake.set()
                if not data:
                    return
                self.queued += len(data)
                stats = self.conn.stats
                if self.inbound:
                    stats.bytes_in += len(data)
                else:
                    stats.bytes_out += len(data)
                if self.queued >= spec.max_buffer:
                    self.room.clear()
        except (ConnectionError, OSError, RuntimeError):  # uvloop: RuntimeError on a closed transport
            self.queue.append((loop.time(), None))
            self.wake.set()

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while not self.queue:
                    self.wake.clear()
                    await self.wake.wait()
                due, data = self.queue[0]
                while True:  # wait until due and not frozen (a stall may begin meanwhile)
                    wait = max(due, self.conn.frozen_until) - loop.time()
                    if wait <= 0:
                        break
                    await asyncio.sleep(wait)
                self.queue.popleft()
                if data is None:
                    with contextlib.suppress(OSError, RuntimeError):
                        if self.writer.can_write_eof():
                            self.writer.write_eof()
                    return
                self.writer.write(data)
                await self.writer.drain()
                self.queued -= len(data)
                if self.queued < self.conn.spec.max_buffer:
                    self.room.set()
        except (ConnectionError, OSError, RuntimeError):  # uvloop: RuntimeError on a closed transport
            return


class _Connection:
    def __init__(self, proxy: SlowLinkProxy) -> None:
        self.proxy = proxy
        self.spec = proxy.spec
        self.stats = proxy.stats
        self.rng = random.Random(proxy.rng.random())
        self.frozen_until = 0.0
        self.sniffing = bool(proxy.pairs)
        self.seen = b""
        self.peer: str | None = None

    def sniff(self, data: bytes) -> None:
        """Look for the dialler's overlay hello in the connection's first bytes; once found, the
        pair's latency applies from the next read on (see the module doc)."""
        self.seen += data
        message = first_ws_message(self.seen)
        if message is None and len(self.seen) < SNIFF_LIMIT:
            return
        self.sniffing = False
        self.seen = b""
        found = HELLO_ID.search(message or b"")
        if not found:
            return
        peer = found.group(1).decode()
        latency = self.proxy.pairs.get(peer)
        if latency is None:
            self.stats.unidentified += 1
            return
        self.peer = peer
        self.stats.identified += 1
        self.spec = LinkSpec(**{**asdict(self.spec), "latency_ms": latency})

    async def run(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        self.stats.open += 1
        try:
            try:
                target_r, target_w = await asyncio.open_connection(LOOPBACK, self.proxy.target_port)
            except OSError:
                self.stats.refused += 1
                return
            # The connect itself crosses the link: the client's first bytes wait the latency anyway.
            up = _Direction(self, client_r, target_w, inbound=True)
            down = _Direction(self, target_r, client_w, inbound=False)
            tasks = [asyncio.ensure_future(c) for c in (up.read(), up.write(), down.read(), down.write())]
            staller = asyncio.ensure_future(self._stalls()) if self.spec.stall_every_s > 0 else None
            try:
                # Done when both directions have delivered their end (or one side broke).
                await asyncio.gather(tasks[1], tasks[3])
            finally:
                for t in [*tasks, *([staller] if staller else [])]:
                    t.cancel()
                await asyncio.gather(*tasks, *([staller] if staller else []), return_exceptions=True)
                target_w.close()
        finally:
            self.stats.open -= 1
            client_w.close()

    async def _stalls(self) -> None:
        loop = asyncio.get_running_loop()
        lo, hi = self.spec.stall_s
        while True:
            await asyncio.sleep(self.rng.expovariate(1 / self.spec.stall_every_s))
            length = self.rng.uniform(lo, hi)
            self.frozen_until = loop.time() + length
            self.stats.stalls += 1
            self.stats.stalled_s += length
            await asyncio.sleep(length)


class SlowLinkProxy:
    """One link: listens on 127.0.0.1:listen_port and forwards to 127.0.0.1:target_port via `spec`."""

    def __init__(
        self,
        target_port: int,
        spec: LinkSpec,
        listen_port: int = 0,
        seed: int | None = None,
        pairs: dict[str, float] | None = None,
    ) -> None:
        self.target_port = target_port
        self.spec = spec
        self.pairs = pairs or {}  # dialler's node id -> one-way latency ms
        self.listen_port = listen_port
        self.rng = random.Random(seed)
        self.stats = LinkStats()
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.listen_port}"

    async def start(self) -> SlowLinkProxy:
        self._server = await asyncio.start_server(
            self._accept, LOOPBACK, self.listen_port, reuse_address=True, backlog=512
        )
        self.listen_port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await _Connection(self).run(reader, writer)
        except asyncio.CancelledError:
            pass  # closing
        finally:
            self._conns.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            await self._server.wait_closed()


# -- in a child process ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    target_port: int
    latency_ms: float
    listen_port: int = 0

    def arg(self) -> str:
        listen = f":{self.listen_port}" if self.listen_port else ""
        return f"{self.target_port}{listen}@{self.latency_ms:g}"


@dataclass
class ProxyProcess:
    """Links in a child process (`python slow_link_proxy.py --link ...`): `urls[i]` is link i's
    listening URL once constructed; `stop()` ends it and returns its per-link stats."""

    links: list[Link]
    spec: LinkSpec = field(default_factory=LinkSpec)
    seed: int | None = None
    pairs: dict[int, dict[str, float]] = field(default_factory=dict)  # target port -> {node id: ms}
    urls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), *cli_args(self.spec, self.seed)]
        for link in self.links:
            cmd += ["--link", link.arg()]
        if self.pairs:
            cmd += ["--pairs", json.dumps({str(k): v for k, v in self.pairs.items()})]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        for _ in self.links:
            line = self.proc.stdout.readline()
            if not line.startswith("listening "):
                self.proc.kill()
                raise RuntimeError(f"slow_link_proxy did not start: {line!r}")
            self.urls.append(line.split()[1])

    @property
    def ports(self) -> list[int]:
        return [int(u.rsplit(":", 1)[1]) for u in self.urls]

    def stop(self) -> list[dict[str, Any]]:
        stats: list[dict[str, Any]] = []
        if self.proc.poll() is None:
            try:
                out, _ = self.proc.communicate(input="", timeout=10)  # closes stdin: the child ends
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, _ = self.proc.communicate()
            for line in out.splitlines():
                if line.startswith("stats "):
                    stats = json.loads(line[6:])
        return stats


def cli_args(spec: LinkSpec, seed: int | None) -> list[str]:
    args = [
        "--jitter", str(spec.jitter),
        "--jitter-ms", str(spec.jitter_ms),
        "--stall-every-s", str(spec.stall_every_s),
        "--stall-s", f"{spec.stall_s[0]}-{spec.stall_s[1]}",
        "--bandwidth-kbps", str(spec.bandwidth_kbps),
        "--max-buffer", str(spec.max_buffer),
    ]  # fmt: skip
    return args + (["--seed", str(seed)] if seed is not None else [])


def parse_link(text: str, default_latency: float) -> Link:
    ports, _, latency = text.partition("@")
    target, _, listen = ports.partition(":")
    return Link(int(target), float(latency) if latency else default_latency, int(listen) if listen else 0)


async def serve(
    links: list[Link], spec: LinkSpec, seed: int | None, pairs: dict[int, dict[str, float]] | None = None
) -> None:
    rng = random.Random(seed)
    proxies = []
    for link in links:
        link_spec = LinkSpec(**{**asdict(spec), "latency_ms": link.latency_ms})
        proxy = await SlowLinkProxy(
            link.target_port,
            link_spec,
            link.listen_port,
            rng.randrange(2**32),
            (pairs or {}).get(link.target_port),
        ).start()
        proxies.append(proxy)
        print(f"listening {proxy.url} -> {LOOPBACK}:{link.target_port} @{link.latency_ms:g} ms", flush=True)
    loop = asyncio.get_running_loop()
    if not sys.stdin.isatty():
        await loop.run_in_executor(None, sys.stdin.read)
    else:
        await asyncio.Event().wait()
    stats = [
        {
            "target_port": p.target_port,
            "listen_port": p.listen_port,
            "latency_ms": p.spec.latency_ms,
            **asdict(p.stats),
        }
        for p in proxies
    ]
    print("stats " + json.dumps(stats), flush=True)
    for proxy in proxies:
        await proxy.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--link", action="append", required=True, help="TARGET_PORT[:LISTEN_PORT][@LATENCY_MS] (repeatable)"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=50.0, help="one-way latency of links that name none"
    )
    parser.add_argument("--jitter", type=float, default=0.0, help="jitter as a fraction of the latency (+-)")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="absolute jitter in ms (+-)")
    parser.add_argument(
        "--stall-every-s", type=float, default=0.0, help="mean s between stalls per connection"
    )
    parser.add_argument("--stall-s", default="1-3", help="a stall's length in s: LO-HI (uniform)")
    parser.add_argument(
        "--bandwidth-kbps", type=float, default=0.0, help="per direction per connection; 0: none"
    )
    parser.add_argument("--max-buffer", type=int, default=4 * 2**20, help="bytes held per direction at most")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--pairs",
        default=None,
        help='per-pair one-way latency: JSON {"TARGET_PORT": {"NODE_ID": MS}} (see above)',
    )
    args = parser.parse_args(argv)
    lo, _, hi = args.stall_s.partition("-")
    spec = LinkSpec(
        latency_ms=args.latency_ms,
        jitter=args.jitter,
        jitter_ms=args.jitter_ms,
        stall_every_s=args.stall_every_s,
        stall_s=(float(lo), float(hi or lo)),
        bandwidth_kbps=args.bandwidth_kbps,
        max_buffer=args.max_buffer,
    )
    links = [parse_link(text, args.latency_ms) for text in args.link]
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        pairs = {int(k): v for k, v in json.loads(args.pairs).items()} if args.pairs else None
        run(serve(links, spec, args.seed, pairs))
    sys.stdout.flush()
    os._exit(0)  # the stdin reader thread would otherwise block interpreter shutdown


if __name__ == "__main__":
    main()
