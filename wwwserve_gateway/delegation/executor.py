"""The executor side: serve a peer's request on a local backend, or relay it onward.

The first item answers at once: accept or decline, by this node's policy. A served request streams
its answer back and ends with a signed receipt whose response hash covers exactly the bytes sent
(and whose text hash, the answer's text, with the stake this node committed, serve duels).
When the entry gives up (timeout, failover, its client left) the overlay cancels this handler, and
the backend request is closed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import structlog

from wwwserve_gateway.delegation import wire
from wwwserve_gateway.delegation.answers import AnswerText
from wwwserve_gateway.delegation.debtors import Debtors
from wwwserve_gateway.delegation.entry import Delegator, NoExecutor
from wwwserve_gateway.delegation.metrics import DelegationMetrics
from wwwserve_gateway.deployments import Deployments
from wwwserve_gateway.http.errors import GatewayError, InvalidRequest
from wwwserve_gateway.http.sse import DONE
from wwwserve_gateway.network.receipts import request_hash, sign_receipt, text_hash
from wwwserve_gateway.openai.protocol import REQUEST_TYPES, validate_request
from wwwserve_gateway.plugin_api.backend import Backend, Endpoint, Usage
from wwwserve_gateway.plugin_api.node import NodeAPI
from wwwserve_gateway.plugin_api.policy import Decision
from wwwserve_gateway.plugin_api.requests import RequestInfo

log = structlog.get_logger(__name__)

DONE_TEXT = DONE.decode()
T = TypeVar("T")


class _Answer:
    usage: Usage | None = None


async def _answer(
    backend: Backend, req: wire.DelegatedRequest, call: dict[str, Any], answer: _Answer
) -> AsyncIterator[dict[str, Any]]:
    """The backend's answer as wire items (sse or json); its usage lands in `answer`."""
    if call.get("stream") and req.endpoint is not Endpoint.EMBEDDING:
        sse = await backend.stream(req.endpoint, call)
        try:
            async for piece in sse:
                text = piece.decode()
                if text.endswith(DONE_TEXT):
                    text = text[: -len(DONE_TEXT)]
                if text:
                    yield wire.sse(text)
        finally:
            await sse.aclose()
        answer.usage = sse.usage
    else:
        reply = await backend.complete(req.endpoint, call)
        yield wire.json_answer(reply.body.decode())
        answer.usage = reply.usage


class _Failed:
    def __init__(self, error: Exception) -> None:
        self.error = error


_END = object()


