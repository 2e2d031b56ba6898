"""Ledger operations: each node appends signed operations to its own hash chain.

A signed operation is `{"op": {author, seq, prev, kind, body, ts}, "sig": hex}`: `sig` is the author's
Ed25519 signature of the canonical encoding of `op`, and `prev` is the hash of the author's operation
at `seq - 1` ("" for seq 1). An operation's hash is the SHA-256 of the canonical encoding of `op`.
Everything here is pure: storage, replication and the balance fold build on it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from wwwserve_gateway.network.canonical import canonical
from wwwserve_gateway.network.identity import InvalidSignature, NodeIdentity, verify

KINDS = frozenset({"join", "bond", "unbond", "transfer", "pay", "duel", "fraud"})
HASH = re.compile(r"[0-9a-f]{64}")
OP_KEYS = frozenset({"author", "seq", "prev", "kind", "body", "ts"})
MAX_OP_BYTES = 256 * 1024


class InvalidOperation(ValueError):
    """An operation that must not be believed; the message says which rule it breaks."""


@dataclass(frozen=True, slots=True)
class Operation:
    """A verified operation, with what storage and the fold need at hand."""

    author: str
    seq: int
    prev: str
    kind: str
    body: dict[str, Any]
    ts: float
    hash: str
    sig: str
    raw: bytes  # canonical encoding of the whole signed operation, as stored and transmitted

    @property
    def signed(self) -> dict[str, Any]:
        return {"op": self.op, "sig": self.sig}

    @property
    def op(self) -> dict[str, Any]:
        return {
            "author": self.author,
            "seq": self.seq,
            "prev": self.prev,
            "kind": self.kind,
            "body": self.body,
            "ts": self.ts,
        }


def sign_op(
    identity: NodeIdentity, seq: int, prev: str, kind: str, body: dict[str, Any], ts: float
) -> Operation:
    op = {"author": identity.node_id, "seq": seq, "prev": prev, "kind": kind, "body": body, "ts": ts}
    sig = identity.sign(canonical(op)).hex()
    return parse_op({"op": op, "sig": sig})


def parse_op(signed: Any) -> Operation:
    """Check an operation's shape and its author's signature; raise InvalidOperation otherwise.

    This checks the operation alone. Chain rules (seq contiguity, prev) and kind rules need the
    author's chain and the network parameters, and are checked by the ledger.
    """
    if not isinstance(signed, dict) or set(signed) != {"op", "sig"}:
        raise InvalidOperation("a signed operation is {op, sig}")
    op, sig = signed["op"], signed["sig"]
    if not isinstance(op, dict) or set(op) != OP_KEYS:
        raise InvalidOperation(f"an operation has exactly the keys {sorted(OP_KEYS)}")
    author, seq, prev, kind, body, ts = (op[k] for k in ("author", "seq", "prev", "kind", "body", "ts"))
    if not isinstance(author, str) or not HASH.fullmatch(author):
        raise InvalidOperation("author must be a node id")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise InvalidOperation("seq must be an integer >= 1")
    if not isinstance(prev, str) or (prev != "" if seq == 1 else not HASH.fullmatch(prev)):
        raise InvalidOperation("prev must be '' at seq 1 and the previous operation's hash after")
    if kind not in KINDS:
        raise InvalidOperation(f"unknown kind {kind!r}")
    if not isinstance(body, dict):
        raise InvalidOperation("body must be an object")
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        raise InvalidOperation("ts must be a number")
    if not isinstance(sig, str) or not re.fullmatch(r"[0-9a-f]{128}", sig):
        raise InvalidOperation("sig must be 64 bytes in lowercase hex")
    encoded = canonical(op)
    if len(encoded) > MAX_OP_BYTES:
        raise InvalidOperation(f"operation larger than {MAX_OP_BYTES} bytes")
    try:
        verify(author, encoded, bytes.fromhex(sig))
    except InvalidSignature as exc:
        raise InvalidOperation(str(exc)) from None
    return Operation(
        author,
        seq,
        prev,
        kind,
        body,
        float(ts) if isinstance(ts, float) else ts,
        hashlib.sha256(encoded).hexdigest(),
        sig,
        canonical({"op": op, "sig": sig}),
    )
