"""Receipts: an executor's signed statement that it served one request for an entry node.

The entry node checks a receipt before it relays the end of an answer, hands it to the app in the
`x-wwwserve-receipt` header (or SSE comment), and pays by it through the ledger. A receipt names
hashes only, never content: `request` hashes the delegated request (its id, endpoint and body), so
the same prompt sent twice is two receipts; `response` hashes the exact bytes relayed. It names the
network id (`net`), so a receipt signed in one network is worthless in another.

Two fields serve duels: `text` hashes the answer's text (`text_hash`: the first choice's content,
normalised), which judges' votes name, so a vote counts only for the answers it was shown whatever
bytes carried them; `stake` is the bonded stake the executor committed when it accepted, which a
lost duel puts at risk.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

import orjson

from wwwserve_gateway.network.canonical import canonical, digest
from wwwserve_gateway.network.identity import (
    NODE_ID,
    InvalidSignature,
    NodeIdentity,
    VerifiedSignatures,
    verify_record,
)

HASH = re.compile(r"[0-9a-f]{64}")
RECEIPT_KEYS = frozenset(
    {
        "id",
        "kind",
        "net",
        "entry",
        "request",
        "response",
        "text",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "started",
        "finished",
        "stake",
    }
)


# A receipt is checked several times in one process: by the entry when it arrives, when its debt
# is recorded, and (long form) in the pay operation; an executor checks its own receipts when asked
# to countersign them. Verified (and self-signed) ones are remembered.
VERIFIED = VerifiedSignatures(8192)


class InvalidReceipt(ValueError):
    pass


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def request_hash(request_id: str, endpoint: str, body: dict[str, Any]) -> str:
    return digest({"id": request_id, "endpoint": endpoint, "body": body})


def normalise_text(text: str) -> str:
    """An answer's text as judges see it and `text` hashes it: line ends unified, ends stripped."""
    return text.replace("\r\n", "\n").strip()


def text_hash(text: str) -> str:
    return hashlib.sha256(normalise_text(text).encode()).hexdigest()


def sign_receipt(
    identity: NodeIdentity,
    *,
    net: str,
    entry: str,
    request: str,
    response: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    started: float,
    finished: float,
    text: str = "",
    stake: float = 0.0,
) -> dict[str, Any]:
    """`text` is the answer's text hash (`text_hash`; default: of no text), `stake` the stake
    committed."""
    body = {
        "id": identity.node_id,
        "kind": "receipt",
        "net": net,
        "entry": entry,
        "request": request,
        "response": response,
        "text": text or text_hash(""),
        "model": model,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "started": round(started, 3),
        "finished": round(finished, 3),
        "stake": round(stake, 6),
    }
    record = identity.sign_record(body)
    VERIFIED.add(record["sig"], canonical(body))
    return record


def check_receipt(record: Any, net: str) -> dict[str, Any]:
    """The body of a signed receipt of network `net`, after checking its signature and fields."""
    try:
        body = verify_record(record, VERIFIED)
    except InvalidSignature as exc:
        raise InvalidReceipt(f"receipt: {exc}") from None
    if set(body) != RECEIPT_KEYS or body["kind"] != "receipt":
        raise InvalidReceipt(f"a receipt has exactly the keys {sorted(RECEIPT_KEYS)} and kind 'receipt'")
    if body["net"] != net:
        raise InvalidReceipt("a receipt of another network")
    if not isinstance(body["entry"], str) or not NODE_ID.fullmatch(body["entry"]):
        raise InvalidReceipt("receipt entry must be a node id")
    for field in ("request", "response", "text"):
        if not isinstance(body[field], str) or not HASH.fullmatch(body[field]):
            raise InvalidReceipt(f"receipt {field} must be a sha256 hex digest")
    if not isinstance(body["model"], str):
        raise InvalidReceipt("receipt model must be a string")
    for field in ("prompt_tokens", "completion_tokens"):
        if not _is_int(body[field]) or body[field] < 0:
            raise InvalidReceipt(f"receipt {field} must be an integer >= 0")
    if not _is_number(body["started"]) or not _is_number(body["finished"]):
        raise InvalidReceipt("receipt started/finished must be numbers")
    if not _is_number(body["stake"]) or not 0 <= body["stake"] < 1e15:
        raise InvalidReceipt("receipt stake must be a number >= 0")
    return body


def encode_receipt(record: dict[str, Any]) -> str:
    """A receipt as one header-safe token: unpadded base64url of its canonical JSON."""
    return base64.urlsafe_b64encode(canonical(record)).rstrip(b"=").decode()


def decode_receipt(token: str) -> dict[str, Any]:
    """The signed record in an `x-wwwserve-receipt` value (not yet checked: use check_receipt)."""
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    return orjson.loads(raw)
