"""Duel operations in the ledger: what evidence is believed, and what a settled duel moves.

Every node folds the same duel the same way; tampered, replayed or mismatched evidence is refused by
`check_op`, which every node runs before it stores an operation.
"""

from __future__ import annotations

import copy
import random

import pytest

from tests.test_ledger_fold import (
    IDS,
    NET,
    PARAMS,
    Chain,
    all_ops,
    duel_body,
    h,
    joined,
    micro_total,
    receipt,
    vote,
)
from wwwserve_gateway.network import canaries
from wwwserve_gateway.network.genesis import DuelParams
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.network.receipts import request_hash, text_hash
from wwwserve_gateway.network.votes import duel_seed, judge_order
from wwwserve_gateway.plugins.ledger.duels import decide, elo, judge_weight
from wwwserve_gateway.plugins.ledger.fold import fold
from wwwserve_gateway.plugins.ledger.ops import InvalidOperation
from wwwserve_gateway.plugins.ledger.rules import MICRO


def judging(judges: int):
    """PARAMS with `judges` judges per duel: a duel settles on at least that many counted votes."""
    return PARAMS.model_copy(update={"duels": PARAMS.duels.model_copy(update={"judges": judges})})


def bonded(*chains: Chain, amount: int = 80) -> None:
    for c in chains:
        c.append("bond", {"amount": amount}, 1)


def shown(body: dict) -> tuple[str, str]:
    return body["receipts"][0]["body"]["text"], body["receipts"][1]["body"]["text"]


def test_a_majority_moves_committed_stake_to_the_winner_and_pays_the_judges() -> None:
    e, x, y, j1, j2, j3 = joined(*IDS)
    bonded(x, y, j1, j2, j3)
    body = duel_body(
        e.id, x.identity, y.identity, [(j1.identity, "A"), (j2.identity, "A"), (j3.identity, "B")]
    )
    e.append("duel", body, 2)
    e.append("duel", copy.deepcopy(body), 3)  # a replayed duel settles nothing more
    balances = fold(all_ops(e, x, y, j1, j2, j3), PARAMS, NET)
    view = balances.view()
    # gamma 0.5 of the 80 y committed goes to x's liquid credit
    assert (view[x.id]["liquid"], view[x.id]["bonded"]) == (20 + 40, 80)
    assert view[y.id]["bonded"] == 40
    # j3 voted against the outcome: 0.2 of its bond is split between j1 and j2; each judge is paid 1
    assert view[j3.id]["bonded"] == 64 and view[j3.id]["liquid"] == 21
    assert view[j1.id]["liquid"] == view[j2.id]["liquid"] == 20 + 8 + 1
    assert view[e.id]["liquid"] == 100 - 3  # the entry only pays
    assert micro_total(balances) == 6 * 100 * MICRO
    assert balances.quality(x.id, "m") == pytest.approx(1508.0)
    assert balances.quality(y.id, "m") == pytest.approx(1492.0)
    assert balances.duel_view()[x.id]["duels"] == {"won": 1, "lost": 0, "tied": 0}


def test_a_tie_moves_no_stake_but_pays_the_judges() -> None:
    e, x, y, j1, j2 = joined(*IDS[:5])
    bonded(x, y, j1, j2)
    e.append("duel", duel_body(e.id, x.identity, y.identity, [(j1.identity, "A"), (j2.identity, "B")]), 2)
    balances = fold(all_ops(e, x, y, j1, j2), judging(2), NET)
    view = balances.view()
    assert view[x.id]["bonded"] == view[y.id]["bonded"] == view[j1.id]["bonded"] == 80
    assert view[j1.id]["liquid"] == view[j2.id]["liquid"] == 21
    assert balances.duel_view()[x.id]["duels"] == {"won": 0, "lost": 0, "tied": 1}


def test_a_loser_loses_at_most_what_it_has_bonded() -> None:
    e, x, y, j1 = joined(*IDS[:4])
    bonded(x, j1)
    bonded(y, amount=10)  # but its receipt claims 80 committed
    e.append("duel", duel_body(e.id, x.identity, y.identity, [(j1.identity, "A")]), 2)
    view = fold(all_ops(e, x, y, j1), judging(1), NET).view()
    assert view[y.id]["bonded"] == 0 and view[x.id]["liquid"] == 20 + 10


