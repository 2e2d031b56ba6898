"""Duel-and-judge at 100 and 1,000 nodes, settled by the ledger's own fold: where quality wins.

    python -m simulation.duels [--quick] [--out DIR]

`run(...)` simulates one network and returns a result dict; `main()` runs the scenarios (N = 100
and 1,000; 0, 10% and 30% colluding judges; canaries on and off; lazy executors; two attacks the
rules leave open) and writes duel_simulation.json and duel_simulation.png to --out (default
benchmarks/results/).

Same rules, not a copy. Every duel is a real signed `duel` operation folded by the real
`Balances.apply` (plugins/ledger/fold.py): both executors sign real receipts
(`network.receipts.sign_receipt`, with the stake they commit: their bonded stake, as the executor
does), the judges sign real votes (`network.votes.sign_vote`, each over the answers in its own
random order, as the entry shows them), canary duels carry a real canary (`network.canaries.make`,
its request, both answer texts), and the entry signs the operation (`ledger.ops.sign_op`). So the
judge window (`judge_order` over the bonded stakes at that point), the judge fees, `decide` with
canary-accuracy weights, Elo, the stake the loser forfeits, the minority and abstain slashes and the
canary grading are all the fold's. Joins (with genesis allocations) and bonds are real operations
too. The simulator only reads the fold back (`account`, `quality`, `duel_view`, and its per-executor
won/lost/tied record to know each duel's outcome as it happens).

Cost of that choice (measured on the 2-core development machine, shared with other work, so
+-50%): a duel's signatures (2 receipts, 3 votes and the operation signed; the votes and the
operation verified again by `parse_op` and `check_duel`) cost about 1.5 ms. The judge draw
(`judge_order`, about 2 us per staked node) is needed twice per duel, by the entry to know whom to
ask and inside the fold to know whose votes count; `_SharedDraw` computes it once and hands the
fold the same list (it stands in for `fold.judge_order` during `run` and is restored after; the
result is reused only for an identical seed, k and stake mapping, and a test checks the runs are
identical with and without it). The router draw (`pos.weighted_order`, one Plackett-Luce draw of two
for A and B) is about 0.7 us per node. A duel then costs about 2.5 ms at N = 100 and 8-10 ms at
N = 1,000 (15-25 ms when the machine is busy), of which the signatures are 1.5 ms: calling
`Balances._settle` with hand-made `DuelCase`s would save at most that, so the real signed
operations are kept.

The model.
- Nodes. Each node gets a genesis allocation (`grant`) and bonds `bond` of it; each is an
  executor of one class and a judge. A class answers a request right with probability p:
  good 0.9, mid 0.6, random 0.05 (a random-weight model), lazy 0.0 (cheap garbage).
- A step is one duel. The entry is a uniformly random node. Executors A and B are drawn as the
  built-in router draws (`plugins/routers/pos.py`): weight = bonded stake x
  `quality_factor(Elo, quality_span)` (the router's defaults: span 2.0, explore 0.05, newcomer
  stake 1.0), `weighted_order` over the staked nodes other than the entry (B: also other than A),
  and with probability `explore` a uniformly drawn newcomer first when there is one. The weights
  are the router's formula evaluated on the fold's numbers; only nodes a duel touched are
  re-read after it.
- Judges. The entry asks the first `judges` of `judge_order(duel_seed, bonded stakes of the other
  non-barred nodes, 2 x judges)`, all alive. An honest judge, when exactly one answer is right,
  votes for it with probability q (0.8) and for the other otherwise; when both are right or both
  wrong it votes "tie" with probability `tie_prob` (0.5; the reference judge always says tie, an
  LLM judge rarely does) and picks A or B at random otherwise.
- Canaries. A share `canary_share` of duels are canaries: a real canary question whose answers are
  the right one or "I am not sure." (right with the executor's p). Its outcome is the known answer;
  judges are asked as for any duel (the entry does) and graded by it. The default share is
  canary_rate / (rate + canary_rate) = 1/6 from the genesis defaults (per delegated request, a
  duel with probability `rate`, a canary with probability `canary_rate`). Two right answers to a
  canary are the same text, and the real entry drops identical answers ("identical"): no duel.
- Colluders. A fraction of nodes forms a coalition, all of class random. A colluding judge votes
  for a coalition executor whenever one is in the duel (tie when both are), and otherwise against
  the better answer (for the wrong one when exactly one is right; for the same pseudo-random side
  as the other colluders when they are equal). Measured over 5 seeds at N = 100 with 30%
  colluders, voting against the better answer is the more damaging default without canaries
  (app duels with one right answer decided right: 0.60 against 0.67 for coordinated random
  votes; the good class's credit per node 1.05 against 1.14); with canaries a coordinated random
  vote ("random") serves the coalition better (its credit per node 0.55 against 0.38, as canaries
  catch it less), and hurts the mid class more. Both are scenarios.
  Colluders do not recognise canaries (unless `colluders_see_canaries`, an attack scenario: the
  questions come from fixed templates and `canaries.recognise` identifies them).
- Stake policy ("keep", the default): after each duel, every node it touched (both executors and
  the judges) tops its bond back up to `bond` from liquid credit, in whole credits, as far as its
  liquid goes; winnings stay liquid. "none": never top up; "all": bond all liquid credit. Bonded
  share is what the router and the judge draw weigh; credit share (liquid + bonded) is the wealth.
  Under "keep", a class's bonded share only falls once its members run out of liquid to top up
  with, so its trend lags the credit share.

Ordering. A metric's ordering "holds" when good > mid > random per node, strictly (and mid >
lazy where there are lazy executors; random and lazy are not ranked against each other). The
overall verdict `holds` is the ordering of duel score (won + tie/2 per duel), mean Elo and credit
share per node; bonded share and router traffic share are reported beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import nacl.signing

from wwwserve_gateway.network import canaries
from wwwserve_gateway.network.genesis import DuelParams, LedgerParams
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.network.receipts import request_hash, sign_receipt, text_hash
from wwwserve_gateway.network.votes import duel_seed, judge_order, sign_vote
from wwwserve_gateway.plugins.ledger import fold as fold_module
from wwwserve_gateway.plugins.ledger.duels import CANARY_ENDPOINT, judge_weight
from wwwserve_gateway.plugins.ledger.fold import Balances
from wwwserve_gateway.plugins.ledger.ops import Operation, sign_op
from wwwserve_gateway.plugins.ledger.rules import MICRO, check_op
from wwwserve_gateway.plugins.routers.pos import StakeRouterSettings, quality_factor, weighted_order

MODEL = "sim-model"
ACCURACY = {"good": 0.9, "mid": 0.6, "random": 0.05, "lazy": 0.0}
ORDER = ("good", "mid", "random", "lazy")  # best first
DEFAULT_MIX = {"good": 1 / 3, "mid": 1 / 3, "random": 1 / 3}
WRONG = "I am not sure."  # a canary answer that is wrong for every canary kind
POLICIES = ("keep", "none", "all")


def default_canary_share(params: DuelParams | None = None) -> float:
    """The share of duels that are canaries under the genesis rates (1/6 by default)."""
    p = params or DuelParams()
    return p.canary_rate / (p.rate + p.canary_rate) if p.rate + p.canary_rate > 0 else 0.0


JudgeDraw = Callable[[bytes, Mapping[str, int], int], list[str]]


class _SharedDraw:
    """`judge_order`, computed once per duel for both its callers: the entry (to know whom to ask)
    and the fold (`fold.judge_order`, to know whose votes count). The function is pure; the result
    is reused only when the seed, k and the whole stake mapping are equal to the last call's, so
    what the fold sees is exactly what `judge_order` returns."""

    def __init__(self, draw: JudgeDraw) -> None:
        self.draw = draw
        self.last: tuple[bytes, int, dict[str, int], list[str]] | None = None
        self.calls = self.reused = 0

    def __call__(self, seed: bytes, stakes: Mapping[str, int], k: int) -> list[str]:
        self.calls += 1
        last = self.last
        if last is not None and last[0] == seed and last[1] == k and last[2] == stakes:
            self.reused += 1
            return list(last[3])
        order = self.draw(seed, stakes, k)
        self.last = (seed, k, dict(stakes), list(order))
        return order


@contextlib.contextmanager
def _shared_judge_draw(enabled: bool) -> Iterator[_SharedDraw]:
    """Within the block, the fold's `judge_order` is a `_SharedDraw` of the real one (restored
    after; not for concurrent runs in threads of one process)."""
    shared = _SharedDraw(judge_order)
    if not enabled:
        yield shared
        return
    original = fold_module.judge_order
    fold_module.judge_order = shared
    try:
        yield shared
    finally:
        fold_module.judge_order = original


def sim_identity(seed: int, index: int) -> NodeIdentity:
    return NodeIdentity(nacl.signing.SigningKey(hashlib.sha256(f"duel-sim:{seed}:{index}".encode()).digest()))


class _Chain:
    """A node's own chain of signed operations."""

    def __init__(self, identity: NodeIdentity) -> None:
        self.identity = identity
        self.seq = 0
        self.prev = ""

    def sign(self, kind: str, body: dict[str, Any], ts: float) -> Operation:
        op = sign_op(self.identity, self.seq + 1, self.prev, kind, body, ts)
        self.seq, self.prev = op.seq, op.hash
        return op


