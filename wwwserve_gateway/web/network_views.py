"""Read-only views of the network as this node sees it: peers, balances, a chain's operations."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from wwwserve_gateway.http.auth import KeyCheck
from wwwserve_gateway.http.errors import InvalidRequest
from wwwserve_gateway.plugin_api.ledger import LedgerPlugin
from wwwserve_gateway.plugin_api.node import NodeAPI
from wwwserve_gateway.plugin_api.peers import PeerView

# Sequence numbers are stored as 64-bit integers.
MAX_SEQ = 2**63 - 1


def peer_json(peer: PeerView, me: str, with_url: bool, ledger: LedgerPlugin) -> dict[str, Any]:
    return {
        "id": peer.id,
        "url": peer.url if with_url else None,
        "state": peer.state.value,
        "incarnation": peer.incarnation,
        "heartbeat": peer.heartbeat,
        "age_s": round(peer.age_s, 3),
        "models": [
            {
                "name": m.name,
                "context_length": m.context_length,
                "quality": round(ledger.quality(peer.id, m.name), 1),
            }
            for m in peer.models.values()
        ],
        "load": {"running": peer.load.running, "waiting": peer.load.waiting, "usage": peer.load.usage},
        "stake": peer.stake,
        "self": peer.id == me,
    }


def network_routes(node: NodeAPI, operators: KeyCheck) -> list[Route]:
    """The views are public (everything in them is gossiped to every member anyway) except peers'
    addresses, which link pseudonymous node ids to hosts: those need an operator's key."""
    me = node.node_id

    async def peers(request: Request) -> Response:
        with_url = operators.presented(request.scope)
        found = [peer_json(p, me, with_url, node.ledger) for p in node.gossip.peers()]
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
        if not 1 <= start <= MAX_SEQ or limit < 1:  # SQL takes a negative LIMIT as none at all
            raise InvalidRequest(
                f"'from' must be between 1 and {MAX_SEQ} and 'limit' at least 1",
                param="limit" if 1 <= start <= MAX_SEQ else "from",
            )
        return JSONResponse(node.ledger.ops_view(author, start, limit))

    return [
        Route("/wwwserve/peers", peers, methods=["GET"]),
        Route("/wwwserve/ledger/balances", balances, methods=["GET"]),
        Route("/wwwserve/ledger/ops", ops, methods=["GET"]),
    ]