def tampered(e: Chain, x: NodeIdentity, y: NodeIdentity, judges: list[NodeIdentity]) -> dict[str, dict]:
    body = duel_body(e.id, x, y, [(j, "A") for j in judges])
    request = body["receipts"][0]["body"]["request"]
    out: dict[str, dict] = {}
    changed = copy.deepcopy(body)
    changed["votes"][0]["body"]["choice"] = "B"  # a changed vote: its signature no longer holds
    out["changed vote"] = changed
    out["vote by an executor"] = dict(body, votes=[vote(x, e.id, request, shown(body), "A")])
    out["vote by the entry"] = dict(body, votes=[vote(e.identity, e.id, request, shown(body), "A")])
    out["vote on another answer"] = dict(
        body, votes=[vote(judges[0], e.id, request, (h("other"), shown(body)[1]), "A")]
    )
    out["vote for another entry"] = dict(
        body, votes=[vote(judges[0], IDS[5].node_id, request, shown(body), "A")]
    )
    out["vote on another duel"] = dict(body, votes=[vote(judges[0], e.id, h("other"), shown(body), "A")])
    out["a judge twice"] = dict(body, votes=[body["votes"][0], body["votes"][0]])
    out["receipts of another entry"] = dict(
        body, receipts=[receipt(x, IDS[5].node_id, request), body["receipts"][1]]
    )
    out["receipts of two requests"] = dict(
        body, receipts=[body["receipts"][0], receipt(y, e.id, h("another"))]
    )
    out["the same executor twice"] = dict(
        body, receipts=[body["receipts"][0], receipt(x, e.id, request, text=h("t"))]
    )
    same = h("same text")
    out["identical answers"] = dict(
        body, receipts=[receipt(x, e.id, request, text=same), receipt(y, e.id, request, text=same)], votes=[]
    )
    out["a winner named by the entry"] = dict(body, winner=x.node_id)
    out["too many votes"] = dict(body, votes=body["votes"] * 3)
    return out


@pytest.mark.parametrize(
    "case",
    [
        "changed vote",
        "vote by an executor",
        "vote by the entry",
        "vote on another answer",
        "vote for another entry",
        "vote on another duel",
        "a judge twice",
        "receipts of another entry",
        "receipts of two requests",
        "the same executor twice",
        "identical answers",
        "a winner named by the entry",
        "too many votes",
    ],
)
def test_tampered_duel_evidence_is_refused(case: str) -> None:
    (e,) = joined(IDS[0])
    body = tampered(e, IDS[1], IDS[2], list(IDS[3:6]))[case]
    with pytest.raises(InvalidOperation):
        e.append("duel", body, 2)


def test_only_judges_the_seeded_draw_ranks_count() -> None:
    """With one judge per duel the window is the first two of the draw: a third judge's vote, from
    a node the entry picked itself, is not counted."""
    ids = [NodeIdentity.generate() for _ in range(7)]
    params = PARAMS.model_copy(
        update={
            "allocations": {i.node_id: 100 for i in ids},
            "duels": DuelParams(judges=1, gamma=0.5, judge_price=1.0),
        }
    )
    chains = [Chain(i) for i in ids]
    for c in chains:
        c.append("join", {"grant": 100}, 0, params)
    e, x, y, *judges = chains
    for c in (x, y, *judges):
        c.append("bond", {"amount": 80}, 1, params)
    body = duel_body(e.id, x.identity, y.identity, [])
    seed = duel_seed(*body["receipts"])
    window = judge_order(seed, {j.id: 80 * MICRO for j in judges}, 2)
    outsider = next(j for j in judges if j.id not in window)
    request = body["receipts"][0]["body"]["request"]
    body["votes"] = [vote(outsider.identity, e.id, request, shown(body), "B")]
    e.append("duel", body, 2, params)
    view = fold([op for c in chains for op in c.ops], params, NET).view()
    assert view[x.id]["bonded"] == view[y.id]["bonded"] == 80  # nothing decided
    assert view[outsider.id]["liquid"] == 20  # and the outsider is not paid


def canary_duel(
    e: Chain,
    x: NodeIdentity,
    y: NodeIdentity,
    texts: tuple[str, str],
    votes: list[tuple[NodeIdentity, str]],
    n: int,
):
    spec = {"kind": "arith", "a": 6, "b": 7 + n, "op": "*"}
    body = {"model": "m", "messages": canaries.messages(spec)}
    request_id = f"{n:032x}"
    request = request_hash(request_id, "chat/completions", body)
    receipts = [
        receipt(x, e.id, request, text=text_hash(texts[0])),
        receipt(y, e.id, request, text=text_hash(texts[1])),
    ]
    hashes = (receipts[0]["body"]["text"], receipts[1]["body"]["text"])
    return {
        "receipts": receipts,
        "votes": [vote(j, e.id, request, hashes, c) for j, c in votes],
        "canary": {
            "spec": spec,
            "request": {"id": request_id, "endpoint": "chat/completions", "body": body},
            "texts": list(texts),
        },
    }