@dataclass
class _Node:
    index: int
    id: str
    cls: str
    colluder: bool
    chain: _Chain


@dataclass
class _Counts:
    steps: int = 0
    settled: int = 0
    canaries: int = 0
    canary_identical: int = 0  # both answers right: the same text, no duel (the entry drops it)
    withheld: int = 0  # cherry-picking entries that found no vote to their liking
    no_executor: int = 0
    one_right: int = 0  # non-canary duels with exactly one right answer
    one_right_decided_right: int = 0  # ... whose outcome was the right answer
    one_right_tied: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: {"A": 0, "B": 0, "tie": 0, "none": 0})


def _class_mix(mix: Mapping[str, float], n: int) -> list[str]:
    """Class labels for n nodes in the given proportions (largest remainders)."""
    total = sum(mix.values())
    raw = {c: n * w / total for c, w in mix.items() if w > 0}
    counts = {c: math.floor(v) for c, v in raw.items()}
    for c in sorted(raw, key=lambda c: raw[c] - counts[c], reverse=True)[: n - sum(counts.values())]:
        counts[c] += 1
    return [c for c in ORDER if c in counts for _ in range(counts[c])] + [
        c for c in counts if c not in ORDER for _ in range(counts[c])
    ]


class _Sim:
    """One simulated network: the nodes, the fold, and what the router and the judge draw read."""

    def __init__(
        self,
        n_nodes: int,
        *,
        mix: Mapping[str, float],
        collusion: float,
        canary_share: float,
        q: float,
        tie_prob: float,
        grant: int,
        bond: int,
        policy: str,
        collude_other: str,
        colluders_see_canaries: bool,
        cherry_pick: bool,
        lazy_sees_canaries: bool,
        accuracy: Mapping[str, float],
        dparams: DuelParams,
        seed: int,
    ) -> None:
        self.rng = random.Random(seed)
        self.router_rng = random.Random(seed + 1)
        self.q, self.tie_prob, self.bond, self.policy = q, tie_prob, bond, policy
        self.collude_other, self.colluders_see_canaries = collude_other, colluders_see_canaries
        self.cherry_pick, self.lazy_sees_canaries = cherry_pick, lazy_sees_canaries
        self.acc, self.dparams, self.share = accuracy, dparams, canary_share
        router = StakeRouterSettings()
        self.span, self.explore, self.newcomer_stake = (
            router.quality_span,
            router.explore,
            router.newcomer_stake,
        )
        self.counts = _Counts()
        self.draw: JudgeDraw = judge_order

        labels = _class_mix(mix, n_nodes)
        self.n_colluders = round(collusion * n_nodes)
        randoms = [i for i, c in enumerate(labels) if c == "random"]
        if self.n_colluders > len(randoms):
            raise ValueError(f"{self.n_colluders} colluders but only {len(randoms)} random-class nodes")
        in_coalition = set(randoms[: self.n_colluders])
        self.nodes = [
            _Node(i, ident.node_id, labels[i], i in in_coalition, _Chain(ident))
            for i, ident in enumerate(sim_identity(seed, i) for i in range(n_nodes))
        ]
        self.by_id = {node.id: node for node in self.nodes}
        self.coalition = [node.id for node in self.nodes if node.colluder]
        self.groups = [c for c in ORDER if c in labels] + [c for c in dict.fromkeys(labels) if c not in ORDER]
        self.members = {c: [node.id for node in self.nodes if node.cls == c] for c in self.groups}
        if self.coalition:
            self.members["coalition"] = self.coalition

        self.params = LedgerParams(allocations={node.id: grant for node in self.nodes}, duels=dparams)
        self.net = hashlib.sha256(f"duel-sim:{seed}".encode()).hexdigest()
        self.balances = Balances(self.params, self.net)
        self.record = self.balances._record  # the fold's [won, lost, tied] per executor, read only
        self.clock = 0.0
        for node in self.nodes:
            self.apply(node, "join", {"grant": grant})
        for node in self.nodes:
            if bond > 0:
                self.apply(node, "bond", {"amount": min(bond, grant)})
        self.bonded_micro: dict[str, int] = {}
        self.weights: dict[str, float] = {}
        for node in self.nodes:
            self.refresh(node.id)

    # -- the ledger --------------------------------------------------------------------------------
    def apply(self, node: _Node, kind: str, body: dict[str, Any], check: bool = True) -> None:
        """Sign `node`'s next operation and fold it (each operation sorts after the last: ts + 1)."""
        self.clock += 1.0
        op = node.chain.sign(kind, body, self.clock)
        if check:  # a duel is checked inside the fold (check_duel, which is what check_op runs for it)
            check_op(op, self.params, self.net)
        self.balances.apply(op)

    def refresh(self, node_id: str) -> None:
        """Re-read a node's bonded stake and rating from the fold."""
        bonded = self.balances.account(node_id).bonded
        self.bonded_micro[node_id] = round(bonded * MICRO)
        # The router's weight: advertised stake (all it has bonded) capped by bonded, x quality factor.
        self.weights[node_id] = bonded * quality_factor(self.balances.quality(node_id, MODEL), self.span)

    def top_up(self, node_id: str) -> None:
        if self.policy == "none":
            return
        account = self.balances.account(node_id)
        liquid = math.floor(account.liquid)
        amount = liquid if self.policy == "all" else min(math.ceil(self.bond - account.bonded), liquid)
        if amount >= 1:
            self.apply(self.by_id[node_id], "bond", {"amount": amount})

    # -- the router --------------------------------------------------------------------------------
    def route_pair(self, entry: str, first: str | None = None) -> tuple[str | None, str | None]:
        """The duel's executors as the router picks them: A = StakeRouter.candidates()[0] for the
        request (the entry excluded), B = the same for the second copy (A excluded too); `first`
        fixes A. Each pick tosses the router's explore coin; one `weighted_order` draw of two serves
        both picks (B's draw over the staked nodes but A is the next of the same Plackett-Luce
        order, the same distribution as a fresh draw, at half the cost)."""
        rng = self.router_rng
        staked = {n: w for n, w in self.weights.items() if w >= self.newcomer_stake and n != entry}
        newcomers = [n for n, w in self.weights.items() if w < self.newcomer_stake and n != entry]
        order = weighted_order(staked, rng, 2)

        def pick(taken: set[str]) -> str | None:
            fresh = [n for n in newcomers if n not in taken]
            ranked = [n for n in order if n not in taken]
            coin = rng.random() < self.explore  # tossed on every request, as the router does
            if not ranked:
                return rng.choice(fresh) if fresh else None
            return rng.choice(fresh) if fresh and coin else ranked[0]

        a = first if first is not None else pick(set())
        if a is None:
            return None, None
        return a, pick({a})

    # -- judges ------------------------------------------------------------------------------------
    def honest_vote(self, right: tuple[bool, bool]) -> str:
        if right[0] != right[1]:
            better = "A" if right[0] else "B"
            return better if self.rng.random() < self.q else ("B" if better == "A" else "A")
        return "tie" if self.rng.random() < self.tie_prob else self.rng.choice(("A", "B"))

    def colluder_vote(
        self, a: _Node, b: _Node, right: tuple[bool, bool], known: str | None, pick: str
    ) -> str:
        if known is not None and self.colluders_see_canaries:
            return known  # they recognise the canary and vote its known answer
        if a.colluder and b.colluder:
            return "tie"
        if a.colluder or b.colluder:
            return "A" if a.colluder else "B"
        if self.collude_other == "against" and right[0] != right[1]:
            return "B" if right[0] else "A"
        return pick  # the same side for every colluder of this duel

    # -- a step ------------------------------------------------------------------------------------
    def step(self) -> None:
        rng, counts = self.rng, self.counts
        counts.steps += 1
        entry = self.nodes[rng.randrange(len(self.nodes))]
        spec = canaries.make(rng) if self.share > 0 and rng.random() < self.share else None
        cheat = self.cherry_pick and entry.colluder and spec is None
        first = None
        if cheat:
            friends = [c for c in self.coalition if c != entry.id and self.weights[c] > 0]
            first = rng.choice(friends) if friends else None
        a_id, b_id = self.route_pair(entry.id, first)
        if a_id is None or b_id is None:
            counts.no_executor += 1
            return
        touched = self.duel(entry, self.by_id[a_id], self.by_id[b_id], spec, cheat)
        for node_id in touched or ():
            self.top_up(node_id)
            self.refresh(node_id)

    def correct(self, node: _Node, canary: bool) -> bool:
        if canary and self.lazy_sees_canaries and node.cls == "lazy":
            return True
        return self.rng.random() < self.acc[node.cls]

    def duel(
        self, entry: _Node, a: _Node, b: _Node, spec: dict[str, Any] | None, cheat: bool
    ) -> set[str] | None:
        """One duel as the entry runs it, folded; the nodes whose stake or rating it may have changed
        (None when no duel operation was written)."""
        rng, counts, net = self.rng, self.counts, self.net
        right = (self.correct(a, spec is not None), self.correct(b, spec is not None))
        if spec is not None:
            counts.canaries += 1
            if right[0] and right[1]:
                counts.canary_identical += 1  # the same text twice: the entry drops it
                return None
            texts = [canaries.reference(spec) if r else WRONG + "." * i for i, r in enumerate(right)]
            request_id = f"{rng.getrandbits(128):032x}"
            req_body = {"model": MODEL, "messages": canaries.messages(spec)}
            request = request_hash(request_id, CANARY_ENDPOINT, req_body)
            hashes = (text_hash(texts[0]), text_hash(texts[1]))
            known = None if right[0] == right[1] else ("A" if right[0] else "B")
        else:
            request = hashlib.sha256(f"app:{entry.id}:{rng.getrandbits(64)}".encode()).hexdigest()
            hashes = (
                hashlib.sha256(f"{request}:{a.id}".encode()).hexdigest(),
                hashlib.sha256(f"{request}:{b.id}".encode()).hexdigest(),
            )
            known = None
        receipts = [
            sign_receipt(
                x.chain.identity,
                net=net,
                entry=entry.id,
                request=request,
                response=hashlib.sha256(f"response:{request}:{x.id}".encode()).hexdigest(),
                model=MODEL,
                prompt_tokens=20,
                completion_tokens=40,
                started=1.0,
                finished=2.0,
                text=hashes[i],
                stake=self.bonded_micro[x.id] / MICRO,  # the executor commits what it has bonded
            )
            for i, x in enumerate((a, b))
        ]
        # The judges: the seeded stake draw over the other non-barred nodes, as the entry computes it.
        # (Nobody is barred here: the simulation writes no fraud proofs.)
        pool = dict(self.bonded_micro)
        for n in (entry.id, a.id, b.id):
            del pool[n]
        order = self.draw(duel_seed(receipts[0], receipts[1]), pool, 2 * self.dparams.judges)
        asked = order if cheat else order[: self.dparams.judges]
        pick = "A" if hashlib.sha256(request.encode()).digest()[0] & 1 else "B"
        votes = []
        for judge_id in asked:
            judge = self.by_id[judge_id]
            if judge.colluder:
                choice = self.colluder_vote(a, b, right, known, pick)
            else:
                choice = self.honest_vote(right)
            if cheat and choice != "A":
                continue  # the cherry-picking entry leaves out every vote that is not for its friend (A)
            flip = rng.random() < 0.5  # each judge is shown the answers in its own order
            shown = (hashes[1], hashes[0]) if flip else hashes
            shown_choice = {"A": "B", "B": "A"}.get(choice, choice) if flip else choice
            votes.append(
                sign_vote(
                    judge.chain.identity,
                    net=net,
                    entry=entry.id,
                    duel=request,
                    a=shown[0],
                    b=shown[1],
                    choice=shown_choice,
                )
            )
        if cheat and not votes:
            counts.withheld += 1
            return None
        body: dict[str, Any] = {"receipts": receipts, "votes": votes}
        if spec is not None:
            body["canary"] = {
                "spec": spec,
                "request": {"id": request_id, "endpoint": CANARY_ENDPOINT, "body": req_body},
                "texts": texts,
            }
        elif not votes:
            return None  # the entry writes no duel without votes
        before = tuple(self.record.get(a.id, (0, 0, 0)))
        self.apply(entry, "duel", body, check=False)
        after = tuple(self.record.get(a.id, (0, 0, 0)))
        outcome = "none"
        if after != before:
            outcome = ("A", "B", "tie")[next(i for i in range(3) if after[i] != before[i])]
        counts.settled += 1
        counts.outcomes[outcome] += 1
        if spec is None and right[0] != right[1]:
            counts.one_right += 1
            counts.one_right_decided_right += outcome == ("A" if right[0] else "B")
            counts.one_right_tied += outcome == "tie"
        return {a.id, b.id, *asked}

    # -- time series -------------------------------------------------------------------------------
    def new_series(self) -> dict[str, Any]:
        return {
            "duel": [],
            "bonded_share": {g: [] for g in self.members},
            "credit_share": {g: [] for g in self.members},
            "mean_elo": {g: [] for g in self.members},
            "judge_weight": {"honest": [], "colluders": []},
        }

    def sample(self, series: dict[str, Any], step: int) -> None:
        view = {node.id: self.balances.account(node.id) for node in self.nodes}
        total_bonded = sum(a.bonded for a in view.values()) or 1.0
        total_credit = sum(a.liquid + a.bonded + a.unbonding for a in view.values()) or 1.0
        series["duel"].append(step)
        for g, ids in self.members.items():
            bonded = sum(view[i].bonded for i in ids)
            credit = sum(view[i].liquid + view[i].bonded + view[i].unbonding for i in ids)
            series["bonded_share"][g].append(round(bonded / total_bonded, 5))
            series["credit_share"][g].append(round(credit / total_credit, 5))
            series["mean_elo"][g].append(
                round(sum(self.balances.quality(i, MODEL) for i in ids) / len(ids), 2)
            )
        weights = self.judge_weights()
        for key, ids in (
            ("honest", [n.id for n in self.nodes if not n.colluder]),
            ("colluders", self.coalition),
        ):
            series["judge_weight"][key].append(
                round(sum(weights[i] for i in ids) / len(ids), 4) if ids else None
            )

    def judge_weights(self) -> dict[str, float]:
        """Each node's judge weight as the fold gives it (`judge_weight` of its canary grades)."""
        graded = {n: v["judging"] for n, v in self.balances.duel_view().items() if "judging" in v}
        return {
            node.id: judge_weight(graded[node.id]["right"], graded[node.id]["graded"])
            if node.id in graded
            else judge_weight(0, 0)
            for node in self.nodes
        }


