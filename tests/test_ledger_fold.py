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
from wwwserve_gateway.network.genesis import LedgerParams
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.plugin_api import Account
from wwwserve_gateway.plugins.ledger.fold import Balances, NeedsRefold, fold
from wwwserve_gateway.plugins.ledger.ops import InvalidOperation, Operation, parse_op, sign_op
from wwwserve_gateway.plugins.ledger.rules import (
    MICRO,
    batch_body,
    batch_items,
    check_op,
    payment_amount,
    price_micro,
)

PARAMS = LedgerParams(
    initial_grant=100,
    price_per_request=0.5,
    price_per_1k_tokens=0.3,
    unbonding_delay_s=100.0,
    fraud_slash_fraction=1.0,
    duel_gamma=0.5,
    judge_minority_slash=0.2,
)
IDS = [NodeIdentity.generate() for _ in range(6)]


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
        check_op(op, params)
        self.ops.append(op)
        return op


def receipt(
    executor: NodeIdentity, entry: str, request: str, prompt: int = 10, completion: int = 20
) -> dict[str, Any]:
    return executor.sign_record(
        {
            "id": executor.node_id,
            "kind": "receipt",
            "entry": entry,
            "request": request,
            "response": h("response" + request),
            "model": "m",
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "started": 1.0,
            "finished": 2.0,
        }
    )


def vote(judge: NodeIdentity, request: str, choice: str) -> dict[str, Any]:
    return judge.sign_record({"id": judge.node_id, "kind": "vote", "duel": request, "choice": choice})


def pay_body(executor: NodeIdentity, receipts: list[dict[str, Any]]) -> dict[str, Any]:
    amount = payment_amount(receipts, PARAMS)
    return {"payments": [{"to": executor.node_id, "amount": amount, "receipts": receipts}]}


def fraud_body(chain: Chain, seq: int) -> dict[str, Any]:
    """Evidence that `chain`'s author signed a second, different operation at `seq`."""
    a = chain.ops[seq - 1]
    b = sign_op(chain.identity, seq, a.prev, "bond", {"amount": 1}, a.ts + 0.5)
    return {"a": a.signed, "b": b.signed}


def duel_body(entry: str, x: NodeIdentity, y: NodeIdentity, judges: list[tuple[NodeIdentity, str]]):
    request = h(f"duel-{entry}-{x.node_id}-{y.node_id}")
    votes = [vote(j, request, c) for j, c in judges]
    a_n = sum(c == "A" for _, c in judges)
    b_n = sum(c == "B" for _, c in judges)
    winner, loser = (x, y) if a_n > b_n else (y, x)
    return {
        "receipts": [receipt(x, entry, request), receipt(y, entry, request)],
        "votes": votes,
        "winner": winner.node_id,
        "loser": loser.node_id,
    }


def micro_total(balances: Balances) -> int:
    return sum(round((v["liquid"] + v["bonded"] + v["unbonding"]) * MICRO) for v in balances.view().values())


