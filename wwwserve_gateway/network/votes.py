"""Judges' votes: a judge's signed verdict on one duel, bound to the two answers it saw.

`a` and `b` are the hashes of the two answers' texts in the order this judge was shown them (each
judge sees its own random order), so a vote can only count for the answer it was about, whatever
order the entry chose. `choice` is "A", "B", "tie", or "abstain" (the judge could not be read).

Who judges is not the entry's choice. `judge_order` ranks the staked nodes by a proportional-to-stake
draw seeded by both executors' receipt signatures (`duel_seed`), which the entry learns only once
both answers are in; it asks judges in that order, and the ledger counts only votes from the first
`2 x judges` of the same ranking (the slack absorbs judges that were offline or busy, and stakes
that moved while the duel ran).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

from wwwserve_gateway.network.identity import (
    NODE_ID,
    InvalidSignature,
    NodeIdentity,
    verify_record,
)
from wwwserve_gateway.network.receipts import HASH

VOTE_KEYS = frozenset({"id", "kind", "net", "entry", "duel", "a", "b", "choice"})
CHOICES = ("A", "B", "tie", "abstain")


class InvalidVote(ValueError):
    pass


def sign_vote(
    identity: NodeIdentity, *, net: str, entry: str, duel: str, a: str, b: str, choice: str
) -> dict[str, Any]:
    body = {"id": identity.node_id, "kind": "vote", "net": net, "entry": entry, "duel": duel, "a": a, "b": b}
    return identity.sign_record({**body, "choice": choice})


def check_vote(record: Any, net: str) -> dict[str, Any]:
    """The body of a signed vote of network `net`, after checking its signature and fields."""
    try:
        body = verify_record(record)
    except InvalidSignature as exc:
        raise InvalidVote(f"vote: {exc}") from None
    if set(body) != VOTE_KEYS or body["kind"] != "vote":
        raise InvalidVote(f"a vote has exactly the keys {sorted(VOTE_KEYS)} and kind 'vote'")
    if body["net"] != net:
        raise InvalidVote("a vote of another network")
    if not isinstance(body["entry"], str) or not NODE_ID.fullmatch(body["entry"]):
        raise InvalidVote("a vote's entry must be a node id")
    for field in ("duel", "a", "b"):
        if not isinstance(body[field], str) or not HASH.fullmatch(body[field]):
            raise InvalidVote(f"a vote's {field} must be a sha256 hex digest")
    if body["a"] == body["b"]:
        raise InvalidVote("a vote compares two different answers")
    if body["choice"] not in CHOICES:
        raise InvalidVote(f"a vote's choice is one of {CHOICES}")
    return body


def duel_seed(receipt_a: dict[str, Any], receipt_b: dict[str, Any]) -> bytes:
    """The judge draw's seed: both receipts' signatures, in an order that does not depend on the
    entry's (executors sign their receipts after answering, so nobody knew it in advance)."""
    sigs = sorted((receipt_a["sig"], receipt_b["sig"]))
    return hashlib.sha256("".join(sigs).encode()).digest()


def judge_order(seed: bytes, stakes: Mapping[str, int], k: int) -> list[str]:
    """The first `k` nodes of a proportional-to-stake draw without replacement seeded by `seed`.

    `stakes` maps candidates to bonded stake in micro-credits; non-positive stakes are left out. As
    in the router, each candidate's key is -ln(U) / stake (Efraimidis-Spirakis), with U from the hash
    of the seed and its id, so every node computes the same ranking from the same stakes.
    """
    keyed = []
    for node, stake in stakes.items():
        if stake <= 0:
            continue
        h = hashlib.sha256(seed + node.encode()).digest()
        u = (int.from_bytes(h[:7], "big") + 1) / 2**56  # in (0, 1]
        exp = -math.log(u)
        keyed.append(((math.log(exp) if exp > 0 else -math.inf) - math.log(stake), node))
    keyed.sort()
    return [node for _, node in keyed[:k]]
