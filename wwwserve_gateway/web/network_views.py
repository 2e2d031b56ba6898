"""Read-only views of the network as this node sees it: peers, balances, a chain's operations."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from wwwserve_gateway.http.errors import InvalidRequest
from wwwserve_gateway.plugin_api.node import NodeAPI
from wwwserve_gateway.plugin_api.peers import PeerView


def peer_json(peer: PeerView, me: str) -> dict[str, Any]:
    return {
        "id": peer.id,
        "url": peer.url,
        "state": peer.state.value,
        "incarnation": peer.incarnation,
        "heartbeat": peer.heartbeat,
        "age_s": round(peer.age_s, 3),
        "models": [{"name": m.name, "context_length": m.context_length} for m in peer.models.values()],
        "load": {"running": peer.load.running, "waiting": peer.load.waiting, "usage": peer.load.usage},
        "stake": peer.stake,
        "self": peer.id == me,
    }


def network_routes(node: NodeAPI) -> list[Route]:
    me = node.node_id

    async def peers(request: Request) -> Response:
        found = [peer_json(p, me) for p in node.gossip.peers()]
        found.sort(key=lambda p: (not p["self"], p["id"]))
        return JSONResponse(found)

    async def balances(request: Request) -> Response:
        return JSONResponse(node.ledger.balances_view())

    async def ops(request: Request) -> Response:
        params = request.query_params
        author = params.get("author") or me
        try:
            start = int(params.get("from", "1"))
            limit = min(int(params.get("limit", "100")), 1000)
        except ValueError:
            raise InvalidRequest("'from' and 'limit' must be integers", param="from") from None
        return JSONResponse(node.ledger.ops_view(author, start, limit))

    return [
        Route("/wwwserve/peers", peers, methods=["GET"]),
        Route("/wwwserve/ledger/balances", balances, methods=["GET"]),
        Route("/wwwserve/ledger/ops", ops, methods=["GET"]),
    ]
