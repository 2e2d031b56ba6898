"""The proof-of-stake router: draws match stake shares, orders are Plackett-Luce, filters hold."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from tests.fakes.plugins import FakeLedger, build, node_api, peer_view
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.plugin_api import ROUTER, Account, PeerState, PeerView, RequestInfo, Router
from wwwserve_gateway.plugin_api.loading import plugin_class
from wwwserve_gateway.plugins.routers.pos import StakeRouter, weighted_order

MODEL = "smollm2"
# Upper 0.999 quantiles of the chi-square distribution (scipy is not installed; values from any
# table, e.g. scipy.stats.chi2.ppf(0.999, df)). With fixed seeds the tests are deterministic; the
# 0.1% level only says how unlucky a seed would have to be for a correct sampler to fail.
CHI2_999 = {2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}


def peer(
    node_id: str,
    stake: Any = 1.0,
    models: Any = None,
    state: PeerState = PeerState.ALIVE,
    record: Any = None,
) -> PeerView:
    if record is None:
        record = {"models": [{"name": MODEL}] if models is None else models, "stake": stake}
    if not isinstance(record, dict):  # a record that is not even a mapping reads as an empty one
        record = {}
    return peer_view(node_id, record, state=state)


def make_router(
    peers: list[PeerView],
    bonded: Mapping[str, float] | None = None,
    barred: frozenset[str] = frozenset(),
    identity: NodeIdentity | None = None,
    **settings: Any,
) -> StakeRouter:
    """A router over `peers`; the ledger bonds each peer's advertised stake unless `bonded` says."""
    if bonded is None:
        bonded = {p.id: p.stake for p in peers}
    accounts = {n: Account(bonded=b) for n, b in bonded.items()}
    accounts.update({n: Account(bonded=bonded.get(n, 0.0), barred=True) for n in barred})
    identity = identity or NodeIdentity.generate()
    node = node_api(identity=identity, peers=peers, ledger=FakeLedger(accounts, owner=identity.node_id))
    return build(StakeRouter, node, **settings)


def request(route: tuple[str, ...] = ()) -> RequestInfo:
    return RequestInfo(id="0" * 32, model=MODEL, endpoint="chat/completions", stream=False, route=route)


def chi_square(observed: list[int], probabilities: list[float]) -> float:
    obs = np.asarray(observed, dtype=float)
    expected = np.asarray(probabilities, dtype=float) * obs.sum()
    return float(((obs - expected) ** 2 / expected).sum())


# -- the draw ------------------------------------------------------------------------------------


def test_first_pick_is_proportional_to_stake() -> None:
    stakes = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 10.0}
    router = make_router([peer(n, s) for n, s in stakes.items()], seed=20240611)
    firsts = Counter(router.candidates(request())[0] for _ in range(20_000))
    total = sum(stakes.values())
    stat = chi_square([firsts[n] for n in stakes], [s / total for s in stakes.values()])
    assert stat < CHI2_999[4], (stat, firsts)


def test_second_pick_is_proportional_among_the_rest() -> None:
    # Without replacement: given the first pick, the second is drawn from the others by stake.
    stakes = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 10.0}
    rng = random.Random(7)
    seconds: Counter[str] = Counter()
    for _ in range(20_000):
        order = weighted_order(stakes, rng)
        assert len(order) == len(set(order)) == 5
        if order[0] == "e":
            seconds[order[1]] += 1
    rest = ["a", "b", "c", "d"]
    stat = chi_square([seconds[n] for n in rest], [stakes[n] / 10.0 for n in rest])
    assert stat < CHI2_999[3], (stat, seconds)


def test_full_order_follows_plackett_luce() -> None:
    weights = {"x": 1.0, "y": 2.0, "z": 5.0}
    rng = random.Random(11)
    orders = Counter(tuple(weighted_order(weights, rng)) for _ in range(20_000))
    perms = list(itertools.permutations(weights))
    assert set(orders) <= set(perms)
    total = sum(weights.values())
    # P(i, j, k) = w_i / W * w_j / (W - w_i): each pick is proportional among those left.
    exact = [weights[i] / total * weights[j] / (total - weights[i]) for i, j, _ in perms]
    assert math.isclose(sum(exact), 1.0)
    stat = chi_square([orders[p] for p in perms], exact)
    assert stat < CHI2_999[5], (stat, orders)


def test_equal_weights_are_uniform() -> None:
    rng = random.Random(3)
    firsts = Counter(weighted_order({"p": 1.0, "q": 1.0, "r": 1.0}, rng, 1)[0] for _ in range(15_000))
    assert chi_square([firsts[n] for n in "pqr"], [1 / 3] * 3) < CHI2_999[2], firsts


