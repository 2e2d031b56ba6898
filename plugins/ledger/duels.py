"""Duel operations: what a duel's evidence must show, and the pure parts of its settlement.

A duel op, written by the entry node that sent one request to two executors, carries:
- `receipts`: both executors' signed receipts for the same request (same entry, model and request
  hash, different executors, different answer texts), each with the stake its executor committed;
- `votes`: judges' signed votes, each bound to this entry, this request and both answers' text hashes
  in the order that judge was shown them;
- `canary` (optional): for a request with a known answer, its spec, the request itself and both
  answers' texts, so every node checks that the request was that question and grades the answers.

`check_duel` turns a body into a `DuelCase` or raises InvalidOperation; it is pure. The fold then
settles the case against the balances at the op's place (`ledger_fold`): it keeps the votes of judges
the seeded draw allows (`network.votes.judge_order`), decides (`decide`), moves stake and updates
quality (`elo`) and judges' accuracy (`judge_weight`). The entry gains nothing from any of it: it
pays the judges, and is neither judge nor executor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wwwserve_gateway.network import canaries
from wwwserve_gateway.network.genesis import LedgerParams
from wwwserve_gateway.network.receipts import InvalidReceipt, check_receipt, request_hash, text_hash
from wwwserve_gateway.network.votes import InvalidVote, check_vote, duel_seed
from wwwserve_gateway.plugins.ledger.ops import InvalidOperation, Operation

MAX_CANARY_TEXT = 16_384  # characters of each answer a canary duel may carry
CANARY_ENDPOINT = "chat/completions"
START_RATING = 1500.0


@dataclass(frozen=True, slots=True)
class DuelCase:
    """A checked duel. A = receipts[0]'s executor, B = receipts[1]'s."""

    entry: str
    request: str  # the request hash: a duel settles once per (entry, request)
    model: str
    executors: tuple[str, str]
    committed: tuple[float, float]  # credits each executor committed
    seed: bytes
    ballots: Mapping[str, str]  # judge -> "A" | "B" | "tie" | "abstain", in terms of A and B above
    truth: str | None  # a canary's outcome by its known answer: "A" | "B" | "tie"; None otherwise


def _receipt(record: Any, net: str) -> dict[str, Any]:
    try:
        return check_receipt(record, net)
    except InvalidReceipt as exc:
        raise InvalidOperation(str(exc)) from None


def check_duel(op: Operation, params: LedgerParams, net: str) -> DuelCase:
    body = op.body
    if set(body) not in ({"receipts", "votes"}, {"receipts", "votes", "canary"}):
        raise InvalidOperation("a duel body is {receipts, votes} or {receipts, votes, canary}")
    records, votes = body["receipts"], body["votes"]
    if not isinstance(records, list) or len(records) != 2:
        raise InvalidOperation("a duel carries exactly two receipts")
    a, b = (_receipt(r, net) for r in records)
    if a["entry"] != op.author or b["entry"] != op.author:
        raise InvalidOperation("a duel is settled by the entry node of both receipts")
    if a["request"] != b["request"] or a["model"] != b["model"]:
        raise InvalidOperation("both duel receipts must answer the same request for the same model")
    if a["id"] == b["id"]:
        raise InvalidOperation("a duel needs two different executors")
    if a["text"] == b["text"]:
        raise InvalidOperation("identical answers are not a duel")
    judges = params.duels.judges
    if not isinstance(votes, list) or len(votes) > 2 * judges:
        raise InvalidOperation(f"a duel carries a list of at most {2 * judges} votes")
    ballots: dict[str, str] = {}
    for record in votes:
        try:
            vote = check_vote(record, net)
        except InvalidVote as exc:
            raise InvalidOperation(str(exc)) from None
        judge = vote["id"]
        if vote["entry"] != op.author or vote["duel"] != a["request"]:
            raise InvalidOperation("a vote is about another duel")
        if judge in (op.author, a["id"], b["id"]):
            raise InvalidOperation("a judge cannot be the entry or an executor of its duel")
        if judge in ballots:
            raise InvalidOperation("a judge voted twice")
        if {vote["a"], vote["b"]} != {a["text"], b["text"]}:
            raise InvalidOperation("a vote compares other answers than the duel's")
        ballots[judge] = _ballot(vote, a["text"])
    truth = _canary_truth(body["canary"], a, b) if "canary" in body else None
    return DuelCase(
        entry=op.author,
        request=a["request"],
        model=a["model"],
        executors=(a["id"], b["id"]),
        committed=(a["stake"], b["stake"]),
        seed=duel_seed(records[0], records[1]),
        ballots=ballots,
        truth=truth,
    )


def _ballot(vote: dict[str, Any], text_a: str) -> str:
    """A vote in terms of the duel's A (receipts[0]) and B, whatever order its judge saw."""
    choice = vote["choice"]
    if choice not in ("A", "B"):
        return choice
    chosen = vote["a"] if choice == "A" else vote["b"]
    return "A" if chosen == text_a else "B"


