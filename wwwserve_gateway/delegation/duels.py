"""The entry side of duel-and-judge.

With the genesis' `duels.rate`, an app's delegated request also goes to a second executor drawn by
the router (never the first, never a relay); the app gets whichever answer starts first (`racing`),
and the other is collected in the background. Once both are in and verified, the entry pays the
one it did not relay, asks judges drawn by the seeded stake draw (`network.votes.judge_order`), each
with both texts in its own random order, and writes the `duel` operation with both receipts and
the signed votes; every node settles it the same way from its ledger. With `duels.canary_rate`, a
delegated request also sets off a canary: a question with a known answer, sent to two executors
like app traffic, whose duel every node can grade without the judges.

The entry gains nothing from a duel: it pays both executors and every judge that votes, and the
stake that moves goes between executors and judges.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Counter

from wwwserve_gateway.delegation import wire
from wwwserve_gateway.delegation.answers import AnswerReader, MalformedAnswer
from wwwserve_gateway.delegation.execution import Execution, ExecutorFailed, NoExecutor
from wwwserve_gateway.delegation.judging import KIND as JUDGE_KIND
from wwwserve_gateway.delegation.judging import judge_request
from wwwserve_gateway.delegation.racing import Contender, race
from wwwserve_gateway.network import canaries
from wwwserve_gateway.network.receipts import check_receipt, normalise_text
from wwwserve_gateway.network.votes import InvalidVote, check_vote, duel_seed, judge_order
from wwwserve_gateway.overlay.errors import OverlayError
from wwwserve_gateway.plugin_api.backend import Endpoint
from wwwserve_gateway.plugin_api.node import NodeAPI
from wwwserve_gateway.plugin_api.requests import RequestInfo

if TYPE_CHECKING:
    from wwwserve_gateway.delegation.entry import Delegator, Paid

log = structlog.get_logger(__name__)

DUELLED = frozenset({Endpoint.CHAT, Endpoint.COMPLETION})
CANARY_MIN_TOKENS = 64  # enough for any canary's answer, whatever the app request asked
CANARY_COPIED = ("stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p")
MAX_CANARY_TEXT = 16_384  # what a canary duel may carry of each answer (the ledger's bound)
# A second executor rated this many Elo points below the first is relayed only if the first fails:
# hedging buys latency, and must not buy it with the worst answer.
HEDGE_MARGIN = 50.0
# The first executor (the router's stake- and quality-weighted draw) is relayed if it starts within
# this; the second takes over only when the first is that slow: the tail a hedge is for.
HEDGE_PATIENCE_S = 2.0


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    paid: Paid

    @property
    def receipt(self) -> dict[str, Any]:
        return self.paid[0]


class DuelMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.duels = Counter(
            "wwwserve_duels",
            "Duels this node started as the entry, by outcome (settled; identical: the same text, "
            "nothing to judge; no_second: no second executor; failed: an answer failed; no_votes)",
            ["outcome"],
            registry=registry,
        )
        self.hedges = Counter(
            "wwwserve_duel_hedges",
            "Duelled requests by which answer the app got (first: the first executor's; second)",
            ["winner"],
            registry=registry,
        )
        self.judge_requests = Counter(
            "wwwserve_judge_requests",
            "Judges asked by this node, by outcome (voted, declined, unreachable, invalid)",
            ["outcome"],
            registry=registry,
        )
        self.canaries = Counter(
            "wwwserve_canaries",
            "Canary duels this node sent (questions with a known answer)",
            registry=registry,
        )


class Duels:
    def __init__(self, api: NodeAPI, metrics: DuelMetrics, rng: random.Random | None = None) -> None:
        self.api = api
        self.me = api.node_id
        self.net = api.genesis.network_id
        self.params = api.genesis.ledger.duels
        self.metrics = metrics
        self.rng = rng or random.Random()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- when ----------------------------------------------------------------------------------------
    def wanted(self, info: RequestInfo, endpoint: Endpoint, body: dict[str, Any]) -> bool:
        """Whether to duel this app request: a share `rate` of single-choice text requests."""
        return (
            self.params.rate > 0
            and not info.route
            and endpoint in DUELLED
            and body.get("n") in (None, 1)
            and self.rng.random() < self.params.rate
        )

    def maybe_canary(
        self, delegator: Delegator, info: RequestInfo, endpoint: Endpoint, body: dict[str, Any]
    ) -> None:
        if (
            self.params.canary_rate > 0
            and not info.route
            and endpoint is Endpoint.CHAT
            and self.rng.random() < self.params.canary_rate
        ):
            self._spawn(self._canary(delegator, info, body))

    # -- hedging -------------------------------------------------------------------------------------
    async def hedge(
        self, delegator: Delegator, info: RequestInfo, endpoint: Endpoint, ex: Execution, avoid: set[str]
    ) -> Execution:
        """Send `ex`'s request to a second executor too; the execution to relay is `ex` unless it is
        slower than HEDGE_PATIENCE_S to start (see `racing.race`). The duel goes on in the background."""
        a = Contender(ex)
        second = asyncio.ensure_future(self._second(delegator, info, ex, avoid))

        def worse(b: Contender, a: Contender) -> bool:
            rating = self.api.ledger.quality
            return rating(b.ex.executor, info.model) < rating(a.ex.executor, info.model) - HEDGE_MARGIN

        try:
            relayed, swapped = await race(a, second, worse, HEDGE_PATIENCE_S)
        except asyncio.CancelledError:  # the app left: nothing to relay, nothing to judge
            second.cancel()
            a.cancel()
            raise
        self.metrics.hedges.labels("second" if swapped else "first").inc()
        self._spawn(self._duel(delegator, info, endpoint, a, second, relayed))
        return relayed.view()

    async def _second(
        self, delegator: Delegator, info: RequestInfo, ex: Execution, avoid: set[str]
    ) -> Contender | None:
        try:
            other = await delegator.open(info, ex.request, {*avoid, ex.peer, ex.executor})
        except NoExecutor:
            return None
        return Contender(other)

    # -- the duel ------------------------------------------------------------------------------------
    async def _duel(
        self,
        delegator: Delegator,
        info: RequestInfo,
        endpoint: Endpoint,
        a: Contender,
        second: asyncio.Future[Contender | None],
        relayed: Contender | None,
        canary: dict[str, Any] | None = None,
    ) -> None:
        b = await second
        contenders = [a] if b is None else [a, b]
        answers: list[Answer | None] = []
        for c in contenders:
            await c.done()
            answer = self._read(delegator, c, endpoint, strike=c is not relayed)
            if answer is not None and c is not relayed:  # the relay pays for what it relayed
                await delegator.pay(answer.paid)
            answers.append(answer)
        if b is None:
            self._outcome("no_second")
            return
        if answers[0] is None or answers[1] is None:
            self._outcome("failed", why="an answer failed verification", first=answers[0] is not None)
            return
        first, other = answers[0], answers[1]
        ra, rb = check_receipt(first.receipt, self.net), check_receipt(other.receipt, self.net)
        if ra["text"] == rb["text"]:
            self._outcome("identical")
            return
        request = a.ex.request
        votes = await self._judge(
            (first.receipt, other.receipt),
            (ra, rb),
            info.model,
            endpoint,
            request.body,
            (first.text, other.text),
        )
        body: dict[str, Any] = {"receipts": [first.receipt, other.receipt], "votes": votes}
        if canary is not None:
            texts = [normalise_text(first.text), normalise_text(other.text)]
            if max(len(t) for t in texts) > MAX_CANARY_TEXT:
                self._outcome("failed", why="a canary answer is too long to carry")
                return
            body["canary"] = {
                "spec": canary,
                "request": {"id": request.id, "endpoint": endpoint.value, "body": request.body},
                "texts": texts,
            }
        elif not votes:
            self._outcome("no_votes")
            return
        try:
            await self.api.ledger.append_own("duel", body)
        except Exception as exc:
            self._outcome("failed", why=f"the ledger refused the duel: {exc!r}")
            return
        self._outcome(
            "settled",
            request=ra["request"][:16],
            executors=[ra["id"][:16], rb["id"][:16]],
            votes=len(votes),
            canary=canary is not None,
        )

    def _outcome(self, outcome: str, **about: Any) -> None:
        self.metrics.duels.labels(outcome).inc()
        log.info("duel " + outcome.replace("_", " "), **about)

    def _read(self, delegator: Delegator, c: Contender, endpoint: Endpoint, strike: bool) -> Answer | None:
        """A finished contender's text and verified receipt, or None if it failed."""
        model = c.ex.request.body["model"]
        reader = AnswerReader(endpoint, c.ex.request.id, model)
        digest = hashlib.sha256()
        try:
            for item in c.items:
                kind, payload = wire.check_item(item)
                if kind == "sse":
                    reader.events(payload)
                elif kind == "json":
                    reader.whole(payload)
                elif kind == "receipt":
                    paid = delegator.verify_receipt(payload, c.ex, digest.hexdigest(), reader, strike)
                    return Answer(reader.text, paid)
                if kind in ("sse", "json"):
                    digest.update(payload.encode())
                elif kind != "wait":
                    return None
        except (ExecutorFailed, MalformedAnswer, wire.WireError):
            return None
        return None

    # -- judging -------------------------------------------------------------------------------------
    async def _judge(
        self,
        records: tuple[dict[str, Any], dict[str, Any]],
        bodies: tuple[dict[str, Any], dict[str, Any]],
        model: str,
        endpoint: Endpoint,
        request: dict[str, Any],
        texts: tuple[str, str],
    ) -> list[dict[str, Any]]:
        """Signed votes from up to `judges` judges, asked in the seeded draw's order."""
        executors = (bodies[0]["id"], bodies[1]["id"])
        pool = {
            node: round(account.get("bonded", 0.0) * 1_000_000)
            for node, account in self.api.ledger.balances_view().items()
            if not account.get("barred") and node != self.me and node not in executors
        }
        wanted = self.params.judges
        order = judge_order(duel_seed(*records), pool, 2 * wanted)
        alive = {peer.id for peer in self.api.gossip.peers() if peer.alive}
        queue = [judge for judge in order if judge in alive]
        duel = bodies[0]["request"]
        hashes = (bodies[0]["text"], bodies[1]["text"])
        votes: list[dict[str, Any]] = []
        running: set[asyncio.Task[dict[str, Any] | None]] = set()
        try:
            while queue or running:
                while queue and len(running) + len(votes) < wanted:
                    judge = queue.pop(0)
                    flip = self.rng.random() < 0.5  # each judge sees its own order
                    shown = (texts[1], texts[0]) if flip else texts
                    expected = (hashes[1], hashes[0]) if flip else hashes
                    payload = judge_request(duel, model, endpoint.value, request, shown)
                    running.add(asyncio.create_task(self._ask(judge, payload, duel, expected)))
                if not running:
                    break
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                votes += [v for v in (t.result() for t in done) if v is not None]
                if len(votes) >= wanted:
                    break
        finally:
            for task in running:
                task.cancel()
        return votes[:wanted]

    async def _ask(
        self, judge: str, payload: dict[str, Any], duel: str, expected: tuple[str, str]
    ) -> dict[str, Any] | None:
        try:
            reply = await self.api.overlay.request(
                judge, JUDGE_KIND, payload, timeout=self.params.judge_timeout_s
            )
        except (OverlayError, TimeoutError) as exc:
            log.info("a judge did not answer", judge=judge[:16], error=str(exc))
            self.metrics.judge_requests.labels("unreachable").inc()
            return None
        vote = reply.get("vote") if isinstance(reply, dict) else None
        if vote is None:
            self.metrics.judge_requests.labels("declined").inc()
            return None
        try:
            body = check_vote(vote, self.net)
        except InvalidVote as exc:
            log.warning("a judge sent an invalid vote", judge=judge[:16], error=str(exc))
            self.metrics.judge_requests.labels("invalid").inc()
            return None
        if (body["id"], body["entry"], body["duel"], (body["a"], body["b"])) != (
            judge,
            self.me,
            duel,
            expected,
        ):
            log.warning("a judge's vote is about something else", judge=judge[:16])
            self.metrics.judge_requests.labels("invalid").inc()
            return None
        self.metrics.judge_requests.labels("voted").inc()
        return vote

    # -- canaries ------------------------------------------------------------------------------------
    async def _canary(self, delegator: Delegator, info: RequestInfo, app_body: dict[str, Any]) -> None:
        spec = canaries.make(self.rng)
        body: dict[str, Any] = {"model": info.model, "messages": canaries.messages(spec)}
        body.update({k: app_body[k] for k in CANARY_COPIED if k in app_body})
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] < CANARY_MIN_TOKENS:
                body[key] = CANARY_MIN_TOKENS
        request = wire.DelegatedRequest(uuid.uuid4().hex, Endpoint.CHAT, body, (self.me,), False)
        canary_info = RequestInfo.describe(request.id, Endpoint.CHAT.value, body, bool(body.get("stream")))
        try:
            ex = await delegator.open(canary_info, request, set())
        except NoExecutor:
            return
        self.metrics.canaries.inc()
        second = asyncio.ensure_future(self._second(delegator, canary_info, ex, set()))
        await self._duel(delegator, canary_info, Endpoint.CHAT, Contender(ex), second, None, spec)

    # -- lifecycle -----------------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(self._logged(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _logged(coro: Any) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a duel's failure must never reach the app or the node
            log.error("a duel failed", error=repr(exc))

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
