"""The judge side of a duel: a node asked to compare two answers answers with a signed vote.

The request (`wwwserve.judge`) carries the duel's request hash, the model, the request body and the
two answers' texts in the order this judge is to see them; no node ids. The node hands them to its
judge plugin and signs what it returns, bound to the asking entry, the duel and both texts' hashes in
that order. A judge that fails or runs out of time abstains; a node judges a few duels at a time and
declines the rest, so a flood of duels cannot take its backends.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from wwwserve_gateway.network.receipts import HASH, normalise_text, text_hash
from wwwserve_gateway.network.votes import sign_vote
from wwwserve_gateway.plugin_api.judge import JudgeCase, Verdict
from wwwserve_gateway.plugin_api.node import NodeAPI

log = structlog.get_logger(__name__)

KIND = "wwwserve.judge"
ENDPOINTS = ("chat/completions", "completions")
MAX_ANSWER_CHARS = 65_536
CONCURRENT_JUDGEMENTS = 2


class InvalidJudgeRequest(ValueError):
    pass


def judge_request(
    duel: str, model: str, endpoint: str, request: dict[str, Any], answers: tuple[str, str]
) -> dict[str, Any]:
    return {"duel": duel, "model": model, "endpoint": endpoint, "request": request, "answers": list(answers)}


def parse_judge_request(body: Any) -> JudgeCase:
    if not isinstance(body, dict) or set(body) != {"duel", "model", "endpoint", "request", "answers"}:
        raise InvalidJudgeRequest("a judge request is {duel, model, endpoint, request, answers}")
    duel, model, endpoint, request, answers = (
        body["duel"],
        body["model"],
        body["endpoint"],
        body["request"],
        body["answers"],
    )
    if not isinstance(duel, str) or not HASH.fullmatch(duel):
        raise InvalidJudgeRequest("duel must be a sha256 hex digest")
    if not isinstance(model, str) or endpoint not in ENDPOINTS or not isinstance(request, dict):
        raise InvalidJudgeRequest(f"model is a string, endpoint one of {ENDPOINTS}, request an object")
    if (
        not isinstance(answers, list)
        or len(answers) != 2
        or not all(isinstance(a, str) and len(a) <= MAX_ANSWER_CHARS for a in answers)
    ):
        raise InvalidJudgeRequest(f"answers are two strings of at most {MAX_ANSWER_CHARS} characters")
    a, b = (normalise_text(t) for t in answers)
    if a == b:
        raise InvalidJudgeRequest("the two answers are the same")
    return JudgeCase(duel, model, endpoint, request, (a, b))


class JudgeService:
    def __init__(self, api: NodeAPI) -> None:
        self.api = api
        self.timeout = api.genesis.ledger.duels.judge_timeout_s
        self._slots = asyncio.Semaphore(CONCURRENT_JUDGEMENTS)

    def register(self) -> None:
        self.api.overlay.on_request(KIND, self.handle)

    async def handle(self, peer_id: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            case = parse_judge_request(body)
        except InvalidJudgeRequest as exc:
            log.warning("refused a judge request", peer=peer_id[:16], reason=str(exc))
            return {"declined": str(exc)}
        if self._slots.locked():
            return {"declined": "busy"}
        async with self._slots:
            verdict = await self._verdict(case)
        vote = sign_vote(
            self.api.identity,
            net=self.api.genesis.network_id,
            entry=peer_id,
            duel=case.duel,
            a=text_hash(case.answers[0]),
            b=text_hash(case.answers[1]),
            choice=verdict.value,
        )
        return {"vote": vote}

    async def _verdict(self, case: JudgeCase) -> Verdict:
        try:
            # Cut off a little before the entry's own deadline, so the abstention still arrives.
            async with asyncio.timeout(self.timeout * 0.9):
                return Verdict(await self.api.judge.judge(case))
        except TimeoutError:
            log.info("the judge ran out of time; abstaining", duel=case.duel[:16])
        except Exception as exc:  # a plugin's failure is an abstention, never a crash
            log.warning("the judge failed; abstaining", duel=case.duel[:16], error=repr(exc))
        return Verdict.ABSTAIN
