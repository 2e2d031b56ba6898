"""Kind rules for ledger operations: what each operation's body must say to be believed.

`ledger_ops.parse_op` checks shape and signature; the ledger checks seq contiguity and prev linkage;
`check_op` here checks the body of one operation against the network parameters. Everything is pure:
the only state-dependent parts (duplicate receipts, duel settlements, slashing) belong to the fold
(`fold`), which sees the whole set of operations. Duel evidence is checked in `duels`.

Amounts. Bodies carry credits (join grant, stake and transfers as integers, payment amounts as
numbers), but the fold counts integer micro-credits (`MICRO` per credit) so sums are exact and
associative: a payment's amount must equal, in micro-credits, the sum of its items' prices, each
rounded once to a whole micro-credit and capped at the genesis' `max_price_per_request`
(`item_price_micro`). `payment_amount` gives writers the amount to put in the body.

Admission. Creating a key creates no credit: a `join` grants exactly the genesis allocation of its
author (0 for keys the genesis does not list). Credits then move only by `transfer`, `pay` and
`duel`, so every credit a Sybil holds came from someone's allocation or earnings.

Receipts, countersigned batches and votes name the network id (`net`): evidence signed for one
network is refused in another.
"""

from __future__ import annotations

from typing import Any

from wwwserve_gateway.network import receipts
from wwwserve_gateway.network.canonical import canonical
from wwwserve_gateway.network.genesis import LedgerParams
from wwwserve_gateway.network.identity import NODE_ID, InvalidSignature, verify
from wwwserve_gateway.network.receipts import HASH
from wwwserve_gateway.plugins.ledger.duels import check_duel
from wwwserve_gateway.plugins.ledger.ops import InvalidOperation, Operation, parse_op

MICRO = 1_000_000  # micro-credits per credit


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def to_micro(credits: float) -> int:
    """Credits as a whole number of micro-credits (rounded to the nearest)."""
    return round(credits * MICRO)


def item_price_micro(prompt: int, completion: int, params: LedgerParams) -> int:
    """One request's price in micro-credits: per request plus per 1k tokens, each rate rounded to
    micro, capped at max_price_per_request. Integer arithmetic after the rates are rounded, so every
    node computes the same price."""
    per_request = to_micro(params.price_per_request)
    per_1k = to_micro(params.price_per_1k_tokens)
    price = per_request + (per_1k * (prompt + completion) + 500) // 1000  # per-token part rounded half up
    return min(price, to_micro(params.max_price_per_request))


def price_micro(receipt: dict[str, Any], params: LedgerParams) -> int:
    """A receipt's price in micro-credits, as it claims its tokens (see item_price_micro)."""
    return item_price_micro(receipt["prompt_tokens"], receipt["completion_tokens"], params)


def batch_body(net: str, executor: str, entry: str, items: list[list[Any]]) -> dict[str, Any]:
    """What an executor countersigns for a batch payment: the requests it served for `entry` in
    network `net`, each as [request hash, prompt tokens, completion tokens] as the entry pays them
    (what the price and the once-only rule need; the full receipts stay with the entry)."""
    return {"kind": "batch", "net": net, "id": executor, "entry": entry, "items": items}


def payment_entries(
    payment: dict[str, Any], payer: str, params: LedgerParams
) -> list[tuple[ReceiptKey, int]]:
    """(receipt key, price in micro-credits) of each request a checked payment pays."""
    to = payment["to"]
    return [((to, payer, item[0]), item_price_micro(item[1], item[2], params)) for item in payment["items"]]


def payment_amount(items: list[list[Any]], params: LedgerParams) -> float:
    """The `amount` a payment of these items must carry, in credits."""
    return sum(item_price_micro(i[1], i[2], params) for i in items) / MICRO


ReceiptKey = tuple[str, str, str]


def receipt_key(receipt: dict[str, Any]) -> ReceiptKey:
    """What a receipt is paid once for: (executor, entry, request hash).

    The executor is part of the key because a duel sends one request to two executors, and the
    entry pays both; paying the same executor twice for the same request is a double payment.
    """
    return (receipt["id"], receipt["entry"], receipt["request"])


def receipt_body(record: Any, net: str) -> dict[str, Any]:
    """The body of a signed receipt of network `net` in an operation, checked (InvalidOperation)."""
    try:
        return receipts.check_receipt(record, net)
    except receipts.InvalidReceipt as exc:
        raise InvalidOperation(str(exc)) from None


def fraud_evidence(op: Operation) -> tuple[str, int]:
    """(author, seq) that a fraud op proves equivocated at; raise InvalidOperation otherwise."""
    body = op.body
    if set(body) != {"a", "b"}:
        raise InvalidOperation("a fraud body is {a, b}")
    try:
        a, b = parse_op(body["a"]), parse_op(body["b"])
    except InvalidOperation as exc:
        raise InvalidOperation(f"fraud evidence: {exc}") from None
    if a.author != b.author or a.seq != b.seq:
        raise InvalidOperation("fraud evidence must be two operations with the same author and seq")
    if a.hash == b.hash:
        raise InvalidOperation("fraud evidence must be two different operations")
    return a.author, a.seq


def _positive_amount(body: dict[str, Any], kind: str) -> None:
    if set(body) != {"amount"} or not _is_int(body["amount"]) or body["amount"] <= 0:
        raise InvalidOperation(f"a {kind} body is {{amount: integer > 0}}")


