"""The entry side: try the router's candidates in order, relay the answer, fail over.

An executor that declines, cannot be reached, stalls, breaks the protocol or fails with a server
error is replaced by the next candidate. Before any output that is invisible to the app; mid-stream
the answer continues at the next executor from the text already sent (`continuation`). What reaches
the app is checked and rewritten (`answers`). Only a verified receipt is paid, and only for the
tokens the entry can verify; a receipt that fails verification is counted and not paid, one that
claims too much is paid its verified part, and either way its executor is struck (`strikes`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import structlog

from wwwserve_gateway.delegation import wire
from wwwserve_gateway.delegation.answers import AnswerReader, MalformedAnswer, prompt_bound
from wwwserve_gateway.delegation.continuation import NOTHING, Stitcher, continuation_body, progress
from wwwserve_gateway.delegation.duels import Duels
from wwwserve_gateway.delegation.execution import Execution, ExecutorFailed, ExecutorStalled, NoExecutor
from wwwserve_gateway.delegation.metrics import DelegationMetrics
from wwwserve_gateway.delegation.strikes import Strikes
from wwwserve_gateway.http.asgi import SSE_HEADERS, Send
from wwwserve_gateway.http.errors import BackendError, UpstreamError
from wwwserve_gateway.http.sse import DONE
from wwwserve_gateway.network.receipts import (
    InvalidReceipt,
    check_receipt,
    encode_receipt,
    request_hash,
    text_hash,
)
from wwwserve_gateway.overlay.errors import OverlayError, PeerTimeout
from wwwserve_gateway.plugin_api.backend import Endpoint, Usage
from wwwserve_gateway.plugin_api.node import NodeAPI
from wwwserve_gateway.plugin_api.requests import RequestInfo
from wwwserve_gateway.plugin_api.requests import max_tokens as request_max_tokens
from wwwserve_gateway.tracing import NO_TRACING, Tracing

log = structlog.get_logger(__name__)

# The executor answers accept or decline before doing any work: waiting longer means it is stuck.
ACCEPT_TIMEOUT_S = 2.0
ROUTE_HEADER = b"x-wwwserve-route"
# The share of its bonded stake an executor must commit in a receipt (stake moves while it works).
COMMIT_SHARE = 0.5
RECEIPT_HEADER = b"x-wwwserve-receipt"


Paid = tuple[dict[str, Any], tuple[int, int]]  # a signed receipt, and the (prompt, completion) tokens paid


def answer_id(info: RequestInfo) -> str:
    return ("chatcmpl-" if info.endpoint == Endpoint.CHAT else "cmpl-") + info.id


class Delegator:
    def __init__(
        self,
        api: NodeAPI,
        metrics: DelegationMetrics,
        stall_timeout: float,
        strikes: Strikes | None = None,
        duels: Duels | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.api = api
        self.tracing = tracing  # the dispatcher and the executor trace through it too
        self.me = api.node_id
        self.net = api.genesis.network_id
        self.metrics = metrics
        self.stall_timeout = stall_timeout
        self.strikes = strikes or Strikes()
        self.duels = duels

    # -- finding an executor ---------------------------------------------------------------------
    async def open(
        self,
        info: RequestInfo,
        request: wire.DelegatedRequest,
        avoid: set[str],
    ) -> Execution:
        """Send the request to candidates in turn until one accepts."""
        avoid |= self.strikes.avoided()
        ask = dataclasses.replace(info, route=request.route, avoid=tuple(avoid))
        body = request.to_wire()
        for peer in self.api.router.candidates(ask):
            if peer in avoid or peer in request.route:
                continue
            span = self.tracing.start(
                "wwwserve.delegation.attempt", kind="client", attributes={"wwwserve.peer": peer}
            )
            try:
                sent = wire.with_trace(body, span.traceparent)
                items = self.api.overlay.stream(peer, wire.KIND, sent, timeout=self.stall_timeout)
                outcome = await self._first_item(peer, items, request.route)
            except BaseException:
                span.end()
                raise
            if isinstance(outcome, tuple):
                self.metrics.attempts.labels("accepted").inc()
                span.set("wwwserve.outcome", "accepted")
                span.set("wwwserve.route", ",".join(outcome))
                return Execution(peer, outcome, request, items, span)
            self.metrics.attempts.labels(outcome).inc()
            span.set("wwwserve.outcome", outcome)
            span.end()
            await items.aclose()  # type: ignore[attr-defined]
            avoid.add(peer)
        raise NoExecutor(f"no peer accepted the request for '{info.model}'")

    async def _first_item(
        self, peer: str, items: AsyncIterator[dict[str, Any]], route: tuple[str, ...]
    ) -> tuple[str, ...] | str:
        """The accepted route, or why not: declined, unreachable, timeout or invalid."""
        try:
            async with asyncio.timeout(ACCEPT_TIMEOUT_S):
                first = await anext(items)
            kind, payload = wire.check_item(first)
        except (TimeoutError, PeerTimeout):
            return "timeout"
        except (OverlayError, StopAsyncIteration):
            return "unreachable"
        except wire.WireError as exc:
            log.warning("executor broke the protocol", peer=peer[:16], reason=str(exc))
            return "invalid"
        if kind == "decline":
            log.debug("candidate declined", peer=peer[:16], reason=payload)
            return "declined"
        full = payload if kind == "accept" else ()
        if len(full) <= len(route) or full[: len(route)] != route or full[len(route)] != peer:
            log.warning("executor broke the protocol", peer=peer[:16], reason=f"first item {kind!r}")
            return "invalid"
        return full

    # -- receipts ----------------------------------------------------------------------------------
    def verify_receipt(
        self, record: Any, ex: Execution, response: str, reader: AnswerReader, strike: bool = True
    ) -> Paid:
        """The receipt and the tokens to pay for it; ExecutorFailed (and a strike, unless this
        answer was already checked) if it is wrong."""
        struck = self._struck if strike else lambda executor, reason: None
        try:
            body = check_receipt(record, self.net)
        except InvalidReceipt as exc:
            struck(ex.executor, "bad_receipt")
            raise ExecutorFailed(str(exc)) from None
        req = ex.request
        problems = [
            body["id"] != ex.executor and "signed by another node than the executor",
            body["entry"] != self.me and "names another entry node",
            body["request"] != request_hash(req.id, req.endpoint.value, req.body) and "another request",
            body["response"] != response and "another response than the bytes received",
            body["text"] != text_hash(reader.text) and "another text than the answer's",
            body["model"] != req.body["model"] and "another model",
        ]
        wrong = [p for p in problems if p]
        if wrong:
            struck(ex.executor, "bad_receipt")
            raise ExecutorFailed("receipt " + "; ".join(wrong))
        # A duel's loser forfeits part of the stake it committed: committing much less than it has
        # bonded (what the router weighed it by) would make it a duellist with nothing at risk.
        if body["stake"] < COMMIT_SHARE * self.api.ledger.account(ex.executor).bonded:
            struck(ex.executor, "uncommitted")
        # The request sent (a continuation's max_tokens is lower) bounds what the receipt may claim.
        prompt = min(body["prompt_tokens"], prompt_bound(req.body))
        completion = min(body["completion_tokens"], reader.completion_bound(request_max_tokens(req.body)))
        if (prompt, completion) != (body["prompt_tokens"], body["completion_tokens"]):
            log.warning(
                "receipt claims more tokens than the bytes hold; paying the verified part",
                executor=ex.executor[:16],
                claimed=(body["prompt_tokens"], body["completion_tokens"]),
                paid=(prompt, completion),
            )
            struck(ex.executor, "inflated_receipt")
        return record, (prompt, completion)

    def _failed(self, ex: Execution, exc: ExecutorFailed, avoid: set[str]) -> None:
        ex.span.fail(str(exc))
        avoid.update((ex.peer, ex.executor))
        if isinstance(exc, ExecutorStalled):  # silent without a heartbeat: frozen, or hostile
            self.strikes.strike(ex.executor)

    def _struck(self, executor: str, reason: str) -> None:
        self.metrics.bad_receipts.labels(reason).inc()
        self.strikes.strike(executor)

    async def pay(self, paid: Paid) -> None:
        record, tokens = paid
        await self.api.ledger.settle(record, tokens)

    # -- relaying ----------------------------------------------------------------------------------
    def _duel_wanted(self, info: RequestInfo, endpoint: Endpoint, body: dict[str, Any]) -> bool:
        """Whether this app request is duelled (and, by chance, sets off a canary)."""
        if self.duels is None:
            return False
        self.duels.maybe_canary(self, info, endpoint, body)
        return self.duels.wanted(info, endpoint, body)

    def _request(self, info: RequestInfo, endpoint: Endpoint, body: dict[str, Any], cont: bool):
        return wire.DelegatedRequest(info.id, endpoint, body, (self.me,), cont)

    async def complete(
        self, info: RequestInfo, endpoint: Endpoint, body: dict[str, Any]
    ) -> tuple[bytes, list[tuple[bytes, bytes]], Usage, list[Paid]]:
        """A non-streamed answer from a peer: (body, headers, usage, receipts to pay). Raises
        NoExecutor. Paying is left to the caller, after the answer is sent: storing the debt
        durably takes a disk flush the app need not wait for."""
        avoid: set[str] = set()
        duel = self._duel_wanted(info, endpoint, body)
        while True:
            ex = await self.open(info, self._request(info, endpoint, body, False), avoid)
            if duel:
                ex, duel = await self.duels.hedge(self, info, endpoint, ex, avoid), False
            try:
                answer, paid = await self._collect(ex, AnswerReader(endpoint, answer_id(info), body["model"]))
            except ExecutorFailed as exc:
                log.warning("executor failed", executor=ex.executor[:16], error=str(exc))
                self.metrics.failovers.labels("before_output").inc()
                self._failed(ex, exc, avoid)
                continue
            finally:
                await ex.aclose()
            headers = [
                (ROUTE_HEADER, ",".join(ex.route).encode()),
                (RECEIPT_HEADER, encode_receipt(paid[0]).encode()),
            ]
            prompt, completion = paid[1]
            return answer, headers, Usage(prompt, completion, prompt + completion), [paid]

    async def _collect(self, ex: Execution, reader: AnswerReader) -> tuple[bytes, Paid]:
        answer: str | None = None
        async for kind, payload in ex:
            if kind == "json" and answer is None:
                answer = payload
            elif kind == "error":
                status, text = payload
                if status < 500:  # the request's fault: every executor would say the same
                    raise UpstreamError.from_response(status, text.encode(), backend=ex.executor[:16])
                raise ExecutorFailed(f"server error {status}")
            elif kind == "receipt" and answer is not None:
                try:
                    relayed = reader.whole(answer)
                except MalformedAnswer as exc:
                    self._struck(ex.executor, "garbage")
                    raise ExecutorFailed(f"the answer is {exc}") from None
                response = hashlib.sha256(answer.encode()).hexdigest()
                return relayed, self.verify_receipt(payload, ex, response, reader)
            else:
                raise ExecutorFailed(f"unexpected item {kind!r}")
        raise ExecutorFailed("the answer ended without a receipt")

    async def stream(
        self, info: RequestInfo, endpoint: Endpoint, body: dict[str, Any], send: Send
    ) -> tuple[Usage, list[Paid]]:
        """Relay a streamed answer from peers to the app; return the usage and the receipts to pay.
        Raises NoExecutor only if nothing was sent yet; later failures end the stream with an
        error event."""
        paid: list[Paid] = []
        avoid: set[str] = set()
        started = False  # the app has the response's head
        done = NOTHING  # what earlier executors' streams gave the app
        trailer: list[str] = []
        usage = Usage()
        attempt_body, stitch = body, None
        duel = self._duel_wanted(info, endpoint, body)
        while True:
            request = self._request(info, endpoint, attempt_body, stitch is not None)
            try:
                ex = await self.open(info, request, avoid)
            except NoExecutor:
                if not started:
                    raise
                await _send_text(send, _error_event("no other executor could continue the answer"))
                return usage, paid
            if duel:
                ex, duel = await self.duels.hedge(self, info, endpoint, ex, avoid), False
            digest = hashlib.sha256()
            reader = AnswerReader(endpoint, answer_id(info), body["model"])
            try:
                receipt = None
                async for kind, payload in ex:
                    if kind == "sse" and receipt is None:
                        try:
                            relayed = reader.events(payload)
                        except MalformedAnswer as exc:
                            self._struck(ex.executor, "garbage")
                            raise ExecutorFailed(f"an SSE event that is {exc}") from None
                        digest.update(payload.encode())
                        out = relayed if stitch is None else stitch(relayed)
                        if not started:
                            route = ",".join(ex.route).encode()
                            headers = [*SSE_HEADERS, (ROUTE_HEADER, route)]
                            await send({"type": "http.response.start", "status": 200, "headers": headers})
                            started = True
                        await _send_text(send, out)
                    elif kind == "error":
                        status, text = payload
                        if status < 500 and not started:
                            raise UpstreamError.from_response(status, text.encode(), backend=ex.executor[:16])
                        raise ExecutorFailed(f"server error {status}")
                    elif kind == "receipt" and receipt is None:
                        receipt = self.verify_receipt(payload, ex, digest.hexdigest(), reader)
                    else:
                        raise ExecutorFailed(f"unexpected item {kind!r}")
                if receipt is None:
                    raise ExecutorFailed("the stream ended without a receipt")
            except ExecutorFailed as exc:
                stage = "mid_stream" if started else "before_output"
                log.warning("executor failed", executor=ex.executor[:16], stage=stage, error=str(exc))
                self.metrics.failovers.labels(stage).inc()
                self._failed(ex, exc, avoid)
                if not started:
                    continue
                done = progress(done, reader)
                if done.finished:
                    break
                resumed = continuation_body(endpoint, body, done)
                if resumed is None:
                    await _send_text(send, _error_event("the executor failed and the answer cannot resume"))
                    return usage, paid
                attempt_body, stitch = resumed, Stitcher(done)
                continue
            finally:
                await ex.aclose()
            paid.append(receipt)
            usage.prompt_tokens += receipt[1][0]
            usage.completion_tokens += receipt[1][1]
            trailer.append(
                f": wwwserve-route {','.join(ex.route)}\n: wwwserve-receipt {encode_receipt(receipt[0])}\n\n"
            )
            break
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        await _send_text(send, "".join(trailer))
        await send({"type": "http.response.body", "body": DONE, "more_body": True})
        return usage, paid


async def _send_text(send: Send, text: str) -> None:
    if text:
        await send({"type": "http.response.body", "body": text.encode(), "more_body": True})


def _error_event(message: str) -> str:
    err = BackendError(message)
    return "data: " + err.body().decode() + "\n\n"
