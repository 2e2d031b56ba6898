"""The least_loaded policy (decentralized join-the-shortest-queue), driven through stand-in backends,
ledger and gossip (no network, no engine)."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

import pytest

from tests.fakes.plugins import build, peer_view
from tests.test_policies import APP, backend, ledger, make_node
from wwwserve_gateway.plugin_api import Decision, PeerState, RequestInfo
from wwwserve_gateway.plugin_api.backend import BackendLoad
from wwwserve_gateway.plugins.policies.least_loaded import FIELD, LeastLoadedPolicy, published_busy

P1, P2 = "p" * 64, "q" * 64


def lpeer(pid: str, busy: int | None, *, model: str = "m", stake: float = 100.0, **fields: Any):
    record: dict[str, Any] = {"models": [{"name": model}], "stake": stake, **fields}
    if busy is not None:
        record[FIELD] = {model: busy}
    return peer_view(pid, record)


def policy(local_busy: int, peers: list, **settings: Any) -> LeastLoadedPolicy:
    made = build(LeastLoadedPolicy, make_node([backend(in_flight=local_busy)], ledger(), peers), **settings)
    made.node_meta()  # publish once, as the first gossip round does
    return made


def from_peer(sender: str) -> RequestInfo:
    return RequestInfo(id="b" * 32, model="m", endpoint="chat/completions", stream=False, route=(sender,))


def test_registered_as_an_entry_point() -> None:
    names = {ep.name: ep.value for ep in entry_points(group="wwwserve.policies")}
    assert names["least_loaded"].endswith("least_loaded:LeastLoadedPolicy")


def test_published_busy_reads_the_field_then_the_coarse_load() -> None:
    assert published_busy(lpeer(P1, 3), "m") == 3
    assert published_busy(lpeer(P1, None, load={"running": 2, "waiting": 1, "usage": 0.5}), "m") == 3
    assert published_busy(lpeer(P1, None), "m") is None
    garbage = peer_view(P1, {"models": [{"name": "m"}], "stake": 1, FIELD: {"m": "lots"}})
    assert published_busy(garbage, "m") is None


def test_delegates_only_to_a_shorter_queue() -> None:
    assert policy(3, [lpeer(P1, 2), lpeer(P2, 5)]).decide(APP) is Decision.DELEGATE
    assert policy(2, [lpeer(P1, 2)]).decide(APP) is Decision.LOCAL  # a tie stays local
    assert policy(3, [lpeer(P1, 2)], min_gap=2).decide(APP) is Decision.LOCAL
    assert policy(0, [lpeer(P1, 0)]).decide(APP) is Decision.LOCAL


def test_never_retries_and_ignores_peers_that_cannot_be_drawn() -> None:
    dead = peer_view(P1, {"models": [{"name": "m"}], "stake": 100, FIELD: {"m": 0}}, state=PeerState.DEAD)
    unstaked = lpeer(P2, 0, stake=0)
    assert policy(9, [dead, unstaked]).decide(APP) is Decision.LOCAL
    no_credit = build(
        LeastLoadedPolicy,
        make_node([backend(in_flight=9)], ledger(can_delegate=False), [lpeer(P1, 0)]),
    )
    assert no_credit.decide(APP) is Decision.LOCAL


def test_without_a_local_backend_it_delegates() -> None:
    made = build(LeastLoadedPolicy, make_node([], ledger(), [lpeer(P1, 4)]))
    assert made.decide(APP) is Decision.DELEGATE


def test_accepts_only_what_moves_to_a_shorter_queue() -> None:
    # The requester published 4: holding 2 we take it, holding 4 we do not.
    assert policy(2, [lpeer(P1, 4)]).accept(from_peer(P1)) is Decision.LOCAL
    assert policy(4, [lpeer(P1, 4)]).accept(from_peer(P1)) is Decision.REJECT
    # An unknown requester: only the slack bound applies.
    assert policy(2, []).accept(from_peer(P2)) is Decision.LOCAL


def test_accept_is_bounded_by_what_was_published() -> None:
    made = policy(1, [lpeer(P1, 9)], slack=1)
    local = made.node.backends[0]
    assert made.accept(from_peer(P1)) is Decision.LOCAL
    local.state.in_flight = 3  # took two more since publishing 1
    assert made.accept(from_peer(P1)) is Decision.REJECT
    made.node_meta()  # the next round publishes 3
    assert made.accept(from_peer(P1)) is Decision.LOCAL


def test_busy_takes_the_larger_of_probe_and_in_flight() -> None:
    made = build(
        LeastLoadedPolicy,
        make_node([backend(in_flight=1, load=BackendLoad(running=4, waiting=2, usage=0.3))], ledger(), []),
    )
    assert made.local_busy("m") == 6
    assert made.node_meta()[FIELD] == {"m": 6}


@pytest.mark.parametrize(("mine", "others", "factor"), [(2, [2, 5], 1.0), (4, [2, 6], 0.25), (0, [], 1.0)])
def test_stake_halves_per_request_above_the_least_loaded(mine: int, others: list[int], factor: float) -> None:
    peers = [lpeer(f"{k}" * 64, busy) for k, busy in enumerate(others)]
    made = policy(mine, peers)
    assert made.advertised_stake() == pytest.approx(100.0 * factor)
    assert made.node_meta()["stake"] == pytest.approx(100.0 * factor)