def run(
    n_nodes: int = 100,
    duels: int | None = None,
    *,
    mix: Mapping[str, float] | None = None,
    collusion: float = 0.0,
    canaries_on: bool = True,
    canary_share: float | None = None,
    q: float = 0.8,
    tie_prob: float = 0.5,
    grant: int = 200,
    bond: int = 100,
    policy: str = "keep",
    collude_other: str = "against",
    colluders_see_canaries: bool = False,
    cherry_pick: bool = False,
    lazy_sees_canaries: bool = False,
    accuracy: Mapping[str, float] | None = None,
    duel_params: Mapping[str, Any] | None = None,
    samples: int = 40,
    seed: int = 0,
    share_judge_draw: bool = True,
    progress: Any = None,
) -> dict[str, Any]:
    """Simulate `duels` duels (default 20 x n_nodes) among `n_nodes` nodes; the result dict.

    mix: class -> share of nodes (default 1/3 each of good, mid, random); collusion: the share of
    all nodes in the coalition (they are random-class executors; at most the random share);
    canary_share: the share of duels that are canaries when canaries_on (default from the genesis
    rates); q: an honest judge's chance of picking the right answer when exactly one is right;
    tie_prob: its chance of voting tie when both answers are equally right; grant/bond: each
    node's allocation and bond target (credits); policy: "keep" | "none" | "all" (see the module
    docstring); collude_other: "against" | "random", what colluders vote when no coalition
    executor is in the duel; colluders_see_canaries: colluders vote the known answer on canaries;
    cherry_pick: colluding entries duel a coalition executor against a router-drawn one, ask the
    whole 2 x judges window, and put only the votes for their executor in the operation
    (withholding the duel when there are none); lazy_sees_canaries: lazy executors answer canaries
    right; accuracy: overrides of each class's chance of a right answer; duel_params: overrides of
    the genesis DuelParams; samples: points of the time series; share_judge_draw: compute each
    duel's judge draw once for the entry and the fold (`_SharedDraw`; False: each computes it);
    progress: called as progress(done, total) now and then.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    if policy not in POLICIES:
        raise ValueError(f"policy is one of {POLICIES}")
    if collude_other not in ("against", "random"):
        raise ValueError("collude_other is 'against' or 'random'")
    dparams = DuelParams(**(duel_params or {}))
    share = (default_canary_share(dparams) if canary_share is None else canary_share) if canaries_on else 0.0
    n_duels = 20 * n_nodes if duels is None else duels
    acc = {**ACCURACY, **(accuracy or {})}
    sim = _Sim(
        n_nodes,
        mix=mix or DEFAULT_MIX,
        collusion=collusion,
        canary_share=share,
        q=q,
        tie_prob=tie_prob,
        grant=grant,
        bond=bond,
        policy=policy,
        collude_other=collude_other,
        colluders_see_canaries=colluders_see_canaries,
        cherry_pick=cherry_pick,
        lazy_sees_canaries=lazy_sees_canaries,
        accuracy=acc,
        dparams=dparams,
        seed=seed,
    )
    every = max(1, n_duels // max(1, samples))
    series = sim.new_series()
    sim.sample(series, 0)
    with _shared_judge_draw(share_judge_draw) as shared:
        if share_judge_draw:
            sim.draw = shared
        for step in range(1, n_duels + 1):
            sim.step()
            if step % every == 0 or step == n_duels:
                sim.sample(series, step)
            if progress is not None and (step % 100 == 0 or step == n_duels):
                progress(step, n_duels)
    config = {
        "n_nodes": n_nodes,
        "duels": n_duels,
        "mix": dict(mix or DEFAULT_MIX),
        "collusion": collusion,
        "colluders": sim.n_colluders,
        "canaries": canaries_on,
        "canary_share": round(share, 4),
        "q": q,
        "tie_prob": tie_prob,
        "grant": grant,
        "bond": bond,
        "policy": policy,
        "collude_other": collude_other,
        "colluders_see_canaries": colluders_see_canaries,
        "cherry_pick": cherry_pick,
        "lazy_sees_canaries": lazy_sees_canaries,
        "accuracy": {c: acc[c] for c in sim.groups if c in acc},
        "duel_params": dparams.model_dump(),
        "router": {"quality_span": sim.span, "explore": sim.explore, "newcomer_stake": sim.newcomer_stake},
        "seed": seed,
    }
    timing = {
        "seconds": round(time.perf_counter() - started, 2),
        "cpu_seconds": round(time.process_time() - cpu_started, 2),
        "judge_draws": shared.calls,
        "judge_draws_reused": shared.reused,  # the fold's draw taken from the entry's, unchanged
    }
    return _result(sim, config, series, timing)


def _ordered(values: Mapping[str, float]) -> bool:
    """good > mid > each bad class (random, lazy), strictly, over the classes present. Random
    (p = 0.05) and lazy (p = 0) are not ranked against each other: both are junk."""
    top = [values[c] for c in ("good", "mid") if c in values]
    bottom = [values[c] for c in ORDER[2:] if c in values]
    return (
        all(x > y for x, y in itertools.pairwise(top)) and all(top[-1] > y for y in bottom) if top else True
    )


def _result(
    sim: _Sim, config: dict[str, Any], series: dict[str, Any], timing: dict[str, Any]
) -> dict[str, Any]:
    nodes, members, balances, weights, counts = sim.nodes, sim.members, sim.balances, sim.weights, sim.counts
    view = balances.duel_view()
    accounts = {node.id: balances.account(node.id) for node in nodes}
    total_bonded = sum(a.bonded for a in accounts.values()) or 1.0
    total_credit = sum(a.liquid + a.bonded + a.unbonding for a in accounts.values()) or 1.0
    total_weight = sum(weights.values()) or 1.0
    n = len(nodes)

    judge_w = sim.judge_weights()
    weight_of = judge_w.__getitem__

    classes: dict[str, Any] = {}
    for group, ids in members.items():
        won = lost = tied = 0
        for i in ids:
            d = view.get(i, {}).get("duels", {})
            won, lost, tied = won + d.get("won", 0), lost + d.get("lost", 0), tied + d.get("tied", 0)
        played = won + lost + tied
        bonded = sum(accounts[i].bonded for i in ids) / total_bonded
        credit = (
            sum(accounts[i].liquid + accounts[i].bonded + accounts[i].unbonding for i in ids) / total_credit
        )
        traffic = sum(weights[i] for i in ids) / total_weight
        fraction = len(ids) / n
        classes[group] = {
            "nodes": len(ids),
            "duels": played,
            "duels_per_node": round(played / len(ids), 2),
            "win_rate": round(won / played, 4) if played else None,
            "tie_rate": round(tied / played, 4) if played else None,
            "score": round((won + tied / 2) / played, 4) if played else None,
            "bonded_share": round(bonded, 4),
            "credit_share": round(credit, 4),
            "traffic_share": round(traffic, 4),  # share of the router's weight: expected share of requests
            "bonded_per_node": round(bonded / fraction, 4),  # 1.0 = an equal share
            "credit_per_node": round(credit / fraction, 4),
            "traffic_per_node": round(traffic / fraction, 4),
            "mean_elo": round(sum(balances.quality(i, MODEL) for i in ids) / len(ids), 1),
            "judge_weight": round(sum(weight_of(i) for i in ids) / len(ids), 4),
        }
    colluders = members.get("coalition", [])
    honest = [node.id for node in nodes if not node.colluder]
    judges = {
        "honest_weight": round(sum(weight_of(i) for i in honest) / len(honest), 4) if honest else None,
        "colluder_weight": round(sum(weight_of(i) for i in colluders) / len(colluders), 4)
        if colluders
        else None,
    }
    exec_classes = {c: v for c, v in classes.items() if c in ORDER}

    def metric(key: str) -> dict[str, float]:
        return {c: v[key] for c, v in exec_classes.items() if v[key] is not None}

    ordering = {
        "score": _ordered(metric("score")),
        "win_rate": _ordered(metric("win_rate")),
        "mean_elo": _ordered(metric("mean_elo")),
        "credit": _ordered(metric("credit_per_node")),
        "bonded": _ordered(metric("bonded_per_node")),
        "traffic": _ordered(metric("traffic_per_node")),
    }
    ordering["holds"] = ordering["score"] and ordering["mean_elo"] and ordering["credit"]
    c = counts
    return {
        "config": config,
        **timing,
        "ms_per_duel": round(1000 * timing["seconds"] / max(1, c.steps), 3),
        "duels": {
            "steps": c.steps,
            "settled": c.settled,
            "canaries": c.canaries,
            "canary_identical": c.canary_identical,
            "withheld": c.withheld,
            "no_executor": c.no_executor,
            "outcomes": dict(c.outcomes),
            # Of the app (non-canary) duels where exactly one answer was right: how judging decided.
            "one_right": c.one_right,
            "one_right_decided_right": round(c.one_right_decided_right / c.one_right, 4)
            if c.one_right
            else None,
            "one_right_tied": round(c.one_right_tied / c.one_right, 4) if c.one_right else None,
        },
        "classes": classes,
        "judges": judges,
        "ordering": ordering,
        "total_credits": round(total_credit, 6),
        "series": series,
    }


# -- the scenarios ------------------------------------------------------------------------------------
LAZY_MIX = {"good": 0.3, "mid": 0.3, "random": 0.2, "lazy": 0.2}
COLOURS = {
    "good": "tab:green",
    "mid": "tab:orange",
    "random": "tab:red",
    "lazy": "tab:purple",
    "coalition": "black",
}


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    n: int
    duels: int
    seeds: tuple[int, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


def scenarios(quick: bool = False) -> list[Scenario]:
    """The runs of `main`: the collusion x canary grid at N = 100 (several seeds) and N = 1,000,
    lazy executors, and the attacks the rules leave open."""
    out: list[Scenario] = []
    if quick:
        grid = [(100, 1000, (0,)), (1000, 300, (0,))]
        collusions, n1000_collusions = (0.0, 0.1, 0.3), (0.3,)
    else:
        grid = [(100, 2000, (0, 1, 2)), (1000, 3000, (0,))]
        collusions = n1000_collusions = (0.0, 0.1, 0.3)
    for n, duels, seeds in grid:
        for c in collusions if n == 100 else n1000_collusions:
            for can in (True, False):
                if quick and n == 1000 and not can:
                    continue
                out.append(
                    Scenario(
                        f"n{n}-c{round(c * 100)}-{'canary' if can else 'nocanary'}",
                        f"{round(c * 100)}% colluding judges, canaries {'on' if can else 'off'}",
                        n,
                        duels,
                        seeds,
                        {"collusion": c, "canaries_on": can},
                    )
                )
    n, duels, seeds = grid[0]
    one = seeds[:1]
    out.append(
        Scenario("n100-lazy", "20% lazy executors (p = 0), canaries on", n, duels, seeds, {"mix": LAZY_MIX})
    )
    if quick:
        return out
    out += [
        Scenario(
            "n1000-lazy", "20% lazy executors (p = 0), canaries on", 1000, grid[1][1], (0,), {"mix": LAZY_MIX}
        ),
        Scenario(
            "n1000-c30-canary-long",
            "30% colluding judges, canaries on, 6 duels per node",
            1000,
            6000,
            (0,),
            {"collusion": 0.3, "canaries_on": True},
        ),
        Scenario(
            "n100-lazy-sees-canaries",
            "20% lazy executors that answer canaries right (canaries.recognise)",
            n,
            duels,
            one,
            {"mix": LAZY_MIX, "lazy_sees_canaries": True},
        ),
        Scenario(
            "n100-c30-colluders-see-canaries",
            "30% colluding judges that recognise canaries and vote them right",
            n,
            duels,
            one,
            {"collusion": 0.3, "colluders_see_canaries": True},
        ),
        Scenario(
            "n100-c10-cherry-pick",
            "10% colluders whose entries keep only the votes for their executor",
            n,
            duels,
            one,
            {"collusion": 0.1, "cherry_pick": True},
        ),
        Scenario(
            "n100-c30-cherry-pick",
            "30% colluders whose entries keep only the votes for their executor",
            n,
            duels,
            one,
            {"collusion": 0.3, "cherry_pick": True},
        ),
        Scenario(
            "n100-c30-canary-random-votes",
            "30% colluding judges voting a coordinated coin outside their own duels, canaries on",
            n,
            duels,
            one,
            {"collusion": 0.3, "collude_other": "random"},
        ),
        Scenario(
            "n100-c30-canary-2pct",
            "30% colluding judges, canaries 2% of duels (not 1/6)",
            n,
            duels,
            one,
            {"collusion": 0.3, "canary_share": 0.02},
        ),
        Scenario(
            "n100-c30-canary-grant1000",
            "30% colluding judges, canaries on, 1000 credits each (900 in reserve)",
            n,
            duels,
            one,
            {"collusion": 0.3, "grant": 1000},
        ),
    ]
    return out


def _run_one(args: tuple[Scenario, int]) -> dict[str, Any]:
    scenario, seed = args
    return run(scenario.n, scenario.duels, seed=seed, **scenario.kwargs)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Across seeds: how often each ordering held, and the mean of the per-class figures."""
    keys = (
        "score",
        "win_rate",
        "credit_share",
        "bonded_share",
        "credit_per_node",
        "bonded_per_node",
        "mean_elo",
    )
    classes = runs[0]["classes"]
    mean = {
        g: {k: round(sum(r["classes"][g][k] for r in runs) / len(runs), 4) for k in keys} for g in classes
    }
    held = {k: sum(r["ordering"][k] for r in runs) for k in runs[0]["ordering"]}
    return {"seeds": len(runs), "held": held, "mean": mean}


