"""A hostile member, built from the project's own classes: a real key and a real overlay (genuine
handshakes, sealed frames), so honest nodes talk to it as to any member, and it sends whatever it
likes: any gossip record, ledger operation or delegation item, from its own key or its Sybils'."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from tests.overlay_support import OverlayNode
from wwwserve_gateway.network.genesis import NetworkGenesis
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.overlay.errors import HandshakeError
from wwwserve_gateway.plugins.gossip.membership import alive_body
from wwwserve_gateway.plugins.ledger.chains import bucket_hashes, bucket_of
from wwwserve_gateway.plugins.ledger.ops import Operation, sign_op

StreamHandler = Callable[[str, dict[str, Any]], AsyncIterator[dict[str, Any]]]


class HostileMember(OverlayNode):
    def __init__(self, genesis: NetworkGenesis, identity: NodeIdentity | None = None) -> None:
        super().__init__(identity, network_id=genesis.network_id)
        self.genesis = genesis
        self.incarnation = int(time.time() * 1000)
        self.heartbeat = 0
        self.chains: dict[str, list[Operation]] = {}  # its own and its Sybils' ledger chains
        self.keys: dict[str, NodeIdentity] = {self.id: self.identity}
        self.overlay.on_request("ledger.heads", self._serve_heads)
        self.overlay.on_request("ledger.range", self._serve_range)
        self.seen: list[dict[str, Any]] = []  # signed records honest nodes sent it, for replays
        self.overlay.on_message("gossip", self._on_gossip)

    # -- gossip ----------------------------------------------------------------------------------------
    def alive(self, **fields: Any) -> dict[str, Any]:
        """Its own signed record, e.g. models=[{"name": "m"}], stake=1000."""
        self.heartbeat += 1
        body = alive_body(self.id, self.http_url, self.incarnation, self.heartbeat, int(time.time()), fields)
        return self.identity.sign_record(body)

    def accusation(self, subject: str, incarnation: int, kind: str = "dead") -> dict[str, Any]:
        body = {
            "kind": kind,
            "id": self.id,
            "subject": subject,
            "incarnation": incarnation,
            "ts": int(time.time()),
        }
        return self.identity.sign_record(body)

    async def connect(self, node_url: str) -> str:
        """Open the overlay to an honest node (its HTTP URL); returns its id. A node still holding
        an earlier member's connection under this key refuses a second one ("duplicate") until it
        sees the old one closed: retried for a bounded while."""
        url = node_url.replace("http", "ws", 1) + "/overlay"
        deadline = time.monotonic() + 15
        while True:
            try:
                return await self.overlay.connect(url)
            except HandshakeError as exc:
                if exc.reason != "duplicate" or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.2)

    async def gossip(self, to: str, *records: dict[str, Any]) -> None:
        await self.overlay.send(to, "gossip", {"type": "gossip", "u": list(records)})

    async def announce_ledger(self, to: str) -> None:
        """A sync carrying its ledger digest: the node compares chain heads and pulls from it."""
        heads = {a: (len(c), c[-1].hash) for a, c in self.chains.items() if c}
        digest = "A" * 684  # a member digest that matches nothing: the node answers, harmlessly
        await self.overlay.send(
            to, "gossip", {"type": "sync", "h": digest, "d": {"ledger": {"buckets": bucket_hashes(heads)}}}
        )

    # -- ledger ----------------------------------------------------------------------------------------
    def sybil(self) -> str:
        identity = NodeIdentity.generate()
        self.keys[identity.node_id] = identity
        return identity.node_id

    def append(self, author: str, kind: str, body: dict[str, Any]) -> Operation:
        """An operation signed by `author` (itself or one of its Sybils), whatever it says."""
        chain = self.chains.setdefault(author, [])
        prev = chain[-1].hash if chain else ""
        op = sign_op(self.keys[author], len(chain) + 1, prev, kind, body, round(time.time(), 3))
        chain.append(op)
        return op

    async def _serve_heads(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        wanted = set(body.get("buckets") or [])
        return {
            "heads": {a: [len(c), c[-1].hash] for a, c in self.chains.items() if c and bucket_of(a) in wanted}
        }

    async def _serve_range(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        chain = self.chains.get(body.get("author"), [])
        start = max(1, int(body.get("from", 1)))
        return {"ops": [op.signed for op in chain[start - 1 :]]}

    async def _on_gossip(self, peer: str, body: Any) -> None:
        """Stay alive in honest nodes' eyes (acks their probes), and keep what they say."""
        if not isinstance(body, dict):
            return
        self.seen.extend(r for r in body.get("u") or [] if isinstance(r, dict))
        if body.get("type") == "ping":
            await self.overlay.send(peer, "gossip", {"type": "ack", "seq": body.get("seq")})

    # -- delegation ------------------------------------------------------------------------------------
    def serve_delegations(self, handler: StreamHandler) -> None:
        """Answer delegated requests with `handler(peer, request)`, which yields any items."""
        self.overlay.on_stream("wwwserve.delegate", handler)
