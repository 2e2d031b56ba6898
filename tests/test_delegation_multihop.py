"""Multi-hop delegation between real nodes: relays pass requests on, routes never loop.

E always delegates; R1 and R2 never run requests themselves but relay them (relay_frequency 1);
X executes. Every answer comes from X along a loop-free route; relays are neither paid nor charged.
With X gone, the relays pass the request around until every route is exhausted, and E falls back
to its own backend.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import LlamaServer, NodeProcess, founding_allocations, wait_until
from tests.test_delegation import GOSSIP, LEDGER
from wwwserve_gateway.network.genesis import NetworkGenesis, write_genesis

MODEL = "tiny"
POLICIES = {
    "E": {"target_usage": -1, "offload_frequency": 1.0, "accept_frequency": 0.0, "bond": 0},
    "R1": {"target_usage": 1.0, "accept_frequency": 0.0, "relay_frequency": 1.0, "bond": 100},
    "R2": {"target_usage": 1.0, "accept_frequency": 0.0, "relay_frequency": 1.0, "bond": 100},
    "X": {"target_usage": 1.0, "accept_frequency": 1.0, "bond": 100},
}


@pytest.fixture(scope="module")
def ring(
    tmp_path_factory: pytest.TempPathFactory, tiny_path: Path
) -> Iterator[dict[str, tuple[NodeProcess, str]]]:
    workdir = tmp_path_factory.mktemp("multihop")
    genesis = workdir / "network.yaml"
    funded = LEDGER.model_copy(update={"allocations": founding_allocations(workdir, [*POLICIES, "A"], 1000)})
    write_genesis(NetworkGenesis(name="multihop-test", gossip=GOSSIP, ledger=funded), genesis)
    llama = LlamaServer(tiny_path, MODEL, parallel=4)
    nodes: dict[str, tuple[NodeProcess, str]] = {}
    try:
        for name, policy in POLICIES.items():
            config = {
                "node": {
                    "network": str(genesis),
                    "bootstrap": [nodes["E"][0].url] if nodes else [],
                    "request_timeout": 20,
                },
                "model_list": [
                    {
                        "model_name": MODEL,
                        "litellm_params": {"model": f"llamacpp/{MODEL}", "api_base": llama.base_url},
                    }
                ],
                "policy": {"settings": policy},
            }
            node = NodeProcess(config, workdir, name=name).start()
            nodes[name] = (node, node.own_id())

        def staked_everywhere() -> bool:
            for node, _ in nodes.values():
                view = node.peers()
                held = node.balances()
                for other in ("R1", "R2", "X"):
                    peer = nodes[other][1]
                    if view.get(peer, {}).get("state") != "alive" or not view[peer].get("stake"):
                        return False
                    if held.get(peer, {}).get("bonded") != 100:
                        return False
            return True

        wait_until(staked_everywhere, 60, interval=0.2, what="relays and executor staked on every node")
        yield nodes
    finally:
        for node, _ in nodes.values():
            node.stop(signal.SIGKILL)
        llama.stop()


def test_relays_pass_requests_on_without_loops(ring: dict[str, tuple[NodeProcess, str]]) -> None:
    entry, e_id = ring["E"]
    x_id = ring["X"][1]
    relays = {ring["R1"][1], ring["R2"][1]}
    before = entry.balances()
    routes = []
    n = 10
    for _ in range(n):
        r = httpx.post(
            entry.url + "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        route = r.headers["x-wwwserve-route"].split(",")
        assert route[0] == e_id and route[-1] == x_id
        assert len(set(route)) == len(route)
        assert set(route[1:-1]) <= relays
        routes.append(route)
    assert any(len(route) >= 3 for route in routes), routes

    def settled() -> bool:
        now = entry.balances()
        return now[e_id]["liquid"] == before[e_id]["liquid"] - n * LEDGER.price_per_request

    wait_until(settled, interval=0.2, what="the entry paid")
    now = entry.balances()
    assert now[x_id]["liquid"] - before[x_id]["liquid"] == n * LEDGER.price_per_request
    for relay in relays:  # relays are neither paid nor charged
        assert now[relay]["liquid"] == before[relay]["liquid"]
    relayed = sum(
        ring[name][0].metric("wwwserve_peer_requests_total", outcome="relayed") for name in ("R1", "R2")
    )
    assert relayed == sum(len(route) - 2 for route in routes)


def test_with_no_executor_left_the_relays_give_up_without_looping(
    ring: dict[str, tuple[NodeProcess, str]],
) -> None:
    entry, entry_id = ring["E"]
    x_node, x_id = ring["X"]
    x_node.stop(signal.SIGKILL)

    def x_gone() -> bool:
        for name in ("E", "R1", "R2"):
            if ring[name][0].peers().get(x_id, {}).get("state") == "alive":
                return False
        return True

    wait_until(x_gone, interval=0.2, what="every node sees X gone")
    r = httpx.post(
        entry.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=30,
    )
    # Nobody could take it: the entry falls back to its own backend rather than fail the app.
    assert r.status_code == 200, r.text
    assert r.headers["x-wwwserve-route"] == entry_id
    assert entry.metric("wwwserve_delegations_total", outcome="no_executor") == 1
    # No node was ever offered a request whose route already held it.
    for name in ("E", "R1", "R2"):
        assert ring[name][0].metric("wwwserve_peer_requests_total", outcome="refused") == 0
