"""Ledger kind rules and the deterministic balance fold: replicas agree, tampering and rule breaking
are caught, and stake moves as the rules say."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wwwserve_gateway.network.canonical import canonical
from wwwserve_gateway.network.genesis import DuelParams, LedgerParams
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.network.votes import sign_vote
from wwwserve_gateway.plugin_api import Account
from wwwserve_gateway.plugins.ledger.fold import Balances, NeedsRefold, fold
from wwwserve_gateway.plugins.ledger.ops import InvalidOperation, Operation, parse_op, sign_op
from wwwserve_gateway.plugins.ledger.rules import (
    MICRO,
    batch_body,
    check_op,
    payment_amount,
    price_micro,
)

IDS = [NodeIdentity.generate() for _ in range(6)]
NET = "ab" * 32
PARAMS = LedgerParams(
    allocations={i.node_id: 100 for i in IDS},
    price_per_request=0.5,
    price_per_1k_tokens=0.3,
    unbonding_delay_s=100.0,
    fraud_slash_fraction=1.0,
    duels=DuelParams(gamma=0.5, minority_slash=0.2, abstain_slash=0.05, judge_price=1.0),
)


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Chain:
    """An identity's own chain: signs operations with the right seq and prev."""

    def __init__(self, identity: NodeIdentity) -> None:
        self.identity = identity
        self.ops: list[Operation] = []

    @property
    def id(self) -> str:
        return self.identity.node_id

    def sign(self, kind: str, body: dict[str, Any], ts: float) -> Operation:
        prev = self.ops[-1].hash if self.ops else ""
        return sign_op(self.identity, len(self.ops) + 1, prev, kind, body, ts)

    def append(self, kind: str, body: dict[str, Any], ts: float, params: LedgerParams = PARAMS) -> Operation:
        op = self.sign(kind, body, ts)
        check_op(op, params, NET)
        self.ops.append(op)
        return op


def receipt(
    executor: NodeIdentity,
    entry: str,
    request: str,
    prompt: int = 10,
    completion: int = 20,
    net: str = NET,
    text: str | None = None,
    stake: float = 80.0,
) -> dict[str, Any]:
    """A signed receipt; its text hash differs by executor unless `text` (a text hash) is given."""
    return executor.sign_record(
        {
            "id": executor.node_id,
            "kind": "receipt",
            "net": net,
            "entry": entry,
            "request": request,
            "response": h("response" + request),
            "text": text or h(f"text {executor.node_id} {request}"),
            "model": "m",
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "started": 1.0,
            "finished": 2.0,
            "stake": stake,
        }
    )


def vote(
    judge: NodeIdentity, entry: str, request: str, shown: tuple[str, str], choice: str, net: str = NET
) -> dict[str, Any]:
    """A judge's signed vote on the answers whose text hashes it was `shown`, in that order."""
    return sign_vote(judge, net=net, entry=entry, duel=request, a=shown[0], b=shown[1], choice=choice)


def items_of(receipts: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [r["body"]["request"], r["body"]["prompt_tokens"], r["body"]["completion_tokens"]] for r in receipts
    ]


def pay_body(executor: NodeIdentity, receipts: list[dict[str, Any]], items: list[list[Any]] | None = None):
    """A payment by receipts: of what they claim, unless `items` say less."""
    items = items_of(receipts) if items is None else items
    amount = payment_amount(items, PARAMS)
    return {"payments": [{"to": executor.node_id, "amount": amount, "items": items, "receipts": receipts}]}


def fraud_body(chain: Chain, seq: int) -> dict[str, Any]:
    """Evidence that `chain`'s author signed a second, different operation at `seq`."""
    a = chain.ops[seq - 1]
    b = sign_op(chain.identity, seq, a.prev, "bond", {"amount": 1}, a.ts + 0.5)
    return {"a": a.signed, "b": b.signed}


def duel_body(
    entry: str,
    x: NodeIdentity,
    y: NodeIdentity,
    judges: list[tuple[NodeIdentity, str]],
    tag: str = "",
    stakes: tuple[float, float] = (80.0, 80.0),
) -> dict[str, Any]:
    """A duel of x (A) against y (B); each judge votes `choice` having been shown x's answer first."""
    request = h(f"duel-{entry}-{x.node_id}-{y.node_id}{tag}")
    receipts = [receipt(x, entry, request, stake=stakes[0]), receipt(y, entry, request, stake=stakes[1])]
    shown = (receipts[0]["body"]["text"], receipts[1]["body"]["text"])
    return {"receipts": receipts, "votes": [vote(j, entry, request, shown, c) for j, c in judges]}


