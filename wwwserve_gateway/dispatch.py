"""Each app request's way: the policy decides local, delegate, retry or reject; the core carries it out.

route (openai.api_router) -> Dispatcher -> local serving (openai.serving) | delegation (delegation.entry)

A request for a model this node does not serve goes to peers (if the policy buys it); a delegation
nobody accepts falls back to a local backend, or answers 503 with Retry-After. Every answer names
its route in `x-wwwserve-route` (node ids only, never addresses). The request-level counters
(in flight, status, latency, tokens) are kept here, once for both ways.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from typing import Any

import structlog

from wwwserve_gateway.access import RequestRecord, RequestRecords, wall_time
from wwwserve_gateway.delegation.entry import ROUTE_HEADER, Delegator, NoExecutor, Paid
from wwwserve_gateway.delegation.metrics import DelegationMetrics
from wwwserve_gateway.deployments import Deployments
from wwwserve_gateway.http.asgi import ClientDisconnected, Send, cancel_on_disconnect, send_bytes
from wwwserve_gateway.http.errors import (
    BackendError,
    BackendUnavailable,
    GatewayError,
    ModelNotFound,
    RateLimited,
    UpstreamError,
)
from wwwserve_gateway.metrics import GatewayMetrics
from wwwserve_gateway.openai.request import AppRequest
from wwwserve_gateway.openai.serving import LocalServing
from wwwserve_gateway.plugin_api.backend import DELEGATED_ENDPOINTS, Usage
from wwwserve_gateway.plugin_api.node import NodeAPI
from wwwserve_gateway.plugin_api.policy import Decision
from wwwserve_gateway.plugin_api.requests import RequestInfo

log = structlog.get_logger(__name__)

# How backends word "the prompt does not fit": vLLM and OpenAI ("maximum context length"),
# llama.cpp ("exceeds the available context size"), others ("context window", "too many tokens").
CONTEXT_OVERFLOW = re.compile(
    r"context[ _](length|size|window)|maximum context|too many tokens|prompt is too long", re.IGNORECASE
)


def is_context_overflow(exc: GatewayError) -> bool:
    return exc.status == 400 and (
        exc.code == "context_length_exceeded" or bool(CONTEXT_OVERFLOW.search(exc.message))
    )


def worth_a_fallback(exc: GatewayError) -> bool:
    """A group's failure that another group may not share: its deployments failed or are busy, or
    the prompt is too long for it (context_window_fallbacks). Not other faults of the request."""
    if isinstance(exc, UpstreamError) and 400 <= exc.status < 500 and exc.status != 429:
        return is_context_overflow(exc)
    return isinstance(exc, (BackendError, RateLimited))


class Dispatcher:
    def __init__(
        self,
        api: NodeAPI,
        deployments: Deployments,
        local: LocalServing,
        delegator: Delegator,
        metrics: GatewayMetrics,
        delegation_metrics: DelegationMetrics,
        request_timeout: float,
        records: RequestRecords | None = None,
    ) -> None:
        self.api = api
        self.records = records if records is not None else RequestRecords(access_log=False)
        self.me = api.node_id
        self.deployments = deployments
        self.local = local
        self.delegator = delegator
        self.metrics = metrics
        self.dm = delegation_metrics
        self.request_timeout = request_timeout
        self.local_route = [(ROUTE_HEADER, self.me.encode())]
        self.tracing = delegator.tracing

    # -- the catalog: what apps may ask this node for ---------------------------------------------
    def model_names(self) -> list[str]:
        """Local models and the models peers offer that this node's policy buys."""
        return sorted(set(self.deployments.model_names()) | self._network_models())

    def serves(self, model: str) -> bool:
        return self.deployments.serves(model) or model in self._network_models()

    def _may_come_back(self, model: str) -> bool:
        """Whether a model nobody reachable serves is missing for now (503), not unknown (404): a
        peer that offered it is suspect, dead or gone, or this node has seeds and no live peer
        (it has just started, or is cut off)."""
        others = [p for p in self.api.gossip.peers() if p.id != self.me]
        if not any(p.alive for p in others) and self.api.gossip.seeds():
            return True
        return any(model in p.models for p in others) and self.api.policy.buys(model)

    def _network_models(self) -> set[str]:
        policy = self.api.policy
        names: set[str] = set()
        for peer in self.api.gossip.peers():
            if peer.alive and peer.id != self.me:
                names.update(peer.models)
        return {n for n in names if policy.buys(n)}

    # -- serving ------------------------------------------------------------------------------------
    async def serve(self, request: AppRequest) -> None:
        if self.tracing.enabled:
            await self._traced(request)
        else:
            await self._serve(request)

    async def _traced(self, request: AppRequest) -> None:
        """`_serve` in the request's span, current while it runs: the policy, backend and
        delegation spans nest in it. 5xx answers mark it failed."""
        span = self.tracing.start(
            "wwwserve.request",
            kind="server",
            attributes={
                "wwwserve.request_id": request.id,
                "wwwserve.endpoint": request.endpoint.value,
                "gen_ai.request.model": request.model,
                "wwwserve.stream": request.stream,
            },
        )
        status = 200
        try:
            with self.tracing.use(span):
                await self._serve(request)
        except ClientDisconnected:
            status = 499
            raise
        except GatewayError as exc:
            status = exc.status
            raise
        except BaseException:
            status = 500
            raise
        finally:
            span.set("http.response.status_code", status)
            span.set("wwwserve.route", ",".join(request.route or ((self.me,) if request.deployment else ())))
            if status >= 500:
                span.fail(f"HTTP {status}")
            span.end()

    async def _serve(self, request: AppRequest) -> None:
        model = request.model
        m = self.metrics
        status = 200
        error: str | None = None
        usage: Usage | None = None
        counted = False
        try:
            if not self.serves(model):
                if self._may_come_back(model):
                    raise BackendUnavailable(
                        f"no peer serving '{model}' is reachable from this node now; retry shortly",
                        headers={"retry-after": "1"},
                    )
                raise ModelNotFound(f"The model '{model}' does not exist on this node", param="model")
            m.in_flight.inc()
            counted = True
            usage = await self._answer(request)
        except ClientDisconnected:
            status, error = 499, "the app disconnected"
            m.client_disconnects.inc()
            raise
        except GatewayError as exc:
            status, error = exc.status, exc.message
            raise
        except BaseException as exc:
            status, error = 500, f"internal error: {type(exc).__name__}"
            raise
        finally:
            latency = time.perf_counter() - request.started
            if counted:
                m.in_flight.dec()
                m.request_done(request.endpoint.value, model, status, latency)
            self._record(request, model, status, usage, latency, error)
        if usage is not None:
            m.count_tokens(model, usage.prompt_tokens, usage.completion_tokens)

    def _record(
        self,
        request: AppRequest,
        model: str,  # as the app asked (a backend rewrites the body's)
        status: int,
        usage: Usage | None,
        latency: float,
        error: str | None,
    ) -> None:
        self.records.add(
            RequestRecord(
                id=request.id,
                started=wall_time(request.started),
                endpoint=request.endpoint.value,
                model=model,
                deployment=request.deployment,
                route=request.route or ((self.me,) if request.deployment else ()),
                status=status,
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
                latency_s=latency,
                ttft_s=request.ttft,
                error=error,
            )
        )

    async def _answer(self, request: AppRequest) -> Usage | None:
        policy = self.api.policy
        model = request.model
        group = self.deployments.group_name(model)
        local = group is not None
        info = request.info()
        if local and group != model:  # an alias or a wildcard group's model: policies see the group
            info = dataclasses.replace(info, model=group)
        if request.endpoint not in DELEGATED_ENDPOINTS:  # served by this node's deployments only
            if not local:
                raise ModelNotFound(
                    f"The model '{model}' is not served by this node for /v1/{request.endpoint}",
                    param="model",
                )
            return await self._local(info, request)
        deadline = request.started + self.request_timeout
        while True:
            with self.tracing.start("wwwserve.policy", attributes={"wwwserve.attempt": info.attempt}) as span:
                decision = policy.decide(info)
                span.set("wwwserve.decision", decision.value)
            if decision is Decision.LOCAL and not local:
                decision = Decision.DELEGATE
            if decision is Decision.LOCAL:
                return await self._local(info, request)
            if decision is Decision.DELEGATE:
                try:
                    return await self._delegate(info, request)
                except NoExecutor as exc:
                    self.dm.delegations.labels(model, "no_executor").inc()
                    if not local:
                        raise BackendUnavailable(
                            f"{exc}; retry shortly", headers={"retry-after": "1"}
                        ) from None
                return await self._local(info, request)
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
            await cancel_on_disconnect(request.receive, asyncio.sleep(wait))
            info = dataclasses.replace(info, attempt=info.attempt + 1)

    async def _local(self, info: RequestInfo, request: AppRequest) -> Usage | None:
        ok = False
        try:
            usage = await self._local_or_fallback(info, request)
            ok = True
            return usage
        finally:
            self.api.policy.on_request_done(info, "local", time.perf_counter() - request.started, ok)

    async def _local_or_fallback(self, info: RequestInfo, request: AppRequest) -> Usage | None:
        """The model's own deployments (with their retries), then `router_settings` fallback
        groups served here, then peers: each only if nothing was sent to the app yet."""
        model = request.model
        try:
            return await self._backend(request)
        except GatewayError as exc:
            if not worth_a_fallback(exc):
                raise
            failure = exc
        router = self.deployments.router
        context = failure.status == 400
        for group in router.fallbacks_for(model, context=context):
            if group == model or not self.deployments.serves(group):
                continue
            log.info("falling back", model=model, fallback=group, reason=failure.message)
            try:
                return await self._backend(request, group)
            except GatewayError as exc:
                if not worth_a_fallback(exc):
                    raise
                failure = exc
        if not context and request.endpoint in DELEGATED_ENDPOINTS and model in self._network_models():
            try:
                return await self._delegate(info, request)
            except NoExecutor:
                self.dm.delegations.labels(model, "no_executor").inc()
        raise failure

    async def _backend(self, request: AppRequest, model: str | None = None) -> Usage | None:
        """A local deployment of `model` (default: the one asked for) answers, in a span."""
        span = self.tracing.start(
            "wwwserve.backend", kind="client", attributes={"gen_ai.request.model": model or request.model}
        )
        with span:
            try:
                return await self.local.serve(request, self.local_route, model=model)
            finally:
                if request.deployment:
                    span.set("wwwserve.deployment", request.deployment)

    async def _delegate(self, info: RequestInfo, request: AppRequest) -> Usage | None:
        """Hand the request to peers. NoExecutor (nobody took it, nothing sent) leaves no trace:
        the caller falls back."""
        if not self.api.ledger.can_delegate(self.me):
            raise NoExecutor("this node's balance does not allow delegating")
        send = _Watch(request, request.send)
        outcome: bool | None = None
        receipts: list[Paid] = []
        try:
            if request.stream:
                relay = self.delegator.stream(info, request.endpoint, request.body, send)
                usage, receipts = await cancel_on_disconnect(request.receive, relay)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                work = self.delegator.complete(info, request.endpoint, request.body)
                answer, headers, usage, receipts = await cancel_on_disconnect(request.receive, work)
                await send_bytes(send, 200, answer, headers)
            outcome = True
        except NoExecutor:
            raise
        except BaseException:
            outcome = False
            raise
        finally:
            if outcome is not None:
                self.dm.delegations.labels(info.model, "ok" if outcome else "failed").inc()
                seconds = time.perf_counter() - request.started
                # Policies learn per executor (the receipt's signer): where the answer came from.
                where = receipts[-1][0]["body"]["id"] if receipts else "peer"
                self.api.policy.on_request_done(info, where, seconds, outcome)
        for receipt in receipts:
            await self.delegator.pay(receipt)
        return usage


class _Watch:
    """Notes what a delegated answer's first messages tell the access log: the route (from its
    header) and, for a stream, when the first byte went out."""

    __slots__ = ("request", "seen", "send")

    def __init__(self, request: AppRequest, send: Send) -> None:
        self.request = request
        self.send = send
        self.seen = False

    async def __call__(self, message: dict[str, Any]) -> None:
        if not self.seen:
            request = self.request
            if message["type"] == "http.response.start":
                for name, value in message.get("headers") or ():
                    if name == ROUTE_HEADER:
                        request.route = tuple(value.decode().split(","))
            elif message.get("body"):
                self.seen = True
                if request.stream:
                    request.ttft = time.perf_counter() - request.started
        await self.send(message)