def test_bad_weights_are_left_out_and_extremes_do_not_overflow() -> None:
    weights = {"ok": 1.0, "zero": 0.0, "neg": -2.0, "nan": math.nan, "inf": math.inf, "ninf": -math.inf}
    assert weighted_order(weights, random.Random(0)) == ["ok"]
    # -ln(U) / 1e-310 would overflow to inf for both; the ratio 1e10 must still decide the order.
    rng = random.Random(1)
    assert all(weighted_order({"b": 1e-310, "a": 1e-300}, rng)[0] == "a" for _ in range(1_000))
    assert sorted(weighted_order({"t": 5e-324, "h": 1e308, "m": 1.0}, rng)) == ["h", "m", "t"]


def test_k_and_determinism() -> None:
    weights = {n: float(i + 1) for i, n in enumerate("abcdef")}
    assert sorted(weighted_order(weights, random.Random(0))) == sorted(weights)
    assert len(weighted_order(weights, random.Random(0), 2)) == 2
    assert weighted_order(weights, random.Random(0), 0) == []
    assert weighted_order({}, random.Random(0)) == []
    assert weighted_order(weights, random.Random(42), 3) == weighted_order(weights, random.Random(42), 3)


# -- candidates ----------------------------------------------------------------------------------


def test_filters() -> None:
    me = NodeIdentity.generate()
    nan_record = {"models": [{"name": MODEL}], "stake": math.nan}
    peers = [
        peer("good", 5),
        peer("capped", 1000),  # advertises more than it has bonded
        peer("under", 3),  # advertises less than it has bonded
        peer("suspect", 5, state=PeerState.SUSPECT),
        peer("dead", 5, state=PeerState.DEAD),
        peer("left", 5, state=PeerState.LEFT),
        peer(me.node_id, 5),
        peer("relay", 5),
        peer("entry", 5),
        peer("other-model", 5, models=[{"name": "llama"}]),
        peer("zero", 0),
        peer("unbonded", 5),
        peer("barred", 5),
        # malformed records from the network
        peer("models-none", record={"models": None, "stake": 5}),
        peer("models-str", 5, models=MODEL),
        peer("models-dict", 5, models={"name": MODEL}),
        peer("models-names", 5, models=[MODEL]),
        peer("models-junk", 5, models=[None, 3, {"nom": MODEL}]),
        peer("stake-str", "5"),
        peer("stake-bool", True),
        peer("stake-none", None),
        peer("stake-neg", -5),
        peer("stake-inf", math.inf),
        peer("stake-nan", record=nan_record),
        peer("record-list", record=["models", MODEL]),
        peer("no-fields", record={}),
    ]
    bonded = {p.id: 5.0 for p in peers} | {"capped": 10.0, "under": 10.0, "unbonded": 0.0}
    router = make_router(peers, bonded, frozenset({"barred"}), identity=me, max_attempts=50, explore=0.0)
    info = request(route=("entry", "relay"))
    weights = router.eligible(info)
    assert {n: w for n, w in weights.items() if w > 0} == {"good": 5.0, "capped": 10.0, "under": 3.0}
    # Alive peers serving the model with no usable stake are newcomers (weight 0): malformed stake
    # fields read as none, and an advertised stake never bonded counts for nothing.
    newcomers = {"zero", "unbonded", "stake-str", "stake-bool", "stake-none", "stake-neg", "stake-inf"}
    assert {n for n, w in weights.items() if w == 0} == newcomers | {"stake-nan"}
    for _ in range(50):
        assert sorted(router.candidates(info)) == ["capped", "good", "under"]


def test_newcomers_get_a_bounded_share_of_first_picks() -> None:
    staked = [peer(n, 10) for n in "abc"]
    fresh = [peer(f"new{i}", 0) for i in range(20)]  # a swarm of fresh keys
    router = make_router(staked + fresh, seed=11, explore=0.05)
    draws = 4000
    firsts = Counter(router.candidates(request())[0] for _ in range(draws))
    to_newcomers = sum(c for n, c in firsts.items() if n.startswith("new"))
    # 5% of draws: a binomial(4000, 0.05) lies within 200 +- 45 with probability ~ 0.999.
    assert 155 <= to_newcomers <= 245
    assert all(n.startswith("new") or n in "abc" for n in firsts)


def test_with_no_bonded_peer_newcomers_are_tried() -> None:
    router = make_router([peer(f"new{i}", 0) for i in range(5)], seed=3, explore=0.0)
    picked = router.candidates(request())
    assert len(picked) == 3 and all(n.startswith("new") for n in picked)