def micro_total(balances: Balances) -> int:
    return sum(round((v["liquid"] + v["bonded"] + v["unbonding"]) * MICRO) for v in balances.view().values())


# -- random valid operation sets ---------------------------------------------------------------------
@st.composite
def op_sets(draw: st.DrawFn) -> tuple[list[Operation], bool]:
    """A random valid set of operations from 3-6 identities; also whether it holds a fraud proof."""
    n = draw(st.integers(3, 6))
    chains = [Chain(i) for i in IDS[:n]]
    for c in chains:
        c.append("join", {"grant": 100}, draw(st.integers(0, 50)))
    requests = [h(f"r{i}") for i in range(4)]  # a small pool: the same receipt gets paid twice
    has_fraud = False
    for _ in range(draw(st.integers(0, 25))):
        me = draw(st.sampled_from(chains))
        ts = draw(st.integers(0, 300))  # chains' clocks disagree and may run backwards
        kind = draw(st.sampled_from(["bond", "bond", "unbond", "transfer", "pay", "pay", "duel", "fraud"]))
        others = [c for c in chains if c is not me]
        if kind in ("bond", "unbond"):
            me.append(kind, {"amount": draw(st.integers(1, 60))}, ts)
        elif kind == "transfer":
            me.append(kind, {"to": draw(st.sampled_from(others)).id, "amount": draw(st.integers(1, 150))}, ts)
        elif kind == "pay":
            payee = draw(st.sampled_from(others))
            picked = draw(st.lists(st.sampled_from(requests), min_size=1, max_size=3, unique=True))
            receipts = [receipt(payee.identity, me.id, r, draw(st.integers(0, 3000)), 7) for r in picked]
            me.append("pay", pay_body(payee.identity, receipts), ts)
        elif kind == "duel" and n >= 4:
            x, y, *judges = draw(st.permutations(others))
            choices = draw(st.lists(st.sampled_from(["A", "B", "tie", "abstain"]), max_size=len(judges)))
            me.append(
                "duel",
                duel_body(
                    me.id,
                    x.identity,
                    y.identity,
                    [(j.identity, c) for j, c in zip(judges, choices, strict=False)],
                    tag=str(ts),
                ),
                ts,
            )
        elif kind == "fraud" and draw(st.integers(0, 3)) == 0:
            culprit = draw(st.sampled_from(chains))  # may be `me`: a self-report is allowed
            seq = draw(st.integers(1, len(culprit.ops)))
            me.append("fraud", fraud_body(culprit, seq), ts)
            has_fraud = True
    return [op for c in chains for op in c.ops], has_fraud


def deliveries(ops: list[Operation], rng: random.Random) -> list[Operation]:
    """A random arrival order that keeps each author's chain in seq order (as replication does),
    interleaving chains arbitrarily, with duplicates re-delivered."""
    queues: dict[str, list[Operation]] = {}
    for op in sorted(ops, key=lambda o: o.seq):
        queues.setdefault(op.author, []).append(op)
    out: list[Operation] = []
    while queues:
        author = rng.choice(sorted(queues))
        out.append(queues[author].pop(0))
        if not queues[author]:
            del queues[author]
        if out and rng.random() < 0.2:
            out.append(rng.choice(out))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op_sets(), st.randoms(use_true_random=False), st.integers(0, 500))
def test_replicas_agree_whatever_the_arrival_order(
    generated: tuple[list[Operation], bool], rng: random.Random, now: int
) -> None:
    ops, has_fraud = generated
    reference = fold(ops, PARAMS, NET, now).view()

    one_by_one = Balances(PARAMS, NET, now)  # incremental, refolding when an op arrives out of order
    for op in deliveries(ops, rng):
        one_by_one.add(op)
    batched = Balances(PARAMS, NET, now)  # batches, as a pull stores a range
    stream = deliveries(ops, rng)
    while stream:
        cut = rng.randint(1, len(stream))
        batched.add_many(stream[:cut])
        stream = stream[cut:]
    shuffled = deliveries(ops, rng)
    rng.shuffle(shuffled)
    refolded = fold(shuffled + shuffled[:3], PARAMS, NET, now)

    assert one_by_one.view() == reference
    assert batched.view() == reference
    assert refolded.view() == reference
    # Credits only enter by the genesis allocations and only fraud destroys them.
    if not has_fraud:
        joins = sum(op.kind == "join" for op in ops)
        assert micro_total(refolded) == joins * 100 * MICRO
    # Nothing is spent that was not held: no balance goes negative, whoever pays whom.
    assert all(v["liquid"] >= 0 for v in refolded.view().values())


