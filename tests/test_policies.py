"""The built-in policies, driven through stand-in backends, ledger and gossip (no network, no engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import Field

from tests.fakes.plugins import ME, FakeLedger, build, node_api, peer_view
from wwwserve_gateway.config.schema import ModelEntry
from wwwserve_gateway.plugin_api import Account, Decision, PeerState, PeerView, RequestInfo
from wwwserve_gateway.plugin_api.backend import (
    Backend,
    BackendContext,
    BackendLoad,
    BackendSettings,
    JSONReply,
)
from wwwserve_gateway.plugins.policies.base import backend_capacity, backend_usage, ensure_bond
from wwwserve_gateway.plugins.policies.completion_time import CompletionTimePolicy, infer_slots
from wwwserve_gateway.plugins.policies.frequency import FrequencyPolicy

APP = RequestInfo(id="a" * 32, model="m", endpoint="chat/completions", stream=False, route=())
PEER_REQ = RequestInfo(id="b" * 32, model="m", endpoint="chat/completions", stream=False, route=("p" * 32,))


class SlotSettings(BackendSettings):
    n_parallel: int | None = Field(1, gt=0)


class FakeBackend(Backend):
    Settings = SlotSettings

    async def complete(self, endpoint: Any, body: dict[str, Any]) -> JSONReply:
        raise NotImplementedError


def backend(
    model: str = "m",
    *,
    ready: bool = True,
    in_flight: int = 0,
    load: BackendLoad | None = None,
    parallel: int | None = None,
    n_parallel: int | None = 1,
) -> FakeBackend:
    entry = ModelEntry(model_name=model, litellm_params={"model": f"fake/{model}"})
    params = SlotSettings(model=f"fake/{model}", max_parallel_requests=parallel, n_parallel=n_parallel)
    made = FakeBackend(entry, params, BackendContext(data_dir=Path("."), request_timeout=10.0))
    made.state.in_flight = in_flight
    made.state.load = load
    if ready:
        made._ready.set()
    return made


def ledger(liquid: float = 1000.0, bonded: float = 100.0, can_delegate: bool = True) -> FakeLedger:
    return FakeLedger({ME: Account(liquid, bonded)}, delegate=can_delegate)


def peer(
    pid: str,
    *,
    running: int = 0,
    waiting: int = 0,
    usage: float = 0.0,
    model: str = "m",
    state: PeerState = PeerState.ALIVE,
    stake: float = 10.0,
) -> PeerView:
    load = {"running": running, "waiting": waiting, "usage": usage}
    return peer_view(pid, state=state, models=[{"name": model}], load=load, stake=stake)


def make_node(
    backends: list[Backend], fake_ledger: FakeLedger | None = None, peers: list[PeerView] | None = None
):
    return node_api(backends=backends, ledger=fake_ledger or ledger(), peers=peers or [])


def frequency(
    backends: list[Backend],
    fake_ledger: FakeLedger | None = None,
    peers: list[PeerView] | None = None,
    **settings: Any,
) -> FrequencyPolicy:
    """A frequency policy on a node with, by default, one alive staked peer serving "m"."""
    peers = [peer("p" * 64)] if peers is None else peers
    return build(FrequencyPolicy, make_node(backends, fake_ledger, peers), **{"seed": 7, **settings})


BUSY = BackendLoad(running=1, waiting=0, usage=0.9)


# -- helpers -------------------------------------------------------------------------------------


def test_capacity_and_usage_take_the_quicker_signal() -> None:
    assert backend_capacity(backend(parallel=4, n_parallel=2)) == 4
    assert backend_capacity(backend(n_parallel=3)) == 3
    # The probe lags; in-flight reacts at once, and the larger wins.
    assert backend_usage(backend(in_flight=1, n_parallel=4)) == 0.25
    assert backend_usage(backend(in_flight=1, n_parallel=4, load=BackendLoad(1, 0, 0.6))) == 0.6
    assert backend_usage(backend(in_flight=3, n_parallel=4, load=BackendLoad(1, 0, 0.1))) == 0.75
    # An external llama.cpp server reports its own slots: they beat the setting's default of 1.
    external = backend(in_flight=2, n_parallel=1, load=BackendLoad(1, 0, 0.125, capacity=8))
    assert backend_capacity(external) == 8 and backend_usage(external) == 0.25
    assert backend_capacity(backend(parallel=2, load=BackendLoad(capacity=8))) == 2


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"offload_frequncy": 0.5}, "offload_frequncy"),
        ({"offload_frequency": 1.5}, "offload_frequency"),
        ({"target_usage": 2}, "target_usage"),
        ({"target_usage": {"m": -0.5}}, "target_usage"),
        ({"bond": "lots"}, "bond"),
        ({"share_models": "m"}, "share_models"),
    ],
)
def test_frequency_settings_errors_name_the_key(settings: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=rf"settings\.{key}: "):
        build(FrequencyPolicy, make_node([]), **settings)


def test_unknown_setting_lists_the_known_ones() -> None:
    with pytest.raises(
        ValueError, match=r"did you mean 'offload_frequency'\? allowed keys here: .*queue_frequency"
    ):
        build(FrequencyPolicy, make_node([]), offload_frequncy=0.5)


@pytest.mark.parametrize(("settings", "key"), [({"margin": -1}, "margin"), ({"service_s": 0}, "service_s")])
def test_completion_time_settings_errors_name_the_key(settings: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=rf"settings\.{key}: "):
        build(CompletionTimePolicy, make_node([]), **settings)


def test_settings_accept_target_mapping_and_never_local() -> None:
    policy = frequency([], target_usage={"m": 0.7, "n": -1}, retry_after_s=2)
    assert policy.target("m") == 0.7
    assert policy.target("n") == -1
    assert policy.target("other") == 0.5
    assert policy.retry_after_s == 2


# -- frequency: decide ---------------------------------------------------------------------------


def test_decide_idle_local_backend_serves_locally() -> None:
    assert frequency([backend(load=BackendLoad(0, 0, 0.2))]).decide(APP) is Decision.LOCAL


def test_decide_in_flight_makes_a_backend_busy_before_the_next_probe() -> None:
    policy = frequency([backend(in_flight=1)], offload_frequency=1.0)
    assert policy.decide(APP) is Decision.DELEGATE


def test_decide_busy_with_no_peer_to_hand_over_to_queues_locally() -> None:
    alone = frequency([backend(load=BUSY)], peers=[], offload_frequency=0.0, queue_frequency=0.0)
    assert alone.decide(APP) is Decision.LOCAL  # no retry loop on a node alone
    unstaked = frequency([backend(load=BUSY)], peers=[peer("q" * 64, stake=0)], queue_frequency=0.0)
    assert unstaked.decide(APP) is Decision.LOCAL


def test_in_flight_counts_only_when_the_capacity_is_known() -> None:
    # A remote API or a vLLM server of unknown size: one request in flight says nothing.
    unknown = backend(in_flight=5, n_parallel=None)
    assert backend_usage(unknown) == 0.0
    assert backend_usage(backend(in_flight=1, n_parallel=2)) == 0.5
    assert backend_usage(backend(in_flight=1, n_parallel=None, parallel=4)) == 0.25


def test_decide_busy_branches() -> None:
    assert frequency([backend(load=BUSY)], offload_frequency=1.0).decide(APP) is Decision.DELEGATE
    queue = frequency([backend(load=BUSY)], offload_frequency=0.0, queue_frequency=1.0)
    assert queue.decide(APP) is Decision.LOCAL
    retry = frequency([backend(load=BUSY)], offload_frequency=0.0, queue_frequency=0.0)
    assert retry.decide(APP) is Decision.RETRY


def test_decide_never_delegates_without_credit_or_when_not_buying() -> None:
    broke = ledger(can_delegate=False)
    policy = frequency([backend(load=BUSY)], broke, offload_frequency=1.0, queue_frequency=1.0)
    assert policy.decide(APP) is Decision.LOCAL
    policy = frequency([backend(load=BUSY)], offload_frequency=1.0, queue_frequency=0.0, buy_models=["x"])
    assert policy.decide(APP) is Decision.RETRY


def test_decide_without_a_ready_local_backend() -> None:
    assert frequency([]).decide(APP) is Decision.DELEGATE
    assert frequency([backend(ready=False)]).decide(APP) is Decision.DELEGATE
    assert frequency([backend("other")]).decide(APP) is Decision.DELEGATE
    assert frequency([], buy_models=[]).decide(APP) is Decision.REJECT
    assert frequency([], ledger(can_delegate=False)).decide(APP) is Decision.REJECT
    # Unable to delegate, with a local deployment that is starting: wait for it (a 503, not a 429).
    assert frequency([backend(ready=False)], ledger(can_delegate=False)).decide(APP) is Decision.LOCAL


def test_decide_target_minus_one_never_serves_locally() -> None:
    policy = frequency([backend()], target_usage={"m": -1}, offload_frequency=0.0, queue_frequency=1.0)
    assert policy.decide(APP) is Decision.DELEGATE
    policy = frequency([backend()], target_usage=-1, buy_models=[])
    assert policy.decide(APP) is Decision.REJECT


def test_offload_rate_matches_offload_frequency() -> None:
    policy = frequency([backend(load=BUSY)], offload_frequency=0.8, queue_frequency=0.2, seed=12345)
    draws = 2000
    counts = {d: 0 for d in Decision}
    for _ in range(draws):
        counts[policy.decide(APP)] += 1
    # Expected 0.8 / 0.04 / 0.16; 0.04 is more than 4 standard deviations (sd ~ 0.009), and the seed
    # is fixed, so this cannot flake.
    assert abs(counts[Decision.DELEGATE] / draws - 0.8) < 0.04
    assert abs(counts[Decision.LOCAL] / draws - 0.2 * 0.2) < 0.02
    assert abs(counts[Decision.RETRY] / draws - 0.2 * 0.8) < 0.04


def test_same_seed_same_decisions() -> None:
    def run() -> list[Decision]:
        policy = frequency([backend(load=BUSY)], seed=3)
        return [policy.decide(APP) for _ in range(50)]

    assert run() == run()


# -- frequency: accept ---------------------------------------------------------------------------


def test_accept_idle_backend() -> None:
    assert frequency([backend()], accept_frequency=1.0).accept(PEER_REQ) is Decision.LOCAL
    assert frequency([backend()], accept_frequency=0.0).accept(PEER_REQ) is Decision.REJECT


def test_accept_declines_busy_queueing_or_unshared() -> None:
    assert frequency([backend(load=BUSY)], accept_frequency=1.0).accept(PEER_REQ) is Decision.REJECT
    queueing = backend(load=BackendLoad(1, 2, 0.1))
    assert frequency([queueing], accept_frequency=1.0).accept(PEER_REQ) is Decision.REJECT
    # A second, idle backend of the model does not hide the first one's queue.
    assert frequency([queueing, backend()], accept_frequency=1.0).accept(PEER_REQ) is Decision.REJECT
    unshared = frequency([backend()], accept_frequency=1.0, share_models=["other"])
    assert unshared.accept(PEER_REQ) is Decision.REJECT
    assert frequency([], accept_frequency=1.0).accept(PEER_REQ) is Decision.REJECT
    assert frequency([backend()], accept_frequency=1.0, target_usage=-1).accept(PEER_REQ) is Decision.REJECT


def test_accept_relays_onward() -> None:
    policy = frequency([backend(load=BUSY)], accept_frequency=1.0, relay_frequency=1.0)
    assert policy.accept(PEER_REQ) is Decision.DELEGATE
    policy = frequency([backend(load=BUSY)], ledger(can_delegate=False), relay_frequency=1.0)
    assert policy.accept(PEER_REQ) is Decision.REJECT


def test_share_and_buy_filters() -> None:
    policy = frequency([], share_models=["a"], buy_models=["b"])
    assert policy.shares("a") and not policy.shares("b")
    assert policy.buys("b") and not policy.buys("a")
    everything = frequency([])
    assert everything.shares("z") and everything.buys("z")


# -- frequency: stake ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "score"),
    [(0.0, 4), (0.125, 4), (0.2, 3), (0.25, 3), (0.3, 2), (0.375, 2), (0.45, 1), (0.5, 1), (0.51, 0)],
)
def test_stake_score_thresholds(usage: float, score: int) -> None:
    policy = frequency([backend(load=BackendLoad(1, 0, usage))], target_usage=0.5)
    assert policy.stake_score() == score


def test_stake_score_is_zero_when_queueing_or_serving_nothing() -> None:
    assert frequency([backend(load=BackendLoad(1, 1, 0.0))]).stake_score() == 0
    assert frequency([]).stake_score() == 0
    assert frequency([backend()], share_models=[]).stake_score() == 0
    assert frequency([backend()], target_usage=-1).stake_score() == 0


def test_stake_score_averages_usage_and_target() -> None:
    backends = [backend("a", load=BackendLoad(1, 0, 0.6)), backend("b", load=BackendLoad(0, 0, 0.0))]
    # u = 0.3, T = (0.8 + 0.4) / 2 = 0.6: u <= 0.5 T -> 3
    assert frequency(backends, target_usage={"a": 0.8, "b": 0.4}).stake_score() == 3


def test_advertised_stake_moves_at_most_half_the_bond_per_call() -> None:
    idle = backend()
    policy = frequency([idle], ledger(bonded=100))
    assert policy.advertised_stake() == 50
    assert policy.advertised_stake() == 100
    assert policy.advertised_stake() == 100
    idle.state.load = BackendLoad(1, 1, 0.1)  # queueing: score 0
    assert policy.advertised_stake() == 50
    assert policy.advertised_stake() == 0
    idle.state.load = BackendLoad(1, 0, 0.2)  # score 3 of 4
    assert policy.advertised_stake() == 50
    assert policy.advertised_stake() == 75


def test_advertised_stake_never_exceeds_bonded() -> None:
    fake = ledger(bonded=100)
    policy = frequency([backend()], fake)
    policy.advertised_stake()
    policy.advertised_stake()
    fake.accounts[ME] = Account(1000, 20)  # slashed
    assert policy.advertised_stake() == 20


# -- bonding -------------------------------------------------------------------------------------


async def test_start_bonds_what_is_missing() -> None:
    fake = ledger(liquid=1000, bonded=30)
    await frequency([], fake, bond=100).start()
    assert fake.ops == [("bond", {"amount": 70})]
    await frequency([], fake, bond=100).start()  # already bonded: nothing more
    assert len(fake.ops) == 1


async def test_start_bonds_only_what_liquid_allows() -> None:
    fake = ledger(liquid=40.5, bonded=0)
    await build(CompletionTimePolicy, make_node([], fake), bond=100).start()
    assert fake.ops == [("bond", {"amount": 40})]
    broke = ledger(liquid=0, bonded=0)
    await frequency([], broke).start()
    assert broke.ops == []
    assert await ensure_bond(make_node([], ledger()), 0) == 0


# -- completion time -----------------------------------------------------------------------------


def completion(backends: list[Backend], peers: list[PeerView], **settings: Any) -> CompletionTimePolicy:
    return build(CompletionTimePolicy, make_node(backends, peers=peers), **settings)


def test_infer_slots() -> None:
    assert infer_slots(0, 0.0) == 1
    assert infer_slots(2, 0.5) == 4
    assert infer_slots(3, 1.0) == 3
    assert infer_slots(1, 0.5, known=8) == 8


def test_completion_time_delegates_to_a_faster_idle_peer() -> None:
    local = backend(load=BackendLoad(running=1, waiting=3, usage=1.0))  # 1 slot, 3 queued
    policy = completion([local], [peer("idle")])
    assert policy.local_estimate("m") == pytest.approx(5.0)
    assert policy.best_peer_estimate("m") == pytest.approx(1.005)
    assert policy.decide(APP) is Decision.DELEGATE


def test_completion_time_stays_local_when_peers_are_busier() -> None:
    local = backend(load=BackendLoad(running=1, waiting=1, usage=1.0))  # estimate 3 s
    policy = completion([local], [peer("busy", running=1, waiting=4, usage=1.0)])  # 6 s
    assert policy.decide(APP) is Decision.LOCAL


def test_completion_time_margin_prefers_local_on_near_ties() -> None:
    local = backend(load=BackendLoad(running=1, waiting=0, usage=1.0))  # 2 s
    slightly_faster = peer("p", running=2, waiting=0, usage=1.0)  # 2 slots full: 1.5 s
    assert completion([local], [slightly_faster], margin=0.5).decide(APP) is Decision.LOCAL
    assert completion([local], [slightly_faster], margin=0.2).decide(APP) is Decision.DELEGATE


def test_completion_time_ignores_peers_that_cannot_be_drawn() -> None:
    local = backend(load=BackendLoad(running=1, waiting=5, usage=1.0))
    unusable = [
        peer("dead", state="dead"),
        peer("other-model", model="x"),
        peer("no-stake", stake=0),
        peer(ME),
    ]
    assert completion([local], unusable).decide(APP) is Decision.LOCAL


def test_completion_time_without_local_backend_or_credit() -> None:
    assert completion([], []).decide(APP) is Decision.DELEGATE
    assert completion([], [], buy_models=[]).decide(APP) is Decision.REJECT
    local = backend(load=BackendLoad(running=1, waiting=3, usage=1.0))
    policy = completion([local], [peer("idle")], buy_models=[])
    assert policy.decide(APP) is Decision.LOCAL


def test_completion_time_uses_local_slots() -> None:
    # 4 slots (from max_parallel_requests), 4 in flight: one more waits a quarter service time.
    policy = completion([backend(in_flight=4, parallel=4)], [])
    assert policy.local_estimate("m") == pytest.approx(1.25)
    # Slots inferred from the probe: 3 running at usage 0.75 -> 4 slots, one free.
    policy = completion([backend(load=BackendLoad(3, 0, 0.75))], [])
    assert policy.local_estimate("m") == pytest.approx(1.0)


def test_completion_time_accept() -> None:
    assert completion([backend()], []).accept(PEER_REQ) is Decision.LOCAL
    # 1 slot, 1 running + 1 queued: 3 service times > the default 2.
    crowded = backend(load=BackendLoad(1, 1, 1.0))
    assert completion([crowded], []).accept(PEER_REQ) is Decision.REJECT
    assert completion([crowded], [], accept_max_s=3.0).accept(PEER_REQ) is Decision.LOCAL
    assert completion([backend()], [], share_models=[]).accept(PEER_REQ) is Decision.REJECT
    assert completion([], []).accept(PEER_REQ) is Decision.REJECT


def test_completion_time_ewma() -> None:
    policy = completion([backend()], [], ewma_alpha=0.5, service_s=1.0)
    assert policy.service_estimate("m") == 1.0
    policy.on_request_done(APP, "local", 4.0, True)
    assert policy.service_estimate("m") == 4.0
    policy.on_request_done(APP, "local", 2.0, True)
    assert policy.service_estimate("m") == 3.0
    policy.on_request_done(APP, "local", 100.0, False)  # failures are not service times
    assert policy.service_estimate("m") == 3.0
    policy.on_request_done(APP, "peer", 0.5, True)
    assert policy.service_estimate("m", "peer") == 0.5
    assert policy.service_estimate("m") == 3.0


def test_completion_time_learns_that_a_peer_is_slow() -> None:
    local = backend(load=BackendLoad(running=1, waiting=1, usage=1.0))  # 3 s at 1 s service
    policy = completion([local], [peer("slow")])
    assert policy.decide(APP) is Decision.DELEGATE
    policy.on_request_done(APP, "slow", 10.0, True)
    assert policy.decide(APP) is Decision.LOCAL


def test_completion_time_stake_is_the_free_fraction_of_bonded() -> None:
    policy = completion([backend(parallel=4, in_flight=1)], [])
    assert policy.advertised_stake() == pytest.approx(75.0)
    assert completion([backend(parallel=2, in_flight=3)], []).advertised_stake() == 0
    assert completion([], []).advertised_stake() == 0
    assert completion([backend()], [], share_models=[]).advertised_stake() == 0