# -- random valid operation sets ---------------------------------------------------------------------
@st.composite
def op_sets(draw: st.DrawFn) -> tuple[list[Operation], bool]:
    """A random valid set of operations from 3-6 identities; also whether it holds a fraud proof."""
    n = draw(st.integers(3, 6))
    chains = [Chain(i) for i in IDS[:n]]
    for c in chains:
        c.append("join", {"grant": PARAMS.initial_grant}, draw(st.integers(0, 50)))
    requests = [h(f"r{i}") for i in range(4)]  # a small pool: the same receipt gets paid twice
    has_fraud = False
    for _ in range(draw(st.integers(0, 25))):
        me = draw(st.sampled_from(chains))
        ts = draw(st.integers(0, 300))  # chains' clocks disagree and may run backwards
        kind = draw(st.sampled_from(["bond", "bond", "unbond", "pay", "pay", "duel", "fraud"]))
        others = [c for c in chains if c is not me]
        if kind in ("bond", "unbond"):
            me.append(kind, {"amount": draw(st.integers(1, 60))}, ts)
        elif kind == "pay":
            payee = draw(st.sampled_from(others))
            picked = draw(st.lists(st.sampled_from(requests), min_size=1, max_size=3, unique=True))
            receipts = [receipt(payee.identity, me.id, r, draw(st.integers(0, 3000)), 7) for r in picked]
            me.append("pay", pay_body(payee.identity, receipts), ts)
        elif kind == "duel" and n >= 4:
            x, y, *judges = draw(st.permutations(others))
            choices = draw(st.lists(st.sampled_from("AB"), min_size=1, max_size=len(judges)))
            if choices.count("A") == choices.count("B"):
                continue
            me.append(
                "duel",
                duel_body(
                    me.id,
                    x.identity,
                    y.identity,
                    [(j.identity, c) for j, c in zip(judges, choices, strict=False)],
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
    reference = fold(ops, PARAMS, now).view()

    one_by_one = Balances(PARAMS, now)  # incremental, refolding when an op arrives out of order
    for op in deliveries(ops, rng):
        one_by_one.add(op)
    batched = Balances(PARAMS, now)  # batches, as a pull stores a range
    stream = deliveries(ops, rng)
    while stream:
        cut = rng.randint(1, len(stream))
        batched.add_many(stream[:cut])
        stream = stream[cut:]
    shuffled = deliveries(ops, rng)
    rng.shuffle(shuffled)
    refolded = fold(shuffled + shuffled[:3], PARAMS, now)

    assert one_by_one.view() == reference
    assert batched.view() == reference
    assert refolded.view() == reference
    if not has_fraud:  # transfers move credits, only fraud destroys them
        joins = sum(op.kind == "join" for op in ops)
        assert micro_total(refolded) == joins * PARAMS.initial_grant * MICRO


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
        check_op(tampered, PARAMS)
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
    with pytest.raises(InvalidOperation, match="initial grant"):
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
        chain.append("pay", {"payments": [{"to": x.node_id, "amount": 0.509, "receipts": [stolen]}]}, 2)
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
    with pytest.raises(InvalidOperation, match="amount"):
        chain.append("pay", {"payments": [{"to": x.node_id, "amount": 1.2, "receipts": [r]}]}, 2)
    chain.append("pay", {"payments": [{"to": x.node_id, "amount": 1.1, "receipts": [r]}]}, 2)


def test_tampered_receipt_is_rejected() -> None:
    e, x = IDS[:2]
    chain = Chain(e)
    chain.append("join", {"grant": 100}, 1)
    r = receipt(x, e.node_id, h("q"))
    r["body"]["completion_tokens"] = 0
    with pytest.raises(InvalidOperation, match="receipt"):
        chain.append("pay", pay_body(x, [r]), 2)


def test_duel_with_forged_or_contrary_votes_is_rejected() -> None:
    e, x, y, j1, j2, j3 = IDS
    chain = Chain(e)
    chain.append("join", {"grant": 100}, 1)
    body = duel_body(e.node_id, x, y, [(j1, "A"), (j2, "A"), (j3, "B")])
    forged = dict(body, votes=[*body["votes"][:2], vote(j2, body["receipts"][0]["body"]["request"], "B")])
    forged["votes"][2]["body"]["id"] = j3.node_id  # j2's signature passed off as j3's
    with pytest.raises(InvalidOperation, match="vote"):
        chain.append("duel", forged, 2)
    with pytest.raises(InvalidOperation, match="majority"):
        chain.append("duel", dict(body, winner=y.node_id, loser=x.node_id), 2)
    with pytest.raises(InvalidOperation, match="twice"):
        chain.append("duel", dict(body, votes=[*body["votes"], body["votes"][0]]), 2)
    by_judge = dict(body, receipts=[receipt(j1, e.node_id, h("z")), body["receipts"][1]])
    with pytest.raises(InvalidOperation):
        chain.append("duel", by_judge, 2)
    tie = duel_body(e.node_id, x, y, [(j1, "A"), (j2, "B")])
    with pytest.raises(InvalidOperation, match="no winner"):
        chain.append("duel", tie, 2)
    chain.append("duel", body, 2)


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
    balances = fold(a.ops, PARAMS)
    assert balances.account(a.id, 1050) == Account(60.0, 0.0, 40.0, False)
    assert balances.account(a.id, 1100).liquid == 70.0
    assert balances.account(a.id, 1101) == Account(100.0, 0.0, 0.0, False)
    assert balances.account(a.id).unbonding == 40.0  # no `now`: nothing has matured


def test_negative_balance_blocks_delegation() -> None:
    e, x = joined(*IDS[:2])
    assert fold(all_ops(e, x), PARAMS).can_delegate(e.id)
    e.append("bond", {"amount": 99}, 1)
    receipts = [receipt(x.identity, e.id, h(f"q{i}")) for i in range(3)]  # 3 x 0.509 credits
    e.append("pay", pay_body(x.identity, receipts), 2)
    balances = fold(all_ops(e, x), PARAMS)
    assert balances.account(e.id).liquid == pytest.approx(1 - 3 * 0.509)
    assert not balances.can_delegate(e.id)
    assert balances.can_delegate(x.id)


def test_a_receipt_is_paid_once() -> None:
    e, x, y = joined(*IDS[:3])
    r = receipt(x.identity, e.id, h("q"))
    e.append("pay", pay_body(x.identity, [r]), 1)
    e.append("pay", pay_body(x.identity, [r, receipt(x.identity, e.id, h("q2"))]), 2)
    e.append("pay", pay_body(y.identity, [receipt(y.identity, e.id, h("q"))]), 3)  # the duel twin
    view = fold(all_ops(e, x, y), PARAMS).view()
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
    balances = fold(all_ops(c, r), PARAMS)
    assert balances.account(c.id, 10) == Account(50.0, 0.0, 0.0, True)
    assert balances.is_barred(c.id) and not balances.can_delegate(c.id)
    assert not balances.is_barred(r.id)
    # A second proof (an earlier fork, by the culprit itself) bars from the earlier seq, slashes once.
    c.append("fraud", fraud_body(c, 2), 6)
    balances = fold(all_ops(c, r), PARAMS)
    assert balances.account(c.id, 10) == Account(100.0, 0.0, 0.0, True)


def test_partial_fraud_slash_spares_matured_unbonding() -> None:
    params = PARAMS.model_copy(update={"fraud_slash_fraction": 0.5})
    c, r = joined(*IDS[:2])
    c.append("bond", {"amount": 50}, 1, params)
    c.append("unbond", {"amount": 10}, 2, params)  # matures at 102, before the proof
    c.append("unbond", {"amount": 20}, 200, params)  # pending at the proof: halved
    c.append("bond", {"amount": 1}, 210, params)  # seq 5, the forked one: void
    r.append("fraud", fraud_body(c, 5), 250, params)
    view = fold(all_ops(c, r), params).account(c.id, 1000)
    assert view == Account(50.0 + 10 + 10, 10.0, 0.0, True)


def test_duel_moves_stake_to_the_winner_and_from_minority_judges() -> None:
    e, x, y, j1, j2, j3 = joined(*IDS)
    for c in (x, y, j1, j2, j3):
        c.append("bond", {"amount": 80}, 1)
    body = duel_body(
        e.id, x.identity, y.identity, [(j1.identity, "A"), (j2.identity, "A"), (j3.identity, "B")]
    )
    e.append("duel", body, 2)
    e.append("duel", body, 3)  # the same duel settled twice counts once
    view = fold(all_ops(e, x, y, j1, j2, j3), PARAMS).view()
    assert view[x.id]["liquid"] == 20 + 40 and view[x.id]["bonded"] == 80
    assert view[y.id]["bonded"] == 40
    assert view[j3.id]["bonded"] == 64
    assert view[j1.id]["liquid"] == view[j2.id]["liquid"] == 28
    assert micro_total(fold(all_ops(e, x, y, j1, j2, j3), PARAMS)) == 6 * 100 * MICRO


def test_incremental_apply_matches_the_fold_and_refuses_out_of_order() -> None:
    a, b = joined(*sorted(IDS[:2], key=lambda i: i.node_id), ts=5)  # same ts: a's id sorts first
    a.append("bond", {"amount": 10}, 7)
    b.append("bond", {"amount": 20}, 6)
    balances = Balances(PARAMS)
    for op in (a.ops[0], b.ops[0], b.ops[1], a.ops[1]):  # canonical order
        balances.apply(op)
    balances.apply(a.ops[1])  # a duplicate is a no-op
    assert balances.view() == fold(all_ops(a, b), PARAMS).view()
    late = Balances(PARAMS)
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
    balances = Balances(PARAMS)
    assert balances.extend([a.ops[0], b.ops[0], a.ops[1]])
    assert balances.extend([b.ops[1]])  # ts 8: after everything folded
    assert balances.view() == fold(all_ops(a, b), PARAMS).view()
    late = Balances(PARAMS)
    assert late.extend(a.ops)
    assert not late.extend(b.ops)  # b's join (ts 5) sorts before a's bond (ts 7): refold needed
    assert late.view() == fold(a.ops, PARAMS).view()  # nothing of b was folded


def test_clock_running_backwards_keeps_chain_order() -> None:
    (a,) = joined(IDS[0], ts=100)
    a.append("bond", {"amount": 100}, 50)  # earlier ts than the join: still folded after it
    a.append("unbond", {"amount": 100}, 10)
    assert fold(reversed(a.ops), PARAMS).account(a.id, 200).liquid == 100


# -- compact (countersigned) payments ------------------------------------------------------------


def batch_payment(executor: NodeIdentity, entry: str, receipts: list[dict[str, Any]], signer=None) -> dict:
    items = batch_items(receipts)
    sig = (signer or executor).sign(canonical(batch_body(executor.node_id, entry, items))).hex()
    return {"to": executor.node_id, "amount": payment_amount(receipts, PARAMS), "items": items, "sig": sig}


def test_a_countersigned_batch_pays_like_its_receipts() -> None:
    e, x = IDS[:2]
    rs = [receipt(x, e.node_id, h(f"b{i}"), 100 * i, 50) for i in range(5)]
    long_form, short_form = joined(e, x), joined(e, x)
    long_form[0].append("pay", pay_body(x, rs), 2)
    short_form[0].append("pay", {"payments": [batch_payment(x, e.node_id, rs)]}, 2)
    assert fold(all_ops(*long_form), PARAMS).view() == fold(all_ops(*short_form), PARAMS).view()
    compact, full = short_form[0].ops[-1], long_form[0].ops[-1]
    assert len(compact.raw) < len(full.raw) / 3


def test_a_request_paid_in_both_forms_is_paid_once() -> None:
    e, x = IDS[:2]
    r = receipt(x, e.node_id, h("once"))
    ce, cx = joined(e, x)
    ce.append("pay", pay_body(x, [r]), 2)
    ce.append("pay", {"payments": [batch_payment(x, e.node_id, [r])]}, 3)
    view = fold(all_ops(ce, cx), PARAMS).view()
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