@settings(max_examples=60, deadline=None)
@given(op_sets(), st.data())
def test_any_single_byte_change_is_caught(
    generated: tuple[list[Operation], bool], data: st.DataObject
) -> None:
    ops, _ = generated
    op = data.draw(st.sampled_from(ops))
    raw = bytearray(op.raw)
    at = data.draw(st.integers(0, len(raw) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != raw[at]))
    raw[at] = new
    try:
        tampered = parse_op(orjson.loads(bytes(raw)))
        check_op(tampered, PARAMS, NET)
    except (orjson.JSONDecodeError, InvalidOperation):
        return
    assert tampered.hash != op.hash, "a tampered operation was accepted as the original"


# -- rule violations -----------------------------------------------------------------------------------
def test_forged_signature_is_rejected() -> None:
    op = Chain(IDS[0]).sign("join", {"grant": 100}, 1)
    forged = {"op": op.op, "sig": IDS[1].sign(orjson.dumps(op.op, option=orjson.OPT_SORT_KEYS)).hex()}
    with pytest.raises(InvalidOperation):
        parse_op(forged)


def test_double_join_and_wrong_grant_are_rejected() -> None:
    chain = Chain(IDS[0])
    with pytest.raises(InvalidOperation, match="genesis allocation"):
        chain.append("join", {"grant": 101}, 1)
    chain.append("join", {"grant": 100}, 1)
    with pytest.raises(InvalidOperation, match="seq 1"):
        chain.append("join", {"grant": 100}, 2)


def test_bad_stake_amounts_are_rejected() -> None:
    chain = Chain(IDS[0])
    chain.append("join", {"grant": 100}, 1)
    for body in ({"amount": 0}, {"amount": -1}, {"amount": 1.5}, {"amount": True}, {}):
        with pytest.raises(InvalidOperation):
            chain.append("bond", body, 2)


def test_pay_with_someone_elses_receipt_is_rejected() -> None:
    e, x, y = IDS[:3]
    chain = Chain(e)
    chain.append("join", {"grant": 100}, 1)
    stolen = receipt(y, e.node_id, h("q"))  # signed by y, claimed as x's
    with pytest.raises(InvalidOperation, match="payee"):
        body = pay_body(x, [stolen])
        chain.append("pay", body, 2)
    other_entry = receipt(x, y.node_id, h("q"))  # x served y, not e
    with pytest.raises(InvalidOperation, match="entry"):
        chain.append("pay", pay_body(x, [other_entry]), 2)
    with pytest.raises(InvalidOperation, match="another node"):
        chain.append("pay", pay_body(e, [receipt(e, e.node_id, h("q"))]), 2)


def test_pay_with_the_wrong_amount_is_rejected() -> None:
    e, x = IDS[:2]
    chain = Chain(e)
    chain.append("join", {"grant": 100}, 1)
    r = receipt(x, e.node_id, h("q"), 1000, 1000)  # 0.5 + 0.3 * 2 = 1.1 credits
    assert price_micro(r["body"], PARAMS) == 1_100_000
    items = items_of([r])
    with pytest.raises(InvalidOperation, match="amount"):
        body = {"to": x.node_id, "amount": 1.2, "items": items, "receipts": [r]}
        chain.append("pay", {"payments": [body]}, 2)
    chain.append("pay", {"payments": [{"to": x.node_id, "amount": 1.1, "items": items, "receipts": [r]}]}, 2)


def test_tampered_receipt_is_rejected() -> None:
    e, x = IDS[:2]
    chain = Chain(e)
    chain.append("join", {"grant": 100}, 1)
    r = receipt(x, e.node_id, h("q"))
    r["body"]["completion_tokens"] = 0
    with pytest.raises(InvalidOperation, match="receipt"):
        chain.append("pay", pay_body(x, [r]), 2)


def test_fraud_proof_with_identical_or_unrelated_ops_is_rejected() -> None:
    a, b = Chain(IDS[0]), Chain(IDS[1])
    a.append("join", {"grant": 100}, 1)
    b.append("join", {"grant": 100}, 1)
    same = a.ops[0].signed
    with pytest.raises(InvalidOperation, match="different"):
        b.append("fraud", {"a": same, "b": same}, 2)
    with pytest.raises(InvalidOperation, match="same author"):
        b.append("fraud", {"a": same, "b": b.ops[0].signed}, 2)
    bad = dict(fraud_body(a, 1))
    bad["b"] = {"op": bad["b"]["op"], "sig": "0" * 128}
    with pytest.raises(InvalidOperation, match="evidence"):
        b.append("fraud", bad, 2)


