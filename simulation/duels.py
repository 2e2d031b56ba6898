"""Duel-and-judge at 100 and 1,000 nodes, settled by the ledger's own fold: where quality wins.

    python simulation/duels.py [--quick] [--out DIR] [--jobs N]
    python benchmarks/duel_simulation.py [--quick] [--out DIR] [--jobs N]   (the same study)

`run(...)` simulates one network and returns a result dict; `main()` runs issue 11's study: N = 100
(3 seeds) and 1,000 (1 seed); 0, 10, 30 and 45% colluding judges (and 60% at N = 100), canaries on
and off; 20% lazy executors; entries that cherry-pick votes (10%, 30%); and attacks the rules leave
open (lazy executors or colluders that recognise canaries, coin-flip colluders, rare canaries).
`--quick`: N = 100, 1,000 duels, one seed, no attacks (about a minute). It prints a table per
scenario and the targets (PASS/MISS), and writes duel_simulation.json and duel_simulation.png to
--out (default benchmarks/results/): a summary grid of where the ordering holds, the good class's
credit share and duel score over time, and each scenario's classes over time. Past a third of the
nodes, the coalition (random-class executors) is the random class: `collusion_mix`.

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
        self.window_start: dict[str, tuple[int, int, int]] = {}  # per class: won, tied, played
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
            # Duel score (won + tie/2 per duel played) within each sampling window; None: no duel.
            "score": {g: [] for g in self.members},
            "judge_weight": {"honest": [], "colluders": []},
        }

    def sample(self, series: dict[str, Any], step: int) -> None:
        view = {node.id: self.balances.account(node.id) for node in self.nodes}
        total_bonded = sum(a.bonded for a in view.values()) or 1.0
        total_credit = sum(a.liquid + a.bonded + a.unbonding for a in view.values()) or 1.0
        series["duel"].append(step)
        record = self.class_record()
        for g, ids in self.members.items():
            bonded = sum(view[i].bonded for i in ids)
            credit = sum(view[i].liquid + view[i].bonded + view[i].unbonding for i in ids)
            series["bonded_share"][g].append(round(bonded / total_bonded, 5))
            series["credit_share"][g].append(round(credit / total_credit, 5))
            series["mean_elo"][g].append(
                round(sum(self.balances.quality(i, MODEL) for i in ids) / len(ids), 2)
            )
            won, tied, played = record[g]
            last = self.window_start.get(g, (0, 0, 0))
            self.window_start[g] = (won, tied, played)
            window = played - last[2]
            series["score"][g].append(
                round((won - last[0] + (tied - last[1]) / 2) / window, 4) if window else None
            )
        weights = self.judge_weights()
        for key, ids in (
            ("honest", [n.id for n in self.nodes if not n.colluder]),
            ("colluders", self.coalition),
        ):
            series["judge_weight"][key].append(
                round(sum(weights[i] for i in ids) / len(ids), 4) if ids else None
            )

    def class_record(self) -> dict[str, tuple[int, int, int]]:
        """Per class: duels won, tied and played so far (the fold's record)."""
        out = {}
        for g, ids in self.members.items():
            won = tied = played = 0
            for i in ids:
                w, lost, t = self.record.get(i, (0, 0, 0))
                won, tied, played = won + w, tied + t, played + w + lost + t
            out[g] = (won, tied, played)
        return out

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
    late_from = n_duels - n_duels // 4  # the last quarter of the duels: where the run has got to
    late_start: dict[str, tuple[int, int, int]] = sim.class_record() if late_from == 0 else {}
    with _shared_judge_draw(share_judge_draw) as shared:
        if share_judge_draw:
            sim.draw = shared
        for step in range(1, n_duels + 1):
            sim.step()
            if step == late_from:
                late_start = sim.class_record()
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
    return _result(sim, config, series, timing, late_start)


def _ordered(values: Mapping[str, float]) -> bool:
    """good > mid > each bad class (random, lazy), strictly, over the classes present. Random
    (p = 0.05) and lazy (p = 0) are not ranked against each other: both are junk."""
    top = [values[c] for c in ("good", "mid") if c in values]
    bottom = [values[c] for c in ORDER[2:] if c in values]
    return (
        all(x > y for x, y in itertools.pairwise(top)) and all(top[-1] > y for y in bottom) if top else True
    )


def _result(
    sim: _Sim,
    config: dict[str, Any],
    series: dict[str, Any],
    timing: dict[str, Any],
    late_start: Mapping[str, tuple[int, int, int]],
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

    end = sim.class_record()
    classes: dict[str, Any] = {}
    for group, ids in members.items():
        late = [x - y for x, y in zip(end[group], late_start.get(group, (0, 0, 0)), strict=True)]
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
            # the same over the last quarter of the duels only
            "late_score": round((late[0] + late[1] / 2) / late[2], 4) if late[2] else None,
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
        "late_score": _ordered(metric("late_score")),
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
        "cpu_ms_per_duel": round(1000 * timing["cpu_seconds"] / max(1, c.steps), 3),
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


# -- the study: scenarios, targets, table, figure ----------------------------------------------------
LAZY_MIX = {"good": 0.3, "mid": 0.3, "random": 0.2, "lazy": 0.2}
COLOURS = {
    "good": "tab:green",
    "mid": "tab:orange",
    "random": "tab:red",
    "lazy": "tab:purple",
    "coalition": "black",
}
GRID_COLLUSIONS = (0.0, 0.1, 0.3, 0.45)  # the 10% and 30%, and a point past the break
TARGET_COLLUSION = 0.3
FULL = {"n100": (2000, (0, 1, 2)), "n1000": (4000, (0,))}  # duels, seeds per N
QUICK = {"n100": (1000, (0,))}
PAST = 0.6  # N = 100 only (full run): further past the break


def collusion_mix(collusion: float) -> dict[str, float]:
    """The class mix for a coalition of `collusion` of the nodes: a third each of good, mid and
    random, and past a third (colluders are random-class executors) random = collusion, the rest
    split evenly between good and mid. Per-node figures (credit/node) stay comparable."""
    r = max(1 / 3, collusion)
    return {"good": (1 - r) / 2, "mid": (1 - r) / 2, "random": r}


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    n: int
    duels: int
    seeds: tuple[int, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    row: str = ""  # the summary grid's row and column (the figure's heat map)
    col: str = ""
    group: str = "other"  # "grid": the collusion x canaries grid


def _col(n: int, canaries_on: bool) -> str:
    return f"N={n:,} canaries {'on' if canaries_on else 'off'}"


def scenarios(quick: bool = False) -> list[Scenario]:
    """The study: colluding judges (GRID_COLLUSIONS) x canaries on/off at N = 100 and 1,000 (quick:
    N = 100 only, one seed), 20% lazy executors, cherry-picking entries (10%, 30%), and (full only)
    the attacks the rules leave open."""
    sizes = QUICK if quick else FULL
    out: list[Scenario] = []
    for key, (duels, seeds) in sizes.items():
        n = int(key[1:])
        for c in GRID_COLLUSIONS + ((PAST,) if n == 100 and not quick else ()):
            for can in (True, False):
                pct = round(c * 100)
                out.append(
                    Scenario(
                        f"{key}-c{pct}-{'canary' if can else 'nocanary'}",
                        f"{pct}% colluding judges, canaries {'on' if can else 'off'}",
                        n,
                        duels,
                        seeds,
                        {"collusion": c, "canaries_on": can, "mix": collusion_mix(c)},
                        f"{pct}% colluders",
                        _col(n, can),
                        "grid",
                    )
                )
    duels, seeds = sizes["n100"]
    for can in (True,) if quick else (True, False):
        out.append(
            Scenario(
                f"n100-lazy-{'canary' if can else 'nocanary'}",
                f"20% lazy executors (p = 0), canaries {'on' if can else 'off'}",
                100,
                duels,
                seeds,
                {"mix": LAZY_MIX, "canaries_on": can},
                "20% lazy executors",
                _col(100, can),
            )
        )
    if not quick:
        d1000, s1000 = sizes["n1000"]
        out.append(
            Scenario(
                "n1000-lazy-canary",
                "20% lazy executors (p = 0), canaries on",
                1000,
                d1000,
                s1000,
                {"mix": LAZY_MIX},
                "20% lazy executors",
                _col(1000, True),
            )
        )
    for c in (0.1, 0.3):
        pct = round(c * 100)
        out.append(
            Scenario(
                f"n100-c{pct}-cherry-pick",
                f"{pct}% colluders whose entries keep only the votes for their executor, canaries on",
                100,
                duels,
                seeds,
                {"collusion": c, "cherry_pick": True},
                f"{pct}% cherry-picking entries",
                _col(100, True),
            )
        )
    if quick:
        return out
    one = seeds[:1]
    attacks = [
        ("n100-lazy-sees-canaries", "20% lazy executors that answer canaries right", "lazy, see canaries",
         {"mix": LAZY_MIX, "lazy_sees_canaries": True}),
        ("n100-c30-colluders-see-canaries", "30% colluding judges that recognise canaries and vote them right",
         "30% colluders, see canaries", {"collusion": 0.3, "colluders_see_canaries": True}),
        ("n100-c30-coin-votes", "30% colluders voting a coordinated coin outside their own duels",
         "30% colluders, coin votes", {"collusion": 0.3, "collude_other": "random"}),
        ("n100-c30-canary-2pct", "30% colluding judges, canaries 2% of duels (not 1/6)",
         "30% colluders, canaries 2%", {"collusion": 0.3, "canary_share": 0.02}),
    ]  # fmt: skip
    for name, about, row, kwargs in attacks:
        out.append(Scenario(name, about, 100, duels, one, kwargs, row, _col(100, True)))
    return out


def _run_one(args: tuple[Scenario, int]) -> dict[str, Any]:
    scenario, seed = args
    return run(scenario.n, scenario.duels, seed=seed, **scenario.kwargs)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Across seeds: how often each ordering held, the mean of the per-class figures, the smallest
    score gap of the ordering (good - mid, mid - each bad class) and the CPU time per duel."""
    keys = (
        "score",
        "late_score",
        "win_rate",
        "credit_share",
        "bonded_share",
        "credit_per_node",
        "bonded_per_node",
        "mean_elo",
    )
    classes = runs[0]["classes"]
    mean = {
        g: {k: round(sum(r["classes"][g][k] or 0 for r in runs) / len(runs), 4) for k in keys}
        for g in classes
    }
    held = {k: sum(r["ordering"][k] for r in runs) for k in runs[0]["ordering"]}
    gaps = []
    for r in runs:
        score = {g: v["score"] for g, v in r["classes"].items() if g in ORDER and v["score"] is not None}
        bottom = [score[g] for g in ORDER[2:] if g in score]
        gaps.append(min(score["good"] - score["mid"], *(score["mid"] - b for b in bottom)))
    one_right = [r["duels"]["one_right_decided_right"] for r in runs if r["duels"]["one_right_decided_right"]]
    return {
        "seeds": len(runs),
        "held": held,
        "verdict": "holds" if held["holds"] == len(runs) else "breaks" if held["holds"] == 0 else "mixed",
        "min_score_gap": round(min(gaps), 4),
        "one_right_decided_right": round(sum(one_right) / len(one_right), 4) if one_right else None,
        "cpu_ms_per_duel": round(sum(r["cpu_ms_per_duel"] for r in runs) / len(runs), 3),
        "wall_ms_per_duel": round(sum(r["ms_per_duel"] for r in runs) / len(runs), 3),
        "mean": mean,
    }


def _fmt(values: Iterable[Any], digits: int = 2) -> str:
    return "/".join(f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in values)


def _exec_classes(entry: dict[str, Any]) -> list[str]:
    return [g for g in ORDER if g in entry["summary"]["mean"]]


def break_points(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per grid column (N, canaries): the largest collusion up to which the ordering held on every
    seed, and the first collusion where it did not (None: it held across the grid)."""
    out: dict[str, Any] = {}
    for col in dict.fromkeys(e["col"] for e in results if e["group"] == "grid"):
        row = sorted(
            (e["kwargs"]["collusion"], e["summary"]["verdict"])
            for e in results
            if e["group"] == "grid" and e["col"] == col
        )
        first_miss = next((c for c, v in row if v != "holds"), None)
        holds_to = max((c for c, v in row if first_miss is None or c < first_miss), default=None)
        out[col] = {
            "holds_up_to": holds_to,
            "first_break": first_miss,
            "verdicts": {str(c): v for c, v in row},
        }
    return out


def targets(results: list[dict[str, Any]], quick: bool) -> list[dict[str, Any]]:
    """The issue's target (with canaries, 30% colluding judges leave the ordering intact), at each N,
    and the baseline it is measured against (honest judges: the ordering holds)."""
    by_name = {e["name"]: e for e in results}
    out = []
    for n in (100, 1000):
        for c, what in ((TARGET_COLLUSION, "with canaries, 30% colluding judges"), (0.0, "honest judges")):
            name = f"n{n}-c{round(c * 100)}-canary"
            e = by_name.get(name)
            if e is None:
                out.append(
                    {
                        "target": f"N={n:,}: {what}: ordering good > mid > random",
                        "scenario": name,
                        "value": "not run (--quick)" if quick else "not run",
                        "limit": "every seed",
                        "result": None,
                        "note": "",
                    }
                )
                continue
            s = e["summary"]
            m = s["mean"]
            out.append(
                {
                    "target": f"N={n:,}: {what}: ordering good > mid > random",
                    "scenario": name,
                    "value": f"{s['held']['holds']}/{s['seeds']} seeds",
                    "limit": "every seed",
                    "result": s["held"]["holds"] == s["seeds"],
                    "note": (
                        f"score {_fmt(m[g]['score'] for g in _exec_classes(e))}, "
                        f"credit/node {_fmt(m[g]['credit_per_node'] for g in _exec_classes(e))}, "
                        f"min score gap {s['min_score_gap']:+.3f}"
                    ),
                }
            )
    return out


def _verdict_text(ok: bool | None) -> str:
    return "[green]PASS[/]" if ok else "[dim]-[/]" if ok is None else "[red]MISS[/]"


def table(results: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    t = Table(
        title="Duel-and-judge on the real fold: per class good/mid/random(/lazy), mean over seeds; "
        "per node 1.00 = an equal share",
    )
    for col in (
        "scenario",
        "N",
        "duels x seeds",
        "score",
        "late score",
        "credit/node",
        "mean Elo",
        "judge w h/c",
        "1-right ok",
        "cpu ms/duel",
        "ordering",
    ):
        t.add_column(col, justify="left" if col in ("scenario", "ordering") else "right", no_wrap=True)
    for e in results:
        s, m = e["summary"], e["summary"]["mean"]
        groups = _exec_classes(e)
        jw = e["runs"][0]["judges"]
        verdict = {"holds": "[green]holds[/]", "breaks": "[red]BREAKS[/]", "mixed": "[yellow]mixed[/]"}[
            s["verdict"]
        ] + f" {s['held']['holds']}/{s['seeds']}"
        broken = [k for k in ("score", "mean_elo", "credit") if s["held"][k] < s["seeds"]]
        if broken:
            verdict += " (" + ",".join(broken) + ")"
        t.add_row(
            e["name"],
            f"{e['n']:,}",
            f"{e['duels']:,} x {s['seeds']}",
            _fmt(m[g]["score"] for g in groups),
            _fmt(m[g]["late_score"] for g in groups)
            + ("" if s["held"]["late_score"] == s["seeds"] else " [red]x[/]"),
            _fmt(m[g]["credit_per_node"] for g in groups),
            _fmt((m[g]["mean_elo"] for g in groups), 0),
            _fmt((jw["honest_weight"], jw["colluder_weight"] if jw["colluder_weight"] is not None else "-")),
            f"{s['one_right_decided_right']:.2f}" if s["one_right_decided_right"] is not None else "-",
            f"{s['cpu_ms_per_duel']:.1f}",
            verdict,
        )
    return t


def targets_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    t = Table(title="Targets (issue 11)")
    for col in ("target", "value", "limit", "result", "note"):
        t.add_column(col, no_wrap=col != "note")
    for row in rows:
        t.add_row(row["target"], row["value"], row["limit"], _verdict_text(row["result"]), row["note"])
    return t


def _smooth(values: list[float | None], width: int = 5) -> list[float | None]:
    """A trailing moving average over the last `width` windows with a value (None before any)."""
    out: list[float | None] = []
    seen: list[float] = []
    for v in values:
        if v is not None:
            seen.append(v)
        recent = seen[-width:]
        out.append(sum(recent) / len(recent) if recent else None)
    return out


def _summary_grid(ax: Any, results: list[dict[str, Any]]) -> None:
    """Rows: collusion levels, lazy executors, cherry-picking and attacks; columns: N x canaries.
    Green: the ordering held on every seed; red: on none; amber: some. The cell text: seeds held,
    credit per node good/mid/bad."""
    import matplotlib.colors as mcolors

    rows = list(dict.fromkeys(e["row"] for e in results))
    cols = list(dict.fromkeys(e["col"] for e in results if e["group"] == "grid")) or list(
        dict.fromkeys(e["col"] for e in results)
    )
    for e in results:
        if e["col"] not in cols:
            cols.append(e["col"])
    colour = {"holds": "#7fc97f", "breaks": "#f0027f", "mixed": "#fdc086"}
    ax.set_xlim(0, len(cols))
    ax.set_ylim(len(rows), 0)
    for e in results:
        x, y = cols.index(e["col"]), rows.index(e["row"])
        s = e["summary"]
        ax.add_patch(
            __import__("matplotlib.patches", fromlist=["Rectangle"]).Rectangle(
                (x, y), 1, 1, color=mcolors.to_rgba(colour[s["verdict"]], 0.75), ec="white"
            )
        )
        credit = _fmt(s["mean"][g]["credit_per_node"] for g in _exec_classes(e))
        ax.text(
            x + 0.5,
            y + 0.5,
            f"{s['held']['holds']}/{s['seeds']} {s['verdict']}\ncredit/node {credit}\n"
            f"gap {s['min_score_gap']:+.3f}; last quarter "
            f"{'ordered' if s['held']['late_score'] == s['seeds'] else 'not ordered'}",
            ha="center",
            va="center",
            fontsize=6.3,
        )
    ax.set_xticks([i + 0.5 for i in range(len(cols))])
    ax.set_xticklabels(cols, fontsize=7)
    ax.set_yticks([i + 0.5 for i in range(len(rows))])
    ax.set_yticklabels(rows, fontsize=7)
    ax.tick_params(length=0)
    ax.set_title(
        "Where good > mid > random holds (score, Elo and credit per node; seeds held)\n"
        "gap: smallest score gap of the ordering",
        fontsize=8.5,
    )


def plot(results: list[dict[str, Any]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    sizes = list(dict.fromkeys(e["n"] for e in results if e["group"] == "grid"))
    per_row = 4
    small = math.ceil(len(results) / per_row)
    top = 2  # the summary grid (2 x 2) and the good class over time (2 x len(sizes))
    fig = plt.figure(figsize=(4.4 * per_row, 3.3 * (top + small) + 0.6))
    grid = fig.add_gridspec(top + small, per_row)
    _summary_grid(fig.add_subplot(grid[0:2, 0:2]), results)
    cmap = plt.get_cmap("viridis")
    levels = sorted({e["kwargs"]["collusion"] for e in results if e["group"] == "grid"})
    for k, n in enumerate(sizes[:2]):
        share_ax = fig.add_subplot(grid[0, 2 + k])
        score_ax = fig.add_subplot(grid[1, 2 + k])
        for e in results:
            if e["group"] != "grid" or e["n"] != n:
                continue
            series = e["runs"][0]["series"]
            x = [d / n for d in series["duel"]]
            c = cmap(levels.index(e["kwargs"]["collusion"]) / max(1, len(levels) - 1))
            ls = "-" if e["kwargs"].get("canaries_on", True) else "--"
            share_ax.plot(x, series["credit_share"]["good"], color=c, ls=ls, lw=1.3)
            score_ax.plot(x[1:], _smooth(series["score"]["good"][1:]), color=c, ls=ls, lw=1.3)
        share_ax.set_title(f"N={n:,}: good class's credit share (seed 0)", fontsize=8.5)
        score_ax.set_title(f"N={n:,}: good class's duel score (moving window)", fontsize=8.5)
        score_ax.axhline(0.5, color="grey", lw=0.6)
        for ax in (share_ax, score_ax):
            ax.set_xlabel("duels per node", fontsize=7)
            ax.tick_params(labelsize=7)
        share_ax.legend(
            handles=[
                Line2D([], [], color=cmap(i / max(1, len(levels) - 1)), label=f"{round(c * 100)}% colluders")
                for i, c in enumerate(levels)
            ]
            + [
                Line2D([], [], color="grey", label="canaries on"),
                Line2D([], [], color="grey", ls="--", label="canaries off"),
            ],
            fontsize=5.5,
            ncol=2,
        )
    for i, e in enumerate(results):
        ax = fig.add_subplot(grid[top + i // per_row, i % per_row])
        series = e["runs"][0]["series"]
        x = [d / e["n"] for d in series["duel"]]
        for g in (g for g in ORDER if g in series["credit_share"]):
            ax.plot(x, series["credit_share"][g], color=COLOURS[g], lw=1.5)
            ax.plot(x[1:], _smooth(series["score"][g][1:]), color=COLOURS[g], lw=0.9, ls=":")
        ax.set_title(f"{e['name']}: {e['summary']['verdict']}", fontsize=8)
        ax.set_xlabel("duels per node", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.set_ylim(0, 0.85)
        if i == 0:
            ax.legend(
                handles=[Line2D([], [], color=c, label=g) for g, c in COLOURS.items() if g != "coalition"]
                + [
                    Line2D([], [], color="grey", label="credit share"),
                    Line2D([], [], color="grey", ls=":", label="duel score (window)"),
                ],
                fontsize=5.5,
                ncol=2,
                loc="upper left",
            )
    fig.suptitle(
        "Duel-and-judge on the real ledger fold (simulation/duels.py): seed 0 over time, all seeds in the grid",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def study(plan: list[Scenario], jobs: int = 1, console: Any = None) -> list[dict[str, Any]]:
    """Run every (scenario, seed) of `plan` (in `jobs` processes) with a rich progress bar counted
    in duels; the per-scenario result entries, in plan order."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    work = [(s, seed) for s in plan for seed in s.seeds]
    total = sum(s.duels for s, _ in work)
    done: dict[tuple[str, int], dict[str, Any]] = {}
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        refresh_per_second=4,
    ) as bar:
        task = bar.add_task(f"{len(work)} runs", total=total)
        if jobs > 1:
            with ProcessPoolExecutor(jobs) as pool:
                futures = {pool.submit(_run_one, item): item for item in work}
                for future in as_completed(futures):
                    s, seed = futures[future]
                    done[(s.name, seed)] = future.result()
                    bar.update(task, advance=s.duels, description=f"{s.name} seed {seed}")
        else:
            base = 0
            for s, seed in work:
                bar.update(task, description=f"{s.name} seed {seed}")

                def tick(step: int, _total: int, base: int = base) -> None:
                    bar.update(task, completed=base + step)

                done[(s.name, seed)] = run(s.n, s.duels, seed=seed, progress=tick, **s.kwargs)
                base += s.duels
    results = []
    for s in plan:
        runs = [done[(s.name, seed)] for seed in s.seeds]
        results.append(
            {
                "name": s.name,
                "about": s.about,
                "group": s.group,
                "row": s.row,
                "col": s.col,
                "n": s.n,
                "duels": s.duels,
                "kwargs": s.kwargs,
                "summary": _summary(runs),
                "runs": runs,
            }
        )
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import os
    import platform
    from pathlib import Path

    from rich.console import Console

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="N = 100 only, 1,000 duels, one seed (about a minute)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "benchmarks" / "results",
        help="folder for duel_simulation.json and duel_simulation.png (default benchmarks/results/)",
    )
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs in parallel processes (default 2)"
    )
    args = parser.parse_args(argv)
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 250)
    args.out.mkdir(parents=True, exist_ok=True)
    plan = scenarios(args.quick)
    runs = sum(len(s.seeds) for s in plan)
    console.print(
        f"duel simulation{' (quick)' if args.quick else ''}: {len(plan)} scenarios, {runs} runs, "
        f"{sum(s.duels * len(s.seeds) for s in plan):,} duels, {args.jobs} job(s)"
    )
    started, cpu_started, load_before = time.perf_counter(), time.process_time(), os.getloadavg()
    results = study(plan, args.jobs, console)
    elapsed = time.perf_counter() - started
    rows = targets(results, args.quick)
    breaks = break_points(results)
    cpu_per_duel = {
        f"N={n:,}": round(
            sum(r["cpu_seconds"] for e in results if e["n"] == n for r in e["runs"])
            * 1000
            / sum(r["config"]["duels"] for e in results if e["n"] == n for r in e["runs"]),
            3,
        )
        for n in dict.fromkeys(e["n"] for e in results)
    }
    report = {
        "what": "duel-and-judge incentive simulated on the real ledger fold (simulation/duels.py)",
        "meta": {
            "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else argv,
            "quick": args.quick,
            "jobs": args.jobs,
            "seconds": round(elapsed, 1),
            "cpu_seconds_main": round(time.process_time() - cpu_started, 1),
            "cpu_ms_per_duel": cpu_per_duel,
            "machine": {
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            },
            "grid_collusions": list(GRID_COLLUSIONS),
            "ordering": "good > mid > random (and mid > lazy), strictly, per node, on duel score, mean Elo "
            "and credit share; 'holds' when it held on every seed",
        },
        "targets": rows,
        "break_points": breaks,
        "scenarios": results,
    }
    (args.out / "duel_simulation.json").write_text(json.dumps(report, indent=1))
    plot(results, args.out / "duel_simulation.png")
    console.print(table(results))
    console.print(
        "score: won + tie/2 per duel played (late score: in the last quarter of the duels; x: not "
        "ordered on some seed); credit/node: class credit share / class node share; "
        "judge w h/c: mean judge weight of honest judges / colluders (seed 0); 1-right ok: share of app "
        "duels with exactly one right answer decided for it; cpu ms/duel: the run's process CPU time per "
        "duel (signatures, judge and router draws over all N nodes, the fold)."
    )
    console.print(targets_table(rows))
    for col, b in breaks.items():
        console.print(
            f"{col}: ordering holds up to {round(100 * b['holds_up_to']) if b['holds_up_to'] is not None else '-'}% "
            f"colluders; "
            + (
                f"breaks at {round(100 * b['first_break'])}%"
                if b["first_break"] is not None
                else "no break in the grid"
            )
        )
    console.print(
        f"CPU per duel: {', '.join(f'{k} {v:.1f} ms' for k, v in cpu_per_duel.items())}; "
        f"wrote {args.out / 'duel_simulation.json'} and {args.out / 'duel_simulation.png'} in {elapsed:.0f} s"
    )
    return 0  # a MISS is reported with its numbers, not as a failed run


if __name__ == "__main__":
    sys.exit(main())