async def with_heartbeats(source: AsyncIterator[T], every: float) -> AsyncIterator[T | None]:
    """`source`'s items, and None when `every` to 2 x `every` seconds pass without one, so the entry
    knows this node is at work through a long prefill or an answer that is not streamed. The source
    runs in a task of its own and a ticker of its own adds the heartbeats: a timeout per item would
    cost more than the relay itself. A queue of one keeps the backpressure."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
    moved = False

    async def pump() -> None:
        nonlocal moved
        try:
            async for item in source:
                moved = True
                await queue.put(item)
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put(_Failed(exc))
            return
        await queue.put(_END)

    async def tick() -> None:
        nonlocal moved
        while True:
            await asyncio.sleep(every)
            if not moved and queue.empty():
                queue.put_nowait(None)
            moved = False

    tasks = [asyncio.create_task(pump()), asyncio.create_task(tick())]
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _read_text(reader: AnswerText, item: dict[str, Any]) -> None:
    if item["t"] == "sse":
        reader.events(item["d"])
    elif item["t"] == "json":
        reader.whole(item["d"])


PAYMENT_GRACE_S = 5.0  # slack on top of the payment windows and the replication


class PeerExecutor:
    def __init__(
        self, api: NodeAPI, deployments: Deployments, delegator: Delegator, metrics: DelegationMetrics
    ) -> None:
        self.api = api
        self.me = api.node_id
        self.deployments = deployments
        self.delegator = delegator
        self.metrics = metrics
        genesis = api.genesis
        # Two payment windows, then the time the payment takes to replicate here (a few syncs).
        sync_s = genesis.gossip.interval_s * genesis.gossip.sync_every_rounds
        self.debtors = Debtors(
            lambda entry, request: api.ledger.is_paid(self.me, entry, request),
            grace_s=2 * genesis.ledger.payment_batch_window_s + 4 * sync_s + PAYMENT_GRACE_S,
        )
        self.closing = False  # a graceful stop: new requests are declined, those served finish
        self._serving = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def drain(self, within_s: float) -> int:
        """Decline new delegated requests and wait (at most `within_s`) for those being served to
        finish, so a stopping executor hands over whole answers with their receipts. Returns how
        many were still running at the deadline."""
        self.closing = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                await self._idle.wait()
        return self._serving

    def register(self) -> None:
        """Start answering peers' delegated requests."""
        self.api.overlay.on_stream(wire.KIND, self._traced if self.delegator.tracing.enabled else self.handle)

    async def _traced(self, peer_id: str, raw: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """`handle` in a span of the overlay hop, a child of the sender's span when the request
        names one: current for the stream's whole life (its own task), so backend and relay spans
        nest under it."""
        tracing = self.delegator.tracing
        route = raw.get("route") if isinstance(raw, dict) else None
        attributes = {"wwwserve.peer": peer_id, "wwwserve.hops": len(route) if isinstance(route, list) else 0}
        hop = tracing.start(
            "wwwserve.overlay.hop", kind="server", traceparent=wire.trace_context(raw), attributes=attributes
        )
        first = True
        with hop, tracing.use(hop):
            async for item in self.handle(peer_id, raw):
                if first:
                    first = False
                    hop.set("wwwserve.outcome", "accepted" if item["t"] == "accept" else "declined")
                    if item["t"] == "decline":
                        hop.set("wwwserve.reason", item["reason"][:200])
                yield item

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
        # A peer names any model it likes: only the ones served here become metric labels.
        model = info.model if self.deployments.serves(info.model) else "?"
        if self.closing:
            self.metrics.peer_requests.labels(model, "declined").inc()
            yield wire.decline("stopping")
            return
        if self.debtors.refuses(req.entry):
            self.metrics.peer_requests.labels(model, "unpaid").inc()
            yield wire.decline("the entry node has not paid for earlier requests")
            return
        decision = self.api.policy.accept(info)
        if decision is Decision.LOCAL and self.deployments.serves(model):
            try:
                backend = self.deployments.pick(model)
            except GatewayError as exc:
                self.metrics.peer_requests.labels(model, "declined").inc()
                yield wire.decline(exc.message)
                return
            self.metrics.peer_requests.labels(model, "served").inc()
            yield wire.accept((*req.route, self.me))
            async for item in self._serve(backend, req, info):
                yield item
        elif decision is Decision.DELEGATE:
            async for item in self._relay(info, req, model):
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
        text = AnswerText()  # what the receipt's `text` hashes
        stake = self.api.ledger.account(self.me).bonded  # what this node puts at risk in a duel
        started = time.time()
        ok = False
        answer = _Answer()
        self.metrics.peer_in_flight.inc()
        self._serving += 1
        self._idle.clear()
        span = self.delegator.tracing.start(
            "wwwserve.backend", kind="client", attributes={"wwwserve.deployment": backend.id}
        )
        try:
            with self.deployments.lease(backend) as lease:
                try:
                    async for item in with_heartbeats(_answer(backend, req, call, answer), wire.HEARTBEAT_S):
                        if item is None:
                            yield wire.waiting()
                            continue
                        digest.update(item["d"].encode())
                        _read_text(text, item)
                        yield item
                except GatewayError as exc:
                    span.fail(exc.message)
                    log.info("backend failed a peer's request", backend=backend.id, error=exc.message)
                    self.metrics.peer_requests.labels(backend.model_name, "failed").inc()
                    yield wire.error(exc.status, exc.body().decode())
                    return
                usage = answer.usage or Usage()
                lease.used(usage)
            self.debtors.issued(req.entry, request)
            record = sign_receipt(
                self.api.identity,
                net=self.api.genesis.network_id,
                entry=req.entry,
                request=request,
                response=digest.hexdigest(),
                text=text_hash(text.text),
                stake=stake,
                model=body["model"],
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                started=started,
                finished=time.time(),
            )
            ok = True
            yield wire.receipt(record)
        finally:
            span.end()
            self.metrics.peer_in_flight.dec()
            self._serving -= 1
            if not self._serving:
                self._idle.set()
            self.api.policy.on_request_done(info, "local", time.time() - started, ok)

    async def _relay(
        self, info: RequestInfo, req: wire.DelegatedRequest, label: str
    ) -> AsyncIterator[dict[str, Any]]:
        """Multi-hop: pass the request on with this node added to the route; items go back as
        they come (the entry checks them, and the receipt is the final executor's)."""
        onward = dataclasses.replace(req, route=(*req.route, self.me))
        try:
            ex = await self.delegator.open(info, onward, set())
        except NoExecutor:
            self.metrics.peer_requests.labels(label, "declined").inc()
            yield wire.decline("busy, and no peer to relay to")
            return
        self.metrics.peer_requests.labels(label, "relayed").inc()
        try:
            yield wire.accept(ex.route)
            async for item in ex.items:
                yield item
        finally:
            await ex.aclose()