# -- semantics ----------------------------------------------------------------------------------------
def joined(*identities: NodeIdentity, ts: float = 0) -> list[Chain]:
    chains = [Chain(i) for i in identities]
    for c in chains:
        c.append("join", {"grant": 100}, ts)
    return chains


def all_ops(*chains: Chain) -> list[Operation]:
    return [op for c in chains for op in c.ops]


def test_unbonding_matures_after_the_delay() -> None:
    (a,) = joined(IDS[0])
    a.append("bond", {"amount": 40}, 10)
    a.append("unbond", {"amount": 10}, 1000)
    a.append("unbond", {"amount": 1000}, 1001)  # more than bonded: only the 30 bonded unbond
    balances = fold(a.ops, PARAMS, NET)
    assert balances.account(a.id, 1050) == Account(60.0, 0.0, 40.0, False)
    assert balances.account(a.id, 1100).liquid == 70.0
    assert balances.account(a.id, 1101) == Account(100.0, 0.0, 0.0, False)
    assert balances.account(a.id).unbonding == 40.0  # no `now`: nothing has matured


def test_nobody_spends_what_it_does_not_hold() -> None:
    """A payment beyond the payer's liquid credit moves only that credit; a bond or transfer the
    same: spending cannot create credit for anyone."""
    e, x = joined(*IDS[:2])
    e.append("bond", {"amount": 99}, 1)
    receipts = [receipt(x.identity, e.id, h(f"q{i}")) for i in range(3)]  # 3 x 0.509 credits
    e.append("pay", pay_body(x.identity, receipts), 2)
    balances = fold(all_ops(e, x), PARAMS, NET)
    assert balances.account(e.id).liquid == 0
    assert balances.account(x.id).liquid == pytest.approx(101)  # 1 of the 1.527 owed
    e.append("transfer", {"to": x.id, "amount": 50}, 3)
    e.append("bond", {"amount": 50}, 4)
    balances = fold(all_ops(e, x), PARAMS, NET)
    assert balances.account(e.id) == Account(0.0, 99.0, 0.0, False)
    assert balances.account(x.id).liquid == pytest.approx(101)


def test_keys_outside_the_genesis_join_with_nothing_and_create_nothing() -> None:
    """Twenty fresh keys: no credits; their payments to each other move nothing into anyone's stake."""
    sybils = [Chain(NodeIdentity.generate()) for _ in range(20)]
    for chain in sybils:
        with pytest.raises(InvalidOperation, match="genesis allocation"):
            chain.append("join", {"grant": 100}, 0)
        chain.append("join", {"grant": 0}, 0)
    boss = sybils[0]
    for i, chain in enumerate(sybils[1:]):
        fake = [receipt(boss.identity, chain.id, h(f"fake{i}"), 5000, 5000)]
        chain.append("pay", pay_body(boss.identity, fake), 1)
        chain.append("transfer", {"to": boss.id, "amount": 1000}, 2)
    boss.append("bond", {"amount": 20_000}, 3)
    balances = fold(all_ops(*sybils), PARAMS, NET)
    assert all(balances.account(c.id) == Account() for c in sybils)


def test_a_receipt_is_paid_once() -> None:
    e, x, y = joined(*IDS[:3])
    r = receipt(x.identity, e.id, h("q"))
    e.append("pay", pay_body(x.identity, [r]), 1)
    e.append("pay", pay_body(x.identity, [r, receipt(x.identity, e.id, h("q2"))]), 2)
    e.append("pay", pay_body(y.identity, [receipt(y.identity, e.id, h("q"))]), 3)  # the duel twin
    view = fold(all_ops(e, x, y), PARAMS, NET).view()
    assert round(view[x.id]["liquid"] * MICRO) == 100 * MICRO + 2 * 509_000
    assert round(view[y.id]["liquid"] * MICRO) == 100 * MICRO + 509_000
    assert round(view[e.id]["liquid"] * MICRO) == 100 * MICRO - 3 * 509_000


