"""A node's place in the network: identity, genesis, overlay, and the gossip and ledger plugins.

Kept apart from the HTTP gateway so that `Node` wires it in with a few lines, and so that plugins see
only the `NodeAPI` facade.
"""

from __future__ import annotations

from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from wwwserve_gateway.backend_registry import BackendRegistry
from wwwserve_gateway.config.schema import GatewayConfig, PluginSlot
from wwwserve_gateway.http.errors import InvalidRequest
from wwwserve_gateway.metrics import GatewayMetrics
from wwwserve_gateway.network.genesis import NetworkGenesis, load_genesis
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.overlay.overlay import Overlay
from wwwserve_gateway.plugin_api import (
    GOSSIP_GROUP,
    LEDGER_GROUP,
    POLICY_GROUP,
    ROUTER_GROUP,
    GossipPlugin,
    LedgerPlugin,
    NodeAPI,
    Policy,
    RouterPlugin,
)
from wwwserve_gateway.plugin_api.loading import load_entry_point

log = structlog.get_logger(__name__)

DEFAULT_GOSSIP = "swim"
DEFAULT_LEDGER = "chains"
DEFAULT_POLICY = "frequency"
DEFAULT_ROUTER = "pos"


class NodeNetwork:
    def __init__(self, config: GatewayConfig, backends: BackendRegistry, metrics: GatewayMetrics) -> None:
        settings = config.node
        self.identity = NodeIdentity.load_or_create(settings.data_dir)
        self.genesis = load_genesis(settings.network) if settings.network else NetworkGenesis()
        self.overlay = Overlay(self.identity, self.genesis.network_id, registry=metrics.registry)
        public_url = settings.public_url or f"http://{settings.host}:{settings.port}"
        self.api = NodeAPI(
            identity=self.identity,
            genesis=self.genesis,
            overlay=self.overlay,
            backends=backends,
            metrics=metrics.registry,
            public_url=public_url,
            bootstrap=tuple(settings.bootstrap),
            data_dir=settings.data_dir,
        )
        # Built in this order, each reachable by the next through the NodeAPI facade.
        self.gossip: GossipPlugin = self._build(config.gossip, GOSSIP_GROUP, DEFAULT_GOSSIP)
        self.api.gossip = self.gossip
        self.ledger: LedgerPlugin = self._build(config.ledger, LEDGER_GROUP, DEFAULT_LEDGER)
        self.api.ledger = self.ledger
        self.policy: Policy = self._build(config.policy, POLICY_GROUP, DEFAULT_POLICY)
        self.api.policy = self.policy
        self.router: RouterPlugin = self._build(config.router, ROUTER_GROUP, DEFAULT_ROUTER)
        self.api.router = self.router

    def _build(self, slot: PluginSlot, group: str, default: str) -> Any:
        return load_entry_point(group, slot.plugin or default)(self.api, slot.settings)

    async def start(self) -> None:
        await self.ledger.start()
        await self.gossip.start()
        await self.policy.start()
        log.info(
            "joined the network",
            node_id=self.identity.node_id,
            network=self.genesis.network_id[:16],
            bootstrap=list(self.api.bootstrap),
        )

    async def stop(self) -> None:
        await self.policy.stop()
        await self.gossip.stop()
        await self.overlay.aclose()
        await self.ledger.stop()

    def routes(self) -> list[Route | WebSocketRoute]:
        return [
            WebSocketRoute("/overlay", self.overlay.websocket_endpoint),
            Route("/wwwserve/peers", self.peers_view, methods=["GET"]),
            Route("/wwwserve/ledger/balances", self.balances_view, methods=["GET"]),
            Route("/wwwserve/ledger/ops", self.ops_view, methods=["GET"]),
        ]

    async def balances_view(self, request: Request) -> Response:
        return JSONResponse(self.ledger.balances_view())

    async def ops_view(self, request: Request) -> Response:
        params = request.query_params
        author = params.get("author") or self.identity.node_id
        try:
            start = int(params.get("from", "1"))
            limit = min(int(params.get("limit", "100")), 1000)
        except ValueError:
            raise InvalidRequest("'from' and 'limit' must be integers", param="from") from None
        return JSONResponse(self.ledger.ops_view(author, start, limit))

    async def peers_view(self, request: Request) -> Response:
        peers: list[dict[str, Any]] = []
        for peer in self.gossip.peers():
            record = peer.record
            peers.append(
                {
                    "id": peer.id,
                    "url": peer.url,
                    "state": peer.state,
                    "incarnation": peer.incarnation,
                    "heartbeat": peer.heartbeat,
                    "age_s": round(peer.age_s, 3),
                    "models": record.get("models", []),
                    "load": record.get("load"),
                    "stake": record.get("stake"),
                    "self": peer.id == self.identity.node_id,
                }
            )
        peers.sort(key=lambda p: (not p["self"], p["id"]))
        return JSONResponse(peers)
