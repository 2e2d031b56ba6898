"""Balances as a deterministic fold over a set of valid ledger operations.

Fold order (canonical). Each operation gets the key `(eff_ts, author, seq, hash)` where `eff_ts` is
the largest `ts` among its author's operations with seq <= its own (a running maximum along the
chain). The fold processes operations in increasing key order.

Why this is independent of arrival order: a key depends only on the operation and its author's chain
prefix, which is in the set whenever the operation is (the ledger stores chains contiguously); so
the set alone fixes every key, and keys are unique (author, seq and hash identify an operation).
Sorting by them is a total order that the set determines; processing is a deterministic function of
that sequence. `eff_ts` never decreases along a chain, so an author's operations are always folded
in seq order even if its clock went backwards, and chains from different authors interleave by time.
Duplicates collapse by hash.

Forks. An author is barred from the smallest seq at which the set proves an equivocation: the
evidence of any `fraud` operation in the set (wherever it sits: two signed operations prove it on
their own), or two different operations of the author with the same seq held in the set. The
author's operations at seq >= that fork seq are skipped entirely, except `fraud` operations, whose
only effect is evidence. Replicas that hold different branches of a fork therefore agree as soon as
they share the proof: the branches themselves never count. The slash (fraud_slash_fraction of bonded
stake and of unbonding stake still pending at the proof's ts) is applied once, at the first fraud
operation about the author in fold order.

Amounts are integer micro-credits (see ledger_rules) so sums are exact. A bond, a transfer or a
payment moves at most the liquid credit its author holds at its place in fold order (the rest of a
payment stays unpaid): credit is never created by spending it, so identities that pay one another
cannot mint stake. Unbonding stake is kept as (matures_at, amount) entries and counted as liquid by
the views once `now` has passed `matures_at`, so the fold itself needs no clock.

Incremental use: `apply` folds an operation that sorts after everything folded so far (the common
case: appending one's own chain) and raises NeedsRefold otherwise; `add` / `add_many` fall back to
a full refold from the operations held.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from wwwserve_gateway.network.genesis import LedgerParams
from wwwserve_gateway.network.votes import judge_order
from wwwserve_gateway.plugin_api.ledger import Account
from wwwserve_gateway.plugins.ledger.duels import (
    START_RATING,
    DuelCase,
    check_duel,
    decide,
    elo,
    judge_weight,
)
from wwwserve_gateway.plugins.ledger.ops import Operation
from wwwserve_gateway.plugins.ledger.rules import MICRO, fraud_evidence, payment_entries, to_micro

Key = tuple[float, str, int, str]


class NeedsRefold(Exception):
    """The operation does not sort after everything folded so far (or changes what was folded)."""


@dataclass(slots=True)
class _Funds:
    liquid: int = 0  # micro-credits; may be negative
    bonded: int = 0
    unbonding: list[list[Any]] = field(default_factory=list)  # [matures_at, micro-credits]
    barred: bool = False


def _take(amount: int, fraction: float) -> int:
    """floor(fraction x amount) in exact arithmetic (nothing is taken from a negative amount)."""
    return math.floor(Fraction(fraction) * amount) if amount > 0 else 0


class Balances:
    def __init__(self, params: LedgerParams, net: str, now: float | None = None) -> None:
        self.params = params
        self.net = net
        self.now = now  # default time for the views; None: no unbonding has matured
        # Signature checks are the costly part of a refold: their results are kept across refolds.
        self._cases: dict[str, DuelCase] = {}  # duel op hash -> checked case
        self._evidence: dict[str, tuple[str, int]] = {}  # fraud op hash -> (culprit, seq)
        self._reset()

    def _reset(self) -> None:
        self._accounts: dict[str, _Funds] = {}
        self._ops: dict[str, Operation] = {}  # every operation given, by hash
        self._seqs: dict[str, dict[int, str]] = defaultdict(dict)  # author -> seq -> hash
        self._max_ts: dict[str, float] = {}  # author -> largest ts folded
        self._top: dict[str, int] = {}  # author -> highest seq held
        self._last: Key | None = None
        self._forks: dict[str, int] = {}  # author -> smallest equivocating seq
        self._paid: set[tuple[str, str, str]] = set()  # receipt keys already paid
        self._duels: set[tuple[str, str]] = set()  # (entry, request) already settled
        self._slashed: set[str] = set()
        self._ratings: dict[tuple[str, str], float] = {}  # (executor, model) -> Elo rating
        self._record: dict[str, list[int]] = {}  # executor -> [won, lost, tied]
        self._graded: dict[str, list[int]] = {}  # judge -> [right, graded] on canaries

    # -- folding ---------------------------------------------------------------------------------------
    @classmethod
    def fold(
        cls,
        ops: Iterable[Operation],
        params: LedgerParams,
        net: str,
        now: float | None = None,
    ) -> Balances:
        """Balances of a set of valid operations (duplicates and arrival order do not matter)."""
        balances = cls(params, net, now)
        balances._fold_all(ops)
        return balances

    def _fold_all(self, ops: Iterable[Operation]) -> None:
        self._reset()
        self._ops = {op.hash: op for op in ops}
        by_author: dict[str, list[Operation]] = defaultdict(list)
        for op in self._ops.values():
            by_author[op.author].append(op)
        keyed: list[tuple[Key, Operation]] = []
        for author, chain in by_author.items():
            chain.sort(key=lambda o: (o.seq, o.hash))
            # eff_ts covers every op with seq <= op.seq, including a conflicting one at op.seq.
            seq_ts: dict[int, float] = {}
            for op in chain:
                seq_ts[op.seq] = max(seq_ts.get(op.seq, -math.inf), op.ts)
                if self._seqs[author].setdefault(op.seq, op.hash) != op.hash:
                    self._forks[author] = min(self._forks.get(author, op.seq), op.seq)
            running, eff = -math.inf, {}
            for seq in sorted(seq_ts):
                running = eff[seq] = max(running, seq_ts[seq])
            keyed += [((eff[op.seq], author, op.seq, op.hash), op) for op in chain]
            self._max_ts[author] = running
            self._top[author] = chain[-1].seq
        for op in self._ops.values():
            if op.kind == "fraud":
                culprit, seq = self._fraud(op)
                self._forks[culprit] = min(self._forks.get(culprit, seq), seq)
        for culprit in self._forks:
            self._account(culprit).barred = True
        keyed.sort(key=lambda pair: pair[0])
        for key, op in keyed:
            self._step(op)
            self._last = key

    def apply(self, op: Operation) -> None:
        """Fold `op` if it sorts after everything folded so far; raise NeedsRefold otherwise.

        Applying an operation already held is a no-op. Nothing changes when NeedsRefold is raised.
        """
        if op.hash in self._ops:
            return
        if op.seq != self._top.get(op.author, 0) + 1:
            raise NeedsRefold("not the next operation of its author's chain (or a fork)")
        key = (max(self._max_ts.get(op.author, -math.inf), op.ts), op.author, op.seq, op.hash)
        if self._last is not None and key < self._last:
            raise NeedsRefold("operation sorts before operations already folded")
        if op.kind == "fraud":
            culprit, seq = self._fraud(op)
            if seq < self._forks.get(culprit, math.inf) and self._top.get(culprit, 0) >= seq:
                raise NeedsRefold("fraud proof voids operations already folded")
            self._forks[culprit] = min(self._forks.get(culprit, seq), seq)
            self._account(culprit).barred = True
        self._ops[op.hash] = op
        self._seqs[op.author][op.seq] = op.hash
        self._max_ts[op.author] = key[0]
        self._top[op.author] = op.seq
        self._step(op)
        self._last = key

    def add(self, op: Operation) -> None:
        """Fold `op` wherever it sorts: incrementally when possible, else by a full refold."""
        self.add_many([op])

    def add_many(self, ops: Iterable[Operation]) -> None:
        """Fold a batch: incrementally when it all sorts after what is folded, else by one refold."""
        new = self._in_fold_order(ops)
        for i, op in enumerate(new):
            try:
                self.apply(op)
            except NeedsRefold:
                self._fold_all([*self._ops.values(), *new[i:]])
                return

    def extend(self, ops: Iterable[Operation]) -> bool:
        """Fold a batch only as far as it can be done incrementally; False if a refold is needed
        for the rest (the caller refolds later, off the event loop)."""
        for op in self._in_fold_order(ops):
            try:
                self.apply(op)
            except NeedsRefold:
                return False
        return True

    def _in_fold_order(self, ops: Iterable[Operation]) -> list[Operation]:
        fresh = {op.hash: op for op in ops if op.hash not in self._ops}
        running = dict(self._max_ts)
        keyed = []
        for op in sorted(fresh.values(), key=lambda o: (o.author, o.seq)):  # the keys `apply` will use
            running[op.author] = max(running.get(op.author, -math.inf), op.ts)
            keyed.append(((running[op.author], op.author, op.seq, op.hash), op))
        return [op for _, op in sorted(keyed, key=lambda pair: pair[0])]

    def _fraud(self, op: Operation) -> tuple[str, int]:
        evidence = self._evidence.get(op.hash)
        if evidence is None:
            evidence = self._evidence[op.hash] = fraud_evidence(op)
        return evidence

    def _account(self, node: str) -> _Funds:
        account = self._accounts.get(node)
        if account is None:
            account = self._accounts[node] = _Funds()
        return account

    def _step(self, op: Operation) -> None:
        """One operation's effect, in fold order."""
        fork = self._forks.get(op.author)
        if fork is not None and op.seq >= fork and op.kind != "fraud":
            return  # after its author's fork: never counts, on any branch
        me = self._account(op.author)
        body = op.body
        if op.kind == "join":
            me.liquid += body["grant"] * MICRO
        elif op.kind == "transfer":
            amount = min(body["amount"] * MICRO, max(me.liquid, 0))
            me.liquid -= amount
            self._account(body["to"]).liquid += amount
        elif op.kind == "bond":
            # Only credit held can be bonded, moved or paid: a key with nothing can give nothing, so
            # identities that pay each other create no credit and no stake.
            amount = min(body["amount"] * MICRO, max(me.liquid, 0))
            me.liquid -= amount
            me.bonded += amount
        elif op.kind == "unbond":
            # Only stake actually bonded can be unbonded: otherwise stake would be minted from nothing.
            amount = min(body["amount"] * MICRO, max(me.bonded, 0))
            me.bonded -= amount
            me.unbonding.append([op.ts + self.params.unbonding_delay_s, amount])
        elif op.kind == "pay":
            for payment in body["payments"]:
                total = 0
                for key, price in payment_entries(payment, op.author, self.params):
                    if key not in self._paid:  # a request paid again later in fold order is ignored
                        self._paid.add(key)
                        total += price
                total = min(total, max(me.liquid, 0))  # what the payer cannot cover stays unpaid
                me.liquid -= total
                self._account(payment["to"]).liquid += total
        elif op.kind == "duel":
            case = self._cases.get(op.hash)
            if case is None:
                case = self._cases[op.hash] = check_duel(op, self.params, self.net)
            if (case.entry, case.request) not in self._duels:  # a duel is settled once
                self._duels.add((case.entry, case.request))
                self._settle(case, me)
        elif op.kind == "fraud":
            culprit, _ = self._fraud(op)
            if culprit not in self._slashed:
                self._slashed.add(culprit)
                self._slash(self._account(culprit), op.ts)

    def _settle(self, case: DuelCase, entry: _Funds) -> None:
        """A duel's effect at its place in fold order (see `duels`)."""
        rules = self.params.duels
        a, b = case.executors
        # Only judges the seeded draw ranks in its first 2 x judges, by the stakes at this point,
        # count: the entry does not choose who judges.
        pool = {
            node: acc.bonded
            for node, acc in self._accounts.items()
            if not acc.barred and node not in (case.entry, a, b)
        }
        window = set(judge_order(case.seed, pool, 2 * rules.judges))
        ballots = {j: c for j, c in case.ballots.items() if j in window}
        price = to_micro(rules.judge_price)
        for judge in sorted(ballots):  # the entry pays each counted vote, as far as its credit goes
            fee = min(price, max(entry.liquid, 0))
            entry.liquid -= fee
            self._account(judge).liquid += fee
        if len(ballots) < rules.judges:
            # Void: an entry must not settle a duel on the few votes it chose to keep.
            return
        weights = {j: judge_weight(*self._graded.get(j, (0, 0))) for j in ballots}
        outcome = decide(ballots, weights, case.truth)
        if outcome is None:
            return
        if case.truth in ("A", "B"):
            for judge, choice in ballots.items():
                if choice != "abstain":
                    graded = self._graded.setdefault(judge, [0, 0])
                    graded[0] += choice == case.truth
                    graded[1] += 1
        score = {"A": 1.0, "B": 0.0, "tie": 0.5}[outcome]
        ra = self._ratings.get((a, case.model), START_RATING)
        rb = self._ratings.get((b, case.model), START_RATING)
        self._ratings[(a, case.model)], self._ratings[(b, case.model)] = elo(ra, rb, score, rules.rating_k)
        for node, column in (
            (a, {"A": 0, "B": 1, "tie": 2}[outcome]),
            (b, {"A": 1, "B": 0, "tie": 2}[outcome]),
        ):
            self._record.setdefault(node, [0, 0, 0])[column] += 1
        if outcome == "tie":
            return  # ties move no stake
        winner, loser = (a, b) if outcome == "A" else (b, a)
        loser_funds = self._account(loser)
        # At least commit_share of the bond held now is at risk, whatever the receipt committed:
        # a colluding entry cannot settle duels its own executor risks nothing in.
        committed = max(
            to_micro(case.committed[0 if loser == a else 1]), _take(loser_funds.bonded, rules.commit_share)
        )
        moved = min(_take(committed, rules.gamma), max(loser_funds.bonded, 0))
        loser_funds.bonded -= moved
        self._account(winner).liquid += moved
        majority = tuple(sorted(j for j, c in ballots.items() if c == outcome))
        for judge, choice in sorted(ballots.items()):
            if choice != outcome:
                fraction = rules.abstain_slash if choice == "abstain" else rules.minority_slash
                self._move_bonded(judge, fraction, majority)

    def _move_bonded(self, source: str, fraction: float, to: tuple[str, ...]) -> None:
        """floor(fraction x `source`'s bonded stake), split equally into the liquid credit of `to`
        (the indivisible remainder stays with the source; nobody to pay: it is destroyed)."""
        funds = self._account(source)
        amount = _take(funds.bonded, fraction)
        if to:
            share = amount // len(to)
            amount = share * len(to)
            for node in to:
                self._account(node).liquid += share
        funds.bonded -= amount

    def _slash(self, account: _Funds, ts: float) -> None:
        fraction = self.params.fraud_slash_fraction
        account.bonded -= _take(account.bonded, fraction)
        for entry in account.unbonding:
            if entry[0] > ts:  # still pending when the proof was made: penalties still apply
                entry[1] -= _take(entry[1], fraction)

    # -- views -----------------------------------------------------------------------------------------
    def account(self, node: str, now: float | None = None) -> Account:
        """`node`'s credits at time `now` (unbonding stake past its maturity counts as liquid)."""
        when = self.now if now is None else now
        acc = self._accounts.get(node) or _Funds()
        matured = sum(a for t, a in acc.unbonding if when is not None and t <= when)
        pending = sum(a for t, a in acc.unbonding) - matured
        return Account((acc.liquid + matured) / MICRO, acc.bonded / MICRO, pending / MICRO, acc.barred)

    def view(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        return {node: dataclasses.asdict(self.account(node, now)) for node in sorted(self._accounts)}

    def quality(self, node: str, model: str) -> float:
        """`node`'s Elo rating for `model` from the duels settled so far (1500 before any)."""
        return self._ratings.get((node, model), START_RATING)

    def duel_view(self) -> dict[str, dict[str, Any]]:
        """Per node: its ratings by model, its duels won/lost/tied, and as a judge its canary
        grades (right of graded) and the weight they give its votes."""
        out: dict[str, dict[str, Any]] = defaultdict(dict)
        for (node, model), rating in sorted(self._ratings.items()):
            out[node].setdefault("quality", {})[model] = round(rating, 1)
        for node, (won, lost, tied) in self._record.items():
            out[node]["duels"] = {"won": won, "lost": lost, "tied": tied}
        for node, (right, graded) in self._graded.items():
            out[node]["judging"] = {
                "right": right,
                "graded": graded,
                "weight": round(judge_weight(right, graded), 3),
            }
        return dict(out)

    def is_paid(self, key: tuple[str, str, str]) -> bool:
        """Whether a receipt key (executor, entry, request) is paid by an operation held."""
        return key in self._paid

    def is_barred(self, node: str) -> bool:
        acc = self._accounts.get(node)
        return acc is not None and acc.barred

    def stake(self, node: str) -> float:
        """Bonded stake in credits (what proof-of-stake draws weigh)."""
        acc = self._accounts.get(node)
        return acc.bonded / MICRO if acc else 0.0

    def can_delegate(self, node: str, now: float | None = None) -> bool:
        """A node may delegate (and be drawn) unless it is barred (a balance never goes negative:
        nothing is spent that is not held)."""
        return not self.account(node, now).barred

    @property
    def ops(self) -> list[Operation]:
        """The operations held (a refold's input)."""
        return list(self._ops.values())


def fold(
    ops: Iterable[Operation],
    params: LedgerParams,
    net: str,
    now: float | None = None,
) -> Balances:
    """Module-level alias of Balances.fold."""
    return Balances.fold(ops, params, net, now)
