"""Each app request's way: the policy decides local, delegate, retry or reject; the core carries it out.

A request for a model this node does not serve goes to peers (if the policy buys it); a delegation
nobody accepts falls back to a local backend, or answers 503 with Retry-After. Every answer names
its route in `x-wwwserve-route` (node ids only, never addresses).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

import structlog

from wwwserve_gateway.delegation import wire
from wwwserve_gateway.delegation.entry import ROUTE_HEADER, Delegator, NoExecutor
from wwwserve_gateway.delegation.metrics import DelegationMetrics
from wwwserve_gateway.http.asgi import ClientDisconnected, Receive, Send, cancel_on_disconnect, send_bytes
from wwwserve_gateway.http.errors import BackendUnavailable, GatewayError, ModelNotFound, RateLimited
from wwwserve_gateway.metrics import GatewayMetrics
from wwwserve_gateway.openai.serving import OpenAIServing
from wwwserve_gateway.plugin_api import Decision, NodeAPI, RequestInfo
from wwwserve_gateway.plugin_api.backend import Endpoint, Usage

log = structlog.get_logger(__name__)


class Dispatcher:
    def __init__(
        self,
        api: NodeAPI,
        serving: OpenAIServing,
        delegator: Delegator,
        metrics: GatewayMetrics,
        delegation_metrics: DelegationMetrics,
        request_timeout: float,
    ) -> None:
        self.api = api
        self.me = api.identity.node_id
        self.serving = serving
        self.registry = serving.registry
        self.delegator = delegator
        self.metrics = metrics
        self.dm = delegation_metrics
        self.request_timeout = request_timeout
        self.local_route = [(ROUTE_HEADER, self.me.encode())]

    def model_names(self) -> list[str]:
        """Local models and the models peers offer that this node's policy buys."""
        return sorted(set(self.registry.model_names()) | set(self.network_models()))

    def serves(self, model: str) -> bool:
        assert self.api.policy is not None
        return self.registry.serves(model) or (self.api.policy.buys(model) and self.network_serves(model))

    def network_serves(self, model: str) -> bool:
        assert self.api.gossip is not None
        return any(
            p.state == "alive" and p.id != self.me and model in p.models for p in self.api.gossip.peers()
        )

    def network_models(self) -> list[str]:
        """Models that peers offer and this node's policy buys."""
        assert self.api.gossip is not None and self.api.policy is not None
        names: set[str] = set()
        for peer in self.api.gossip.peers():
            if peer.state == "alive" and peer.id != self.me:
                names |= peer.models
        return sorted(n for n in names if self.api.policy.buys(n))

    async def serve(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        stream: bool,
        receive: Receive,
        send: Send,
        started: float,
    ) -> None:
        policy = self.api.policy
        assert policy is not None
        model = body["model"]
        local = self.registry.serves(model)
        if not self.serves(model):
            raise ModelNotFound(f"The model '{model}' does not exist on this node", param="model")
        info = wire.describe(uuid.uuid4().hex, endpoint.value, body, stream, ())
        deadline = started + self.request_timeout
        while True:
            decision = policy.decide(info)
            if decision is Decision.LOCAL and not local:
                decision = Decision.DELEGATE
            if decision is Decision.LOCAL:
                await self._local(info, endpoint, body, stream, receive, send, started)
                return
            if decision is Decision.DELEGATE:
                try:
                    await self._delegate(info, endpoint, body, stream, receive, send, started)
                    return
                except NoExecutor as exc:
                    self.dm.delegations.labels(model, "no_executor").inc()
                    if not local:
                        raise BackendUnavailable(
                            f"{exc}; retry shortly", headers={"retry-after": "1"}
                        ) from None
                await self._local(info, endpoint, body, stream, receive, send, started)
                return
            if decision is Decision.REJECT:
                raise RateLimited(
                    f"this node is not taking requests for '{model}' now; retry later",
                    headers={"retry-after": str(max(1, round(policy.retry_after_s)))},
                )
            wait = policy.retry_after_s
            if time.perf_counter() + wait > deadline:
                raise BackendUnavailable(
                    f"no capacity for '{model}' within the request timeout", headers={"retry-after": "1"}
                )
            await cancel_on_disconnect(receive, asyncio.sleep(wait))
            info = dataclasses.replace(info, attempt=info.attempt + 1)

    async def _local(
        self,
        info: RequestInfo,
        endpoint: Endpoint,
        body: dict[str, Any],
        stream: bool,
        receive: Receive,
        send: Send,
        started: float,
    ) -> None:
        ok = False
        try:
            await self.serving.serve(endpoint, body, stream, receive, send, started, self.local_route)
            ok = True
        finally:
            assert self.api.policy is not None
            self.api.policy.on_request_done(info, "local", time.perf_counter() - started, ok)

    async def _delegate(
        self,
        info: RequestInfo,
        endpoint: Endpoint,
        body: dict[str, Any],
        stream: bool,
        receive: Receive,
        send: Send,
        started: float,
    ) -> None:
        assert self.api.ledger is not None and self.api.policy is not None
        if not self.api.ledger.can_delegate(self.me):
            raise NoExecutor("this node's balance does not allow delegating")
        m = self.metrics
        model = info.model
        status = 200
        usage: Usage | None = None
        receipts: list[dict[str, Any]] = []
        m.in_flight.inc()
        try:
            if stream:
                relay = self.delegator.stream(info, endpoint, body, send)
                usage, receipts = await cancel_on_disconnect(receive, relay)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                work = self.delegator.complete(info, endpoint, body)
                answer, headers, usage, receipts = await cancel_on_disconnect(receive, work)
                await send_bytes(send, 200, answer, headers)
            for receipt in receipts:
                await self.delegator.pay(receipt)
        except NoExecutor:
            status = 0
            raise
        except ClientDisconnected:
            status = 499
            m.client_disconnects.inc()
            raise
        except GatewayError as exc:
            status = exc.status
            raise
        finally:
            m.in_flight.dec()
            seconds = time.perf_counter() - started
            if status:
                m.request_done(endpoint.value, model, status, seconds)
                self.dm.delegations.labels(model, "ok" if status == 200 else "failed").inc()
                self.api.policy.on_request_done(info, "peer", seconds, status == 200)
        if usage is not None:
            m.count_tokens(model, usage.prompt_tokens, usage.completion_tokens)