def test_fraud_slashes_and_bars_and_voids_the_forked_suffix() -> None:
    c, r = joined(*IDS[:2])
    c.append("bond", {"amount": 50}, 1)
    c.append("unbond", {"amount": 10}, 2)  # still pending at the proof: slashed too
    c.append("bond", {"amount": 20}, 3)  # seq 4: the forked seq and after never count
    c.append("bond", {"amount": 5}, 4)
    r.append("fraud", fraud_body(c, 4), 5)
    balances = fold(all_ops(c, r), PARAMS, NET)
    assert balances.account(c.id, 10) == Account(50.0, 0.0, 0.0, True)
    assert balances.is_barred(c.id) and not balances.can_delegate(c.id)
    assert not balances.is_barred(r.id)
    # A second proof (an earlier fork, by the culprit itself) bars from the earlier seq, slashes once.
    c.append("fraud", fraud_body(c, 2), 6)
    balances = fold(all_ops(c, r), PARAMS, NET)
    assert balances.account(c.id, 10) == Account(100.0, 0.0, 0.0, True)


def test_partial_fraud_slash_spares_matured_unbonding() -> None:
    params = PARAMS.model_copy(update={"fraud_slash_fraction": 0.5})
    c, r = joined(*IDS[:2])
    c.append("bond", {"amount": 50}, 1, params)
    c.append("unbond", {"amount": 10}, 2, params)  # matures at 102, before the proof
    c.append("unbond", {"amount": 20}, 200, params)  # pending at the proof: halved
    c.append("bond", {"amount": 1}, 210, params)  # seq 5, the forked one: void
    r.append("fraud", fraud_body(c, 5), 250, params)
    view = fold(all_ops(c, r), params, NET).account(c.id, 1000)
    assert view == Account(50.0 + 10 + 10, 10.0, 0.0, True)


def test_incremental_apply_matches_the_fold_and_refuses_out_of_order() -> None:
    a, b = joined(*sorted(IDS[:2], key=lambda i: i.node_id), ts=5)  # same ts: a's id sorts first
    a.append("bond", {"amount": 10}, 7)
    b.append("bond", {"amount": 20}, 6)
    balances = Balances(PARAMS, NET)
    for op in (a.ops[0], b.ops[0], b.ops[1], a.ops[1]):  # canonical order
        balances.apply(op)
    balances.apply(a.ops[1])  # a duplicate is a no-op
    assert balances.view() == fold(all_ops(a, b), PARAMS, NET).view()
    late = Balances(PARAMS, NET)
    late.apply(a.ops[0])
    late.apply(a.ops[1])
    with pytest.raises(NeedsRefold):
        late.apply(b.ops[0])  # ts 5 sorts before a's bond at ts 7
    late.add_many(b.ops)
    assert late.view() == balances.view()


def test_extend_folds_in_place_only_what_sorts_after_the_fold() -> None:
    a, b = joined(*sorted(IDS[:2], key=lambda i: i.node_id), ts=5)
    a.append("bond", {"amount": 10}, 7)
    b.append("bond", {"amount": 20}, 8)
    balances = Balances(PARAMS, NET)
    assert balances.extend([a.ops[0], b.ops[0], a.ops[1]])
    assert balances.extend([b.ops[1]])  # ts 8: after everything folded
    assert balances.view() == fold(all_ops(a, b), PARAMS, NET).view()
    late = Balances(PARAMS, NET)
    assert late.extend(a.ops)
    assert not late.extend(b.ops)  # b's join (ts 5) sorts before a's bond (ts 7): refold needed
    assert late.view() == fold(a.ops, PARAMS, NET).view()  # nothing of b was folded


def test_clock_running_backwards_keeps_chain_order() -> None:
    (a,) = joined(IDS[0], ts=100)
    a.append("bond", {"amount": 100}, 50)  # earlier ts than the join: still folded after it
    a.append("unbond", {"amount": 100}, 10)
    assert fold(reversed(a.ops), PARAMS, NET).account(a.id, 200).liquid == 100


# -- compact (countersigned) payments ------------------------------------------------------------


def batch_payment(
    executor: NodeIdentity, entry: str, receipts: list[dict[str, Any]], signer=None, net: str = NET
) -> dict:
    items = items_of(receipts)
    sig = (signer or executor).sign(canonical(batch_body(net, executor.node_id, entry, items))).hex()
    return {"to": executor.node_id, "amount": payment_amount(items, PARAMS), "items": items, "sig": sig}