def _canary_truth(canary: Any, a: dict[str, Any], b: dict[str, Any]) -> str:
    if not isinstance(canary, dict) or set(canary) != {"spec", "request", "texts"}:
        raise InvalidOperation("a duel's canary is {spec, request, texts}")
    try:
        spec = canaries.check_spec(canary["spec"])
    except canaries.InvalidCanary as exc:
        raise InvalidOperation(str(exc)) from None
    request, texts = canary["request"], canary["texts"]
    if not isinstance(request, dict) or set(request) != {"id", "endpoint", "body"}:
        raise InvalidOperation("a canary's request is {id, endpoint, body}")
    req_body = request["body"]
    if (
        request["endpoint"] != CANARY_ENDPOINT
        or not isinstance(request["id"], str)
        or not isinstance(req_body, dict)
        or req_body.get("messages") != canaries.messages(spec)
        or req_body.get("model") != a["model"]
    ):
        raise InvalidOperation("a canary's request asks its spec's question of the duel's model")
    if request_hash(request["id"], request["endpoint"], req_body) != a["request"]:
        raise InvalidOperation("a canary's request is not the one the receipts answer")
    if (
        not isinstance(texts, list)
        or len(texts) != 2
        or not all(isinstance(t, str) and len(t) <= MAX_CANARY_TEXT for t in texts)
    ):
        raise InvalidOperation(f"a canary carries both answers' texts (at most {MAX_CANARY_TEXT} characters)")
    if text_hash(texts[0]) != a["text"] or text_hash(texts[1]) != b["text"]:
        raise InvalidOperation("a canary's texts are not the answers the receipts sign")
    right_a, right_b = (canaries.is_right(spec, t) for t in texts)
    return "tie" if right_a == right_b else ("A" if right_a else "B")


def judge_weight(right: int, graded: int) -> float:
    """A judge's weight: its accuracy on canary duels with a right answer, Laplace-smoothed (a judge
    never graded weighs 1/2; one that is always wrong tends to 0)."""
    return (right + 1) / (graded + 2)


def decide(ballots: Mapping[str, str], weights: Mapping[str, float], truth: str | None) -> str | None:
    """A duel's outcome: "A", "B" or "tie"; None when nothing can be decided (no counted vote and no
    known answer). A canary is decided by its known answer; otherwise the choice with strictly the
    most judge weight wins, and equal weights are a tie."""
    if truth is not None:
        return truth
    totals: dict[str, float] = {}
    for judge, choice in sorted(ballots.items()):
        if choice != "abstain":
            totals[choice] = totals.get(choice, 0.0) + weights.get(judge, 0.5)
    if not totals:
        return None
    ranked = sorted(totals.items(), key=lambda kv: kv[1], reverse=True)
    if len(ranked) > 1 and ranked[1][1] == ranked[0][1]:
        return "tie"
    return ranked[0][0]


def elo(rating_a: float, rating_b: float, score_a: float, k: float) -> tuple[float, float]:
    """Both ratings after a game A scored `score_a` in (1 win, 0.5 tie, 0 loss)."""
    expected_a = 1 / (1 + 10 ** ((rating_b - rating_a) / 400))
    delta = k * (score_a - expected_a)
    return rating_a + delta, rating_b - delta