def _fmt(values: Iterable[Any], digits: int = 2) -> str:
    return "/".join(f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in values)


def table(results: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    t = Table(
        title="Duel-and-judge on the real fold: per class good/mid/random(/lazy); per node 1.00 = equal share",
        show_lines=False,
    )
    for col in (
        "scenario",
        "N",
        "duels",
        "score",
        "credit/node",
        "bonded share",
        "mean Elo",
        "judge w h/c",
        "1-right ok",
        "ordering",
    ):
        t.add_column(col, justify="left" if col == "scenario" else "right", no_wrap=True)
    for entry in results:
        r = entry["runs"][0]
        cls = {g: v for g, v in r["classes"].items() if g in ORDER}
        jw = r["judges"]
        held = entry["summary"]["held"]["holds"]
        seeds = entry["summary"]["seeds"]
        verdict = ("holds" if held == seeds else "BREAKS" if held == 0 else "mixed") + f" {held}/{seeds}"
        broken = [k for k in ("score", "mean_elo", "credit") if not r["ordering"][k]]
        if broken:
            verdict += " (" + ",".join(broken) + ")"
        t.add_row(
            entry["name"],
            str(r["config"]["n_nodes"]),
            str(r["config"]["duels"]),
            _fmt(v["score"] for v in cls.values()),
            _fmt(v["credit_per_node"] for v in cls.values()),
            _fmt(v["bonded_share"] for v in cls.values()),
            _fmt((v["mean_elo"] for v in cls.values()), 0),
            _fmt((jw["honest_weight"], jw["colluder_weight"] if jw["colluder_weight"] is not None else "-")),
            f"{r['duels']['one_right_decided_right']:.2f}",
            verdict,
        )
    return t


def plot(results: list[dict[str, Any]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(results) + 2
    cols = 4
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.1 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, entry in zip(flat, results, strict=False):
        series = entry["runs"][0]["series"]
        per_node = [d / entry["n"] for d in series["duel"]]
        for g, values in series["bonded_share"].items():
            ax.plot(per_node, values, color=COLOURS.get(g, "grey"), lw=1.6)
            ax.plot(per_node, series["credit_share"][g], color=COLOURS.get(g, "grey"), lw=1, ls="--")
        ax.set_title(entry["name"], fontsize=8.5)
        ax.set_xlabel("duels per node", fontsize=8)
        ax.set_ylabel("class share", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.set_ylim(bottom=0)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, lw=1.6, label=g) for g, c in COLOURS.items()] + [
        Line2D([], [], color="grey", lw=1.6, label="bonded share"),
        Line2D([], [], color="grey", lw=1, ls="--", label="credit share"),
    ]
    flat[0].legend(handles=handles, fontsize=6, loc="lower left", ncol=2)
    # Duel score per class, per scenario.
    ax = flat[len(results)]
    groups = [g for g in ORDER if any(g in e["runs"][0]["classes"] for e in results)]
    width = 0.8 / len(groups)
    for k, g in enumerate(groups):
        xs = [i + (k - (len(groups) - 1) / 2) * width for i in range(len(results))]
        ys = [e["runs"][0]["classes"].get(g, {}).get("score") or 0 for e in results]
        ax.bar(xs, ys, width, color=COLOURS[g], label=g)
    ax.axhline(0.5, color="grey", lw=0.6)
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels([e["name"] for e in results], rotation=90, fontsize=5.5)
    ax.set_title("duel score per class (won + tie/2)", fontsize=8.5)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)
    # Judge weights over time: colluders (solid) and honest judges (dotted).
    ax = flat[len(results) + 1]
    for entry in results:
        series = entry["runs"][0]["series"]
        weights = series["judge_weight"]
        if (
            entry["kwargs"].get("canaries_on", True)
            and weights["colluders"]
            and weights["colluders"][0] is not None
        ):
            per_node = [d / entry["n"] for d in series["duel"]]
            (line,) = ax.plot(per_node, weights["colluders"], lw=1.2, label=entry["name"])
            ax.plot(per_node, weights["honest"], lw=0.8, ls=":", color=line.get_color())
    ax.set_title("judge weight: colluders (solid), honest (dotted)", fontsize=8.5)
    ax.set_xlabel("duels per node", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=5.5)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.suptitle(
        "Duel-and-judge on the real ledger fold: class shares over time, scores, judge weights", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import os
    import platform
    from concurrent.futures import ProcessPoolExecutor
    from pathlib import Path

    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="N = 100 and a short N = 1,000 run (about a minute)"
    )
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and the PNG")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    args = parser.parse_args(argv)
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = scenarios(args.quick)
    work = [(s, seed) for s in plan for seed in s.seeds]
    started = time.perf_counter()
    console.print(f"{len(plan)} scenarios, {len(work)} runs, {args.jobs} job(s)")
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            for (s, seed), result in zip(work, pool.map(_run_one, work), strict=True):
                done[(s.name, seed)] = result
                console.print(f"  {s.name} seed {seed}: {result['seconds']} s")
    else:
        for s, seed in work:
            result = _run_one((s, seed))
            done[(s.name, seed)] = result
            console.print(
                f"  {s.name} seed {seed}: {result['seconds']} s ({result['ms_per_duel']} ms a duel)"
            )
    results = []
    for s in plan:
        runs = [done[(s.name, seed)] for seed in s.seeds]
        results.append(
            {
                "name": s.name,
                "about": s.about,
                "n": s.n,
                "duels": s.duels,
                "kwargs": s.kwargs,
                "summary": _summary(runs),
                "runs": runs,
            }
        )
    elapsed = time.perf_counter() - started
    report = {
        "what": "duel-and-judge incentive simulated on the real ledger fold (simulation/duels.py)",
        "quick": args.quick,
        "seconds": round(elapsed, 1),
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "load": os.getloadavg(),
        },
        "target": {
            "claim": "with canaries, 30% colluding judges still leave the ordering good > mid > random",
            "scenarios": {
                e["name"]: e["summary"]["held"]["holds"] == e["summary"]["seeds"]
                for e in results
                if "-c30-canary" in e["name"] and e["kwargs"].keys() <= {"collusion", "canaries_on"}
            },
        },
        "scenarios": results,
    }
    (out / "duel_simulation.json").write_text(json.dumps(report, indent=1))
    plot(results, out / "duel_simulation.png")
    console.print(table(results))
    console.print(
        "score: won + tie/2 per duel played; credit/node: class credit share / class node share; "
        "judge w h/c: mean judge weight of honest judges / colluders; 1-right ok: share of app duels "
        "with exactly one right answer decided for it; ordering: good > mid > random (and lazy) on score, "
        "Elo and credit per node (seeds where it held)."
    )
    for name, ok in report["target"]["scenarios"].items():
        console.print(f"target ({name}): {'holds' if ok else 'BREAKS'}")
    console.print(
        f"wrote {out / 'duel_simulation.json'} and {out / 'duel_simulation.png'} in {elapsed:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