def test_while_staked_peers_are_busy_newcomers_keep_a_bounded_share() -> None:
    # The staked peers advertise no stake (busy), though bonded: a swarm of fresh keys must not get
    # every request then, or saturating the honest nodes would hand it the network's traffic.
    busy = [peer(n, 0) for n in "abc"]
    fresh = [peer(f"new{i}", 0) for i in range(20)]
    bonded = {n: 10.0 for n in "abc"} | {f"new{i}": 0.0 for i in range(20)}
    router = make_router(busy + fresh, bonded, seed=5, explore=0.05)
    draws = 4000
    picked = [router.candidates(request()) for _ in range(draws)]
    to_newcomers = sum(1 for p in picked if p[0].startswith("new"))
    assert 155 <= to_newcomers <= 245  # binomial(4000, 0.05), as above
    # Otherwise the busy peers are tried, in a random order; a newcomer only ever comes first.
    assert all(n in "abc" for p in picked for n in p[1:])
    assert Counter(p[0] for p in picked if not p[0].startswith("new")).keys() == set("abc")


def test_busy_bonded_peers_are_offered_idle_first_then_by_shortest_queue() -> None:
    # All bonded peers advertise next to no stake. Those whose load record says a request would not
    # queue (e.g. ramping their stake up after a start) come first, in a random order; then those
    # that are full (waiting, or every slot in use), shortest reported queue first.
    def bonded_peer(node_id: str, load: dict[str, Any] | None) -> PeerView:
        record: dict[str, Any] = {"models": [{"name": MODEL}], "stake": 0.1}
        if load is not None:
            record["load"] = load
        return peer(node_id, record=record)

    loads = {
        "long": {"running": 8, "waiting": 6, "usage": 1.0},
        "short": {"running": 8, "waiting": 1, "usage": 0.7},
        "saturated": {"running": 4, "waiting": 0, "usage": 1.0},
        "starting": {"running": 0, "waiting": 0, "usage": 0.0},
        "unprobed": None,
    }
    peers = [bonded_peer(n, load) for n, load in loads.items()]
    router = make_router(peers, {n: 10.0 for n in loads}, seed=9, explore=0.0, max_attempts=5)
    orders = [router.candidates(request()) for _ in range(200)]
    assert all(o[2:] == ["saturated", "short", "long"] for o in orders)
    assert Counter(o[0] for o in orders).keys() == {"starting", "unprobed"}
    # Full peers only: still offered (their `accept` decides), shortest queue first; a newcomer
    # comes first only at the exploration share.
    full_only = [bonded_peer(n, loads[n]) for n in ("long", "short")]
    router = make_router([*full_only, peer("new0", 0)], {"long": 10.0, "short": 10.0, "new0": 0.0}, seed=9)
    picked = [router.candidates(request()) for _ in range(400)]
    assert all(p in (["short", "long"], ["new0", "short", "long"]) for p in picked)
    assert 0 < sum(1 for p in picked if p[0] == "new0") < 60  # binomial(400, 0.05): 20 expected


def test_unknown_model_or_empty_table_gives_no_candidates() -> None:
    router = make_router([peer("a", 1)])
    assert router.candidates(RequestInfo("0" * 32, "nope", "completions", False, ())) == []
    assert make_router([]).candidates(request()) == []


def test_max_attempts_truncates() -> None:
    peers = [peer(n, i + 1) for i, n in enumerate("abcde")]
    assert len(make_router(peers).candidates(request())) == 3  # the default
    assert len(make_router(peers, max_attempts=1).candidates(request())) == 1
    assert len(make_router(peers, max_attempts=2).candidates(request())) == 2
    assert sorted(make_router(peers, max_attempts=9).candidates(request())) == list("abcde")


def test_seed_makes_draws_reproducible() -> None:
    peers = [peer(n, i + 1) for i, n in enumerate("abcde")]
    first, second = make_router(peers, seed=5), make_router(peers, seed=5)
    assert [first.candidates(request()) for _ in range(20)] == [
        second.candidates(request()) for _ in range(20)
    ]


def test_is_the_pos_entry_point_and_a_router_plugin() -> None:
    assert plugin_class(ROUTER, "pos") is StakeRouter
    assert isinstance(make_router([]), Router)


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "needles"),
    [
        ({"max_attempt": 3}, ["max_attempt", "did you mean 'max_attempts'"]),
        ({"max_attempts": 0}, ["settings.max_attempts", "greater than or equal to 1"]),
        ({"max_attempts": "3"}, ["max_attempts", "integer"]),
        ({"max_attempts": 2.0}, ["max_attempts", "integer"]),
        ({"seed": "abc"}, ["settings.seed", "integer"]),
    ],
)
def test_bad_settings_name_the_key(settings: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ValueError) as caught:
        make_router([], **settings)
    for needle in needles:
        assert needle in str(caught.value)


def test_good_settings() -> None:
    router = make_router([], max_attempts=1, seed=7)
    assert (router.settings.max_attempts, router.settings.seed) == (1, 7)
    assert (make_router([]).settings.max_attempts, make_router([]).settings.seed) == (3, None)