def _check_pay(op: Operation, params: LedgerParams, net: str) -> None:
    """A payment is {to, amount, items, receipts | sig}: `items` are [request hash, prompt tokens,
    completion tokens] as the payer pays them, and either
    - `sig`: the payee's one signature over batch_body(net, to, payer, items) (the compact form,
      about 80 bytes a request), or
    - `receipts`: the payee's signed receipts, one per item in its order, whose counts bound the
      item's (a payer may pay fewer tokens than a receipt claims: the ones it could verify).
    """
    body = op.body
    if set(body) != {"payments"} or not isinstance(body["payments"], list) or not body["payments"]:
        raise InvalidOperation("a pay body is {payments: non-empty list}")
    seen: set[ReceiptKey] = set()
    for payment in body["payments"]:
        if not isinstance(payment, dict) or set(payment) not in (PAYMENT_KEYS, BATCH_PAYMENT_KEYS):
            raise InvalidOperation("a payment is {to, amount, items, receipts} or {to, amount, items, sig}")
        to, amount = payment["to"], payment["amount"]
        if not isinstance(to, str) or not NODE_ID.fullmatch(to) or to == op.author:
            raise InvalidOperation("a payment goes to another node's id")
        if not _is_number(amount) or amount < 0:
            raise InvalidOperation("a payment amount is a number >= 0")
        _check_items(payment["items"])
        if "receipts" in payment:
            _check_receipts(payment["receipts"], payment["items"], to, op.author, net)
        else:
            _check_batch(payment, op.author, net)
        total = 0
        for key, price in payment_entries(payment, op.author, params):
            if key in seen:
                raise InvalidOperation("a request is paid twice in one operation")
            seen.add(key)
            total += price
        if to_micro(amount) != total:
            raise InvalidOperation(f"payment amount {amount} != price of its requests {total / MICRO}")
    if len(seen) > params.payment_batch_max:
        raise InvalidOperation(f"more than {params.payment_batch_max} requests in one pay operation")


PAYMENT_KEYS = frozenset({"to", "amount", "items", "receipts"})
BATCH_PAYMENT_KEYS = frozenset({"to", "amount", "items", "sig"})


def _check_items(items: Any) -> None:
    if not isinstance(items, list) or not items:
        raise InvalidOperation("a payment carries at least one item")
    for item in items:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not isinstance(item[0], str)
            or not HASH.fullmatch(item[0])
            or not all(_is_int(n) and n >= 0 for n in item[1:])
        ):
            raise InvalidOperation("a payment item is [request sha256 hex, prompt tokens, completion tokens]")


def _check_receipts(receipts: Any, items: list[list[Any]], to: str, payer: str, net: str) -> None:
    if not isinstance(receipts, list) or len(receipts) != len(items):
        raise InvalidOperation("a payment by receipts carries one receipt per item")
    for record, (request, prompt, completion) in zip(receipts, items, strict=True):
        receipt = receipt_body(record, net)
        if receipt["id"] != to:
            raise InvalidOperation("a receipt is signed by another node than the payee")
        if receipt["entry"] != payer:
            raise InvalidOperation("a receipt names another entry node than the payer")
        if receipt["request"] != request:
            raise InvalidOperation("a receipt answers another request than its item")
        if prompt > receipt["prompt_tokens"] or completion > receipt["completion_tokens"]:
            raise InvalidOperation("an item pays more tokens than its receipt claims")


def _check_batch(payment: dict[str, Any], payer: str, net: str) -> None:
    sig = payment["sig"]
    if not isinstance(sig, str):
        raise InvalidOperation("a batch payment's sig is hex")
    try:
        body = batch_body(net, payment["to"], payer, payment["items"])
        verify(payment["to"], canonical(body), bytes.fromhex(sig))
    except (InvalidSignature, ValueError) as exc:
        raise InvalidOperation(f"batch payment: {exc}") from None


def _check_transfer(op: Operation) -> None:
    body = op.body
    if set(body) != {"to", "amount"} or not _is_int(body["amount"]) or body["amount"] <= 0:
        raise InvalidOperation("a transfer body is {to: node id, amount: integer > 0}")
    if not isinstance(body["to"], str) or not NODE_ID.fullmatch(body["to"]) or body["to"] == op.author:
        raise InvalidOperation("a transfer goes to another node's id")


def check_op(op: Operation, params: LedgerParams, net: str) -> None:
    """Raise InvalidOperation unless `op`'s body obeys its kind's rules.

    The caller has checked the signature (parse_op) and the chain (seq contiguity, prev linkage), so
    `op.seq` is the operation's position in its author's chain.
    """
    body = op.body
    if op.kind == "join":
        if op.seq != 1:
            raise InvalidOperation("join must be an author's first operation (seq 1)")
        allocated = params.allocations.get(op.author, 0)
        if set(body) != {"grant"} or not _is_int(body["grant"]) or body["grant"] != allocated:
            raise InvalidOperation(f"a join body is {{grant: {allocated}}} (this key's genesis allocation)")
    elif op.kind in ("bond", "unbond"):
        _positive_amount(body, op.kind)
    elif op.kind == "transfer":
        _check_transfer(op)
    elif op.kind == "pay":
        _check_pay(op, params, net)
    elif op.kind == "duel":
        check_duel(op, params, net)
    elif op.kind == "fraud":
        fraud_evidence(op)
    else:  # parse_op already refuses unknown kinds; kept so a new kind cannot slip through unchecked
        raise InvalidOperation(f"unknown kind {op.kind!r}")