def test_canaries_are_decided_by_their_answer_and_grade_the_judges() -> None:
    e, x, y, good, bad = joined(*IDS[:5])
    bonded(x, y, good, bad)
    for n in range(2):  # x answers right, y wrong; `bad` votes for y's wrong answer both times
        right = str(6 * (7 + n))
        e.append(
            "duel",
            canary_duel(
                e, x.identity, y.identity, (right, "12"), [(good.identity, "A"), (bad.identity, "B")], n
            ),
            2 + n,
        )
    balances = fold(all_ops(e, x, y, good, bad), judging(2), NET)
    view = balances.duel_view()
    assert view[x.id]["duels"]["won"] == 2 and view[y.id]["duels"]["lost"] == 2
    assert view[good.id]["judging"] == {"right": 2, "graded": 2, "weight": 0.75}
    assert view[bad.id]["judging"]["weight"] == 0.25
    # Now a duel the two judges split: the judge the canaries trust decides it.
    e.append("duel", duel_body(e.id, y.identity, x.identity, [(good.identity, "A"), (bad.identity, "B")]), 10)
    after = fold(all_ops(e, x, y, good, bad), judging(2), NET).duel_view()
    assert after[y.id]["duels"]["won"] == 1


def test_a_canary_that_does_not_match_its_receipts_is_refused() -> None:
    e, x, y = joined(*IDS[:3])
    body = canary_duel(e, x.identity, y.identity, ("42", "12"), [], 0)
    lying = copy.deepcopy(body)
    lying["canary"]["texts"] = ["12", "42"]  # texts swapped: their hashes do not match the receipts
    with pytest.raises(InvalidOperation, match="texts"):
        e.append("duel", lying, 2)
    other = copy.deepcopy(body)
    other["canary"]["spec"] = {"kind": "arith", "a": 1, "b": 2, "op": "+"}  # another question than asked
    with pytest.raises(InvalidOperation, match="question"):
        e.append("duel", other, 2)
    e.append("duel", body, 2)


def test_replicas_settle_duels_identically_in_any_order() -> None:
    chains = joined(*IDS)
    e, x, y, *judges = chains
    bonded(x, y, *judges)
    rng = random.Random(7)
    for n in range(20):
        a, b = rng.sample([x, y, judges[0]], 2)
        rest = [j for j in (x, y, *judges) if j not in (a, b)]
        picks = [(j.identity, rng.choice(["A", "B", "tie", "abstain"])) for j in rest]
        e.append("duel", duel_body(e.id, a.identity, b.identity, picks, tag=str(n)), 2 + n)
    ops = all_ops(*chains)
    reference = fold(ops, PARAMS, NET)
    for _ in range(5):
        rng.shuffle(ops)
        again = fold(ops, PARAMS, NET)
        assert again.view() == reference.view() and again.duel_view() == reference.duel_view()
    assert micro_total(reference) == 6 * 100 * MICRO


def test_decision_rules() -> None:
    assert decide({}, {}, None) is None
    assert decide({"j": "abstain"}, {}, None) is None
    assert decide({"j": "abstain"}, {}, "A") == "A"  # a canary's answer decides
    assert decide({"j1": "A", "j2": "B"}, {"j1": 0.5, "j2": 0.5}, None) == "tie"
    assert decide({"j1": "A", "j2": "B"}, {"j1": 0.75, "j2": 0.25}, None) == "A"
    assert decide({"j1": "A", "j2": "B", "j3": "B"}, {"j1": 0.9, "j2": 0.3, "j3": 0.3}, None) == "A"
    assert judge_weight(0, 0) == 0.5 and judge_weight(9, 10) > 0.8 and judge_weight(0, 10) < 0.1
    ra, rb = elo(1500, 1500, 1.0, 16)
    assert (ra, rb) == (1508, 1492)
    assert elo(1900, 1500, 1.0, 16)[0] - 1900 < 2  # an expected win moves little


def test_a_duel_on_fewer_votes_than_judges_settles_nothing() -> None:
    """An entry that keeps only the votes it likes, fewer than `judges`, settles no duel."""
    e, x, y, j1, j2, j3 = joined(*IDS)
    bonded(x, y, j1, j2, j3)
    e.append("duel", duel_body(e.id, x.identity, y.identity, [(j1.identity, "A"), (j2.identity, "A")]), 2)
    balances = fold(all_ops(e, x, y, j1, j2, j3), PARAMS, NET)  # 3 judges per duel
    view = balances.view()
    assert view[x.id]["bonded"] == view[y.id]["bonded"] == 80 and view[x.id]["liquid"] == 20
    assert x.id not in balances.duel_view() or "duels" not in balances.duel_view()[x.id]
    assert balances.quality(x.id, "m") == balances.quality(y.id, "m") == 1500


def test_a_loser_risks_half_its_bond_whatever_its_receipt_committed() -> None:
    """A colluding entry's executor that commits nothing in its receipt still loses gamma x half
    its bond."""
    e, x, y, j1 = joined(*IDS[:4])
    bonded(x, y, j1)
    body = duel_body(e.id, x.identity, y.identity, [(j1.identity, "A")], stakes=(80, 0))
    e.append("duel", body, 2)
    view = fold(all_ops(e, x, y, j1), judging(1), NET).view()
    assert view[y.id]["bonded"] == 80 - 20 and view[x.id]["liquid"] == 20 + 20  # 0.5 x (0.5 x 80)
