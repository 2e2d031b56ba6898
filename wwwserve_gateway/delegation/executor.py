"""The executor side: serve a peer's request on a local backend, or relay it onward.

The first item answers at once: accept or decline, by this node's policy. A served request streams
its answer back and ends with a signed receipt whose response hash covers exactly the bytes sent.
When the entry gives up (timeout, failover, its client left) the overlay cancels this handler, and
the backend request is closed with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog

from wwwserve_gateway.backend_registry import BackendRegistry
from wwwserve_gateway.delegation import wire
from wwwserve_gateway.delegation.entry import Delegator, NoExecutor
from wwwserve_gateway.delegation.metrics import DelegationMetrics
from wwwserve_gateway.http.errors import GatewayError, InvalidRequest
from wwwserve_gateway.http.sse import DONE
from wwwserve_gateway.network.receipts import request_hash, sign_receipt
from wwwserve_gateway.openai.protocol import REQUEST_TYPES, validate_request
from wwwserve_gateway.plugin_api.backend import Backend, Endpoint, Usage
from wwwserve_gateway.plugin_api.node import NodeAPI
from wwwserve_gateway.plugin_api.policy import Decision
from wwwserve_gateway.plugin_api.requests import RequestInfo

log = structlog.get_logger(__name__)

DONE_TEXT = DONE.decode()


class PeerExecutor:
    def __init__(
        self, api: NodeAPI, registry: BackendRegistry, delegator: Delegator, metrics: DelegationMetrics
    ) -> None:
        self.api = api
        self.me = api.node_id
        self.registry = registry
        self.delegator = delegator
        self.metrics = metrics

    def register(self) -> None:
        """Start answering peers' delegated requests."""
        self.api.overlay.on_stream(wire.KIND, self.handle)

    async def handle(self, peer_id: str, raw: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        try:
            req = wire.parse_request(peer_id, self.me, raw)
            validate_request(REQUEST_TYPES[req.endpoint], req.body)
        except (wire.WireError, InvalidRequest) as exc:
            reason = getattr(exc, "message", None) or str(exc)
            log.warning("refused a delegated request", peer=peer_id[:16], reason=reason)
            self.metrics.peer_requests.labels("?", "refused").inc()
            yield wire.decline(f"refused: {reason}")
            return
        info = RequestInfo.describe(
            req.id, req.endpoint.value, req.body, bool(req.body.get("stream")), req.route
        )
        model = info.model
        decision = self.api.policy.accept(info)
        if decision is Decision.LOCAL and self.registry.serves(model):
            try:
                backend = self.registry.pick(model)
            except GatewayError as exc:
                self.metrics.peer_requests.labels(model, "declined").inc()
                yield wire.decline(exc.message)
                return
            self.metrics.peer_requests.labels(model, "served").inc()
            yield wire.accept((*req.route, self.me))
            async for item in self._serve(backend, req, info):
                yield item
        elif decision is Decision.DELEGATE:
            async for item in self._relay(info, req):
                yield item
        else:
            self.metrics.peer_requests.labels(model, "declined").inc()
            yield wire.decline("busy")

    async def _serve(
        self, backend: Backend, req: wire.DelegatedRequest, info: RequestInfo
    ) -> AsyncIterator[dict[str, Any]]:
        body = req.body
        # Hashed before the backend sees the body: adapters may add fields (stream_options).
        request = request_hash(req.id, req.endpoint.value, body)
        call = dict(body)
        if req.continuation:
            call.update(backend.continuation_params)
        digest = hashlib.sha256()
        started = time.time()
        ok = False
        self.metrics.peer_in_flight.inc()
        try:
            with self.registry.lease(backend) as lease:
                try:
                    if body.get("stream") and req.endpoint is not Endpoint.EMBEDDING:
                        sse = await backend.stream(req.endpoint, call)
                        try:
                            async for piece in sse:
                                text = piece.decode()
                                if text.endswith(DONE_TEXT):
                                    text = text[: -len(DONE_TEXT)]
                                if text:
                                    digest.update(text.encode())
                                    yield wire.sse(text)
                        finally:
                            await sse.aclose()
                        usage = sse.usage
                    else:
                        reply = await backend.complete(req.endpoint, call)
                        digest.update(reply.body)
                        yield wire.json_answer(reply.body.decode())
                        usage = reply.usage
                except GatewayError as exc:
                    log.info("backend failed a peer's request", backend=backend.id, error=exc.message)
                    self.metrics.peer_requests.labels(backend.model_name, "failed").inc()
                    yield wire.error(exc.status, exc.body().decode())
                    return
                usage = usage or Usage()
                lease.used(usage)
            record = sign_receipt(
                self.api.identity,
                entry=req.entry,
                request=request,
                response=digest.hexdigest(),
                model=body["model"],
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                started=started,
                finished=time.time(),
            )
            ok = True
            yield wire.receipt(record)
        finally:
            self.metrics.peer_in_flight.dec()
            self.api.policy.on_request_done(info, "local", time.time() - started, ok)

    async def _relay(self, info: RequestInfo, req: wire.DelegatedRequest) -> AsyncIterator[dict[str, Any]]:
        """Multi-hop: pass the request on with this node added to the route; items go back as
        they come (the entry checks them, and the receipt is the final executor's)."""
        onward = dataclasses.replace(req, route=(*req.route, self.me))
        try:
            ex = await self.delegator.open(info, onward, set())
        except NoExecutor:
            self.metrics.peer_requests.labels(info.model, "declined").inc()
            yield wire.decline("busy, and no peer to relay to")
            return
        self.metrics.peer_requests.labels(info.model, "relayed").inc()
        try:
            yield wire.accept(ex.route)
            async for item in ex.items:
                yield item
        finally:
            await ex.aclose()