def test_a_countersigned_batch_pays_like_its_receipts() -> None:
    e, x = IDS[:2]
    rs = [receipt(x, e.node_id, h(f"b{i}"), 100 * i, 50) for i in range(5)]
    long_form, short_form = joined(e, x), joined(e, x)
    long_form[0].append("pay", pay_body(x, rs), 2)
    short_form[0].append("pay", {"payments": [batch_payment(x, e.node_id, rs)]}, 2)
    assert fold(all_ops(*long_form), PARAMS, NET).view() == fold(all_ops(*short_form), PARAMS, NET).view()
    compact, full = short_form[0].ops[-1], long_form[0].ops[-1]
    assert len(compact.raw) < len(full.raw) / 3


def test_a_request_paid_in_both_forms_is_paid_once() -> None:
    e, x = IDS[:2]
    r = receipt(x, e.node_id, h("once"))
    ce, cx = joined(e, x)
    ce.append("pay", pay_body(x, [r]), 2)
    ce.append("pay", {"payments": [batch_payment(x, e.node_id, [r])]}, 3)
    view = fold(all_ops(ce, cx), PARAMS, NET).view()
    assert view[x.node_id]["liquid"] == 100 + price_micro(r["body"], PARAMS) / MICRO


def test_bad_batch_payments_are_rejected() -> None:
    e, x, y = IDS[:3]
    rs = [receipt(x, e.node_id, h("c1")), receipt(x, e.node_id, h("c2"))]
    (chain,) = joined(e)
    good = batch_payment(x, e.node_id, rs)
    cases = {
        "signed by another node": batch_payment(x, e.node_id, rs, signer=y),
        "signed for another entry": {**good, "sig": batch_payment(x, y.node_id, rs)["sig"]},
        "an item changed after signing": {**good, "items": [[h("c1"), 10, 999], good["items"][1]]},
        "wrong amount": {**good, "amount": good["amount"] + 1},
        "malformed item": {**good, "items": [[h("c1"), -1, 2]]},
        "not hex": {**good, "sig": "zz"},
        "duplicate request": {**good, "items": [good["items"][0]] * 2},
        "mixed forms": {**good, "receipts": rs},
    }
    for name, payment in cases.items():
        with pytest.raises(InvalidOperation):
            chain.append("pay", {"payments": [payment]}, 2)
            pytest.fail(name)
    chain.append("pay", {"payments": [good]}, 2)


# -- what a payer may pay ------------------------------------------------------------------------


def test_a_payer_may_pay_fewer_tokens_than_a_receipt_claims_never_more() -> None:
    e, x = IDS[:2]
    (chain,) = joined(e)
    r = receipt(x, e.node_id, h("inflated"), 10, 5000)
    request = r["body"]["request"]
    chain.append("pay", pay_body(x, [r], [[request, 10, 40]]), 1)  # what the entry could verify
    (other,) = joined(e)
    with pytest.raises(InvalidOperation, match="more tokens than its receipt"):
        other.append("pay", pay_body(x, [r], [[request, 10, 5001]]), 1)
    with pytest.raises(InvalidOperation, match="another request"):
        other.append("pay", pay_body(x, [r], [[h("other"), 10, 40]]), 1)


def test_the_price_of_one_request_is_capped() -> None:
    params = PARAMS.model_copy(update={"max_price_per_request": 2.0})
    e, x = IDS[:2]
    r = receipt(x, e.node_id, h("huge"), 10**6, 10**6)  # 0.5 + 0.3 * 2000 credits, uncapped
    assert price_micro(r["body"], params) == 2 * MICRO


def test_evidence_of_another_network_is_refused() -> None:
    e, x, y, j1, j2, j3 = IDS
    (chain,) = joined(e)
    foreign = receipt(x, e.node_id, h("elsewhere"), net="cd" * 32)
    with pytest.raises(InvalidOperation, match="another network"):
        chain.append("pay", pay_body(x, [foreign]), 1)
    with pytest.raises(InvalidOperation, match="batch payment"):
        chain.append(
            "pay",
            {"payments": [batch_payment(x, e.node_id, [receipt(x, e.node_id, h("b"))], net="cd" * 32)]},
            1,
        )
    body = duel_body(e.node_id, x, y, [(j1, "A"), (j2, "A"), (j3, "B")])
    request = body["receipts"][0]["body"]["request"]
    shown = (body["receipts"][0]["body"]["text"], body["receipts"][1]["body"]["text"])
    body["votes"][0] = vote(j1, e.node_id, request, shown, "A", net="cd" * 32)
    with pytest.raises(InvalidOperation, match="another network"):
        chain.append("duel", body, 1)
