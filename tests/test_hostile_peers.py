"""Hostile members against real node processes on loopback (docs/security.md).

Three honest nodes, funded by the genesis: A (an entry that always delegates) and two executors B
and C in front of an instant stub backend. H is a member with a key of its own (funded like the
others) and as many fresh keys as it likes, built from the project's own classes (tests/hostile.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from tests.hostile import HostileMember
from tests.support import ListeningChild, NodeProcess, no_duels, wait_until
from wwwserve_gateway.network.canonical import digest
from wwwserve_gateway.network.genesis import GossipParams, LedgerParams, NetworkGenesis, write_genesis
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.network.receipts import request_hash, sign_receipt, text_hash

MODEL = "stub"
ADMIN = "admin-key"
GOSSIP = GossipParams(interval_s=0.3, probe_timeout_s=0.25, suspect_timeout_s=1.5, refresh_s=2.0)
CREDITS = 1000
BOND = 100


class Network:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.stub = ListeningChild("stub", [sys.executable, "benchmarks/stub_server.py", "--port", "0"])
        names = ["A", "B", "C"]
        ids = {n: NodeIdentity.load_or_create(workdir / f"{n}-data").node_id for n in names}
        self.hostile_key = NodeIdentity.generate()
        self.second_hostile_key = NodeIdentity.generate()  # for a test after one that got the first struck
        hostile = (self.hostile_key.node_id, self.second_hostile_key.node_id)
        allocations = {**dict.fromkeys(ids.values(), CREDITS), **dict.fromkeys(hostile, CREDITS)}
        ledger = LedgerParams(
            allocations=allocations,
            payment_batch_window_s=0.3,
            price_per_1k_tokens=1.0,
            max_price_per_request=50,
            duels=no_duels(),
        )
        self.genesis = NetworkGenesis(name="hostile-test", gossip=GOSSIP, ledger=ledger)
        self.genesis_path = workdir / "network.yaml"
        write_genesis(self.genesis, self.genesis_path)
        self.nodes: dict[str, NodeProcess] = {}
        policies = {
            "A": {"target_usage": -1, "offload_frequency": 1.0, "accept_frequency": 0.0, "bond": 0},
            "B": {"target_usage": 1.0, "accept_frequency": 1.0, "bond": BOND},
            "C": {"target_usage": 1.0, "accept_frequency": 1.0, "bond": BOND},
        }
        for name in names:
            config = {
                "node": {
                    "network": str(self.genesis_path),
                    "bootstrap": [self.nodes["A"].url] if self.nodes else [],
                    "admin_key": ADMIN,
                    "request_timeout": 20,
                },
                "model_list": [
                    {
                        "model_name": MODEL,
                        "litellm_params": {"model": "openai/stub", "api_base": self.stub.url + "/v1"},
                    }
                ],
                "policy": {"settings": policies[name]},
                "router": {"settings": {"explore": 0.0}},
            }
            self.nodes[name] = NodeProcess(config, workdir, name=name).start()
        self.ids = ids

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.stub.stop()


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    network = Network(tmp_path_factory.mktemp("hostile"))
    try:
        a = network.nodes["A"]
        wait_until(
            lambda: all(
                a.peers().get(network.ids[x], {}).get("state") == "alive"
                and a.balances().get(network.ids[x], {}).get("bonded") == BOND
                for x in "BC"
            ),
            60,
            interval=0.2,
            what="B and C alive and staked at A",
        )
        yield network
    finally:
        network.close()


@pytest_asyncio.fixture
async def hostile(net: Network) -> AsyncIterator[HostileMember]:
    member = HostileMember(net.genesis, net.hostile_key)
    await member.start()
    try:
        yield member
    finally:
        await member.stop()


def chat(node: NodeProcess, **extra: Any) -> Any:
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="none", max_retries=0, timeout=30)
    return client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, **extra
    )


def gossip_events(node: NodeProcess, event: str) -> float:
    return node.metric("wwwserve_gossip_events_total", event=event)


async def off_loop(call: Any, *args: Any) -> Any:
    """Blocking HTTP calls run off the event loop: the hostile member lives on it, and must answer
    probes and delegated requests while the test waits for a node."""
    return await asyncio.to_thread(call, *args)


# -- membership ------------------------------------------------------------------------------------


async def test_a_forged_death_evicts_nobody(net: Network, hostile: HostileMember) -> None:
    """A dead record at the largest incarnation the protocol carries, about B, sent to everyone: it
    cites an incarnation B never signed, so every node refuses it and B keeps serving."""
    victim = net.ids["B"]
    targets = {n: await hostile.connect(net.nodes[n].url) for n in "ABC"}
    forged = hostile.accusation(victim, 2**62 - 1)
    for to in targets.values():
        await hostile.gossip(to, forged)
    for name in "ABC":
        node = net.nodes[name]
        await asyncio.to_thread(
            wait_until,
            lambda n=node: gossip_events(n, "rejected.uncited") >= 1,
            30,
            what=f"{name} refused it",
        )
    assert (await off_loop(net.nodes["A"].peers))[victim]["state"] == "alive"
    assert (await off_loop(net.nodes["C"].peers))[victim]["state"] == "alive"
    # An accusation citing B's real incarnation is only a hint: A checks B itself and keeps it alive,
    # and B outbids it.
    incarnation = (await off_loop(net.nodes["A"].peers))[victim]["incarnation"]
    await hostile.gossip(targets["A"], hostile.accusation(victim, incarnation))
    await hostile.gossip(targets["B"], hostile.accusation(victim, incarnation))
    await asyncio.to_thread(
        wait_until,
        lambda: net.nodes["A"].peers()[victim]["incarnation"] > incarnation,
        30,
        what="B's refutation reached A",
    )
    assert await off_loop(gossip_events, net.nodes["A"], "accusations.heard") >= 1
    routes = set()
    for _ in range(8):
        routes.add((await off_loop(chat, net.nodes["A"])).headers["x-wwwserve-route"].split(",")[-1])
    assert victim in routes, "B no longer receives delegations"


# -- credits ---------------------------------------------------------------------------------------


async def test_fresh_keys_mint_nothing(net: Network, hostile: HostileMember) -> None:
    """Twenty fresh keys: joins that claim a grant are refused; the rest hold nothing, and paying,
    transferring and bonding among themselves moves nothing into anyone's stake."""
    a = net.nodes["A"]
    greedy = [hostile.sybil() for _ in range(10)]
    for sybil in greedy:
        hostile.append(sybil, "join", {"grant": CREDITS})
    swarm = [hostile.sybil() for _ in range(10)]
    boss = swarm[0]
    for sybil in swarm:
        hostile.append(sybil, "join", {"grant": 0})
    for i, sybil in enumerate(swarm[1:]):
        request = hashlib.sha256(f"fake{i}".encode()).hexdigest()
        receipt = sign_receipt(
            hostile.keys[boss],
            net=net.genesis.network_id,
            entry=sybil,
            request=request,
            response=request,
            model=MODEL,
            prompt_tokens=50,
            completion_tokens=50,
            started=1.0,
            finished=2.0,
        )
        item = [request, 50, 50]
        amount = 1 + 0.1  # price_per_request 1 + 100 tokens at 1 per 1k
        payment = {"to": boss, "amount": amount, "items": [item], "receipts": [receipt]}
        hostile.append(sybil, "pay", {"payments": [payment]})
        hostile.append(sybil, "transfer", {"to": boss, "amount": 500})
    hostile.append(boss, "bond", {"amount": 5000})
    to = await hostile.connect(a.url)
    await hostile.announce_ledger(to)
    await asyncio.to_thread(
        wait_until, lambda: all(s in a.balances() for s in swarm), 30, what="A pulled the swarm's chains"
    )
    assert await off_loop(a.metric, "wwwserve_ledger_rejected_total") >= 1  # the greedy joins
    balances = await off_loop(a.balances)
    assert not any(s in balances for s in greedy)
    for sybil in swarm:
        assert balances[sybil] == {"liquid": 0.0, "bonded": 0.0, "unbonding": 0.0, "barred": False}
    total = sum(b["liquid"] + b["bonded"] + b["unbonding"] for b in balances.values())
    assert total <= sum(net.genesis.ledger.allocations.values())


# -- prices and anonymity --------------------------------------------------------------------------

LEAKY = {
    "id": "leaky-executor-id-format",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "/srv/models/secret-finetune-q4.gguf",
    "system_fingerprint": "b4567-llama.cpp",
    "timings": {"prompt_ms": 1.0, "predicted_ms": 2.0},
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi"},
            "finish_reason": "stop",
            "stop_reason": None,
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 5000, "total_tokens": 5009, "server_note": "x"},
}


async def test_an_inflated_receipt_is_paid_its_verified_part_and_the_answer_reveals_nothing(
    net: Network, hostile: HostileMember
) -> None:
    a = net.nodes["A"]
    me = hostile.id
    network_id = net.genesis.network_id
    served: list[str] = []

    async def lying_executor(peer: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield {"t": "accept", "route": [*request["route"], me]}
        text = __import__("json").dumps(LEAKY)
        yield {"t": "json", "d": text}
        served.append(peer)
        yield {
            "t": "receipt",
            "r": sign_receipt(
                hostile.identity,
                net=network_id,
                entry=request["route"][0],
                request=request_hash(request["id"], request["endpoint"], request["body"]),
                response=hashlib.sha256(text.encode()).hexdigest(),
                text=text_hash(LEAKY["choices"][0]["message"]["content"]),
                model=request["body"]["model"],
                prompt_tokens=100_000,
                completion_tokens=5000,
                started=time.time(),
                finished=time.time(),
            ),
        }

    hostile.serve_delegations(lying_executor)
    hostile.append(me, "join", {"grant": CREDITS})
    hostile.append(me, "bond", {"amount": 900})  # much more stake than B and C: drawn first, mostly
    to = await hostile.connect(a.url)
    await hostile.announce_ledger(to)
    await hostile.gossip(to, hostile.alive(models=[{"name": MODEL}], stake=900))
    await asyncio.to_thread(
        wait_until,
        lambda: (
            a.balances().get(me, {}).get("bonded") == 900 and a.peers().get(me, {}).get("state") == "alive"
        ),
        30,
        what="H staked and alive at A",
    )
    own = await off_loop(a.own_id)
    before = (await off_loop(a.balances))[own]["liquid"]
    leaked = None
    for _ in range(30):
        raw = await off_loop(chat, a)
        if raw.headers["x-wwwserve-route"].split(",")[-1] == me:
            leaked = raw
            break
    assert leaked is not None, "H was never drawn"
    # The app sees OpenAI's fields only: the model it asked for, the entry's id, no executor detail.
    answer = leaked.http_response.json()
    assert answer["model"] == MODEL and answer["id"].startswith("chatcmpl-")
    assert "system_fingerprint" not in answer and "timings" not in answer
    assert set(answer["choices"][0]) <= {"index", "message", "finish_reason", "logprobs"}
    assert set(answer["usage"]) <= {"prompt_tokens", "completion_tokens", "total_tokens"}
    # Paid what the bytes can hold, far below the 50-credit cap the claim would reach, and struck.
    await asyncio.to_thread(
        wait_until, lambda: a.balances()[me]["liquid"] > CREDITS - 900, 30, what="A paid H"
    )
    balances = await off_loop(a.balances)
    earned = balances[me]["liquid"] - (CREDITS - 900)
    assert 0 < earned < 3, earned
    inflated = await off_loop(lambda: a.metric("wwwserve_bad_receipts_total", reason="inflated_receipt"))
    assert inflated >= 1
    assert balances[own]["liquid"] >= before - 3 - 20  # A is not ruined: it keeps serving
    routes = {(await off_loop(chat, a)).headers["x-wwwserve-route"].split(",")[-1] for _ in range(10)}
    assert me not in routes, "a struck executor is still drawn"


def test_peer_addresses_need_an_operator_key(net: Network) -> None:
    a = net.nodes["A"]
    anonymous = httpx.get(a.url + "/wwwserve/peers", timeout=10).json()
    assert all(p["url"] is None for p in anonymous)
    operator = httpx.get(a.url + "/wwwserve/peers", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert all(p["url"].startswith("http://") for p in operator.json())


# -- an entry that never pays ----------------------------------------------------------------------


async def test_an_entry_that_never_pays_is_refused(net: Network, hostile: HostileMember) -> None:
    b = net.nodes["B"]
    to = await hostile.connect(b.url)

    async def ask(i: int) -> str:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 4}
        request = {
            "id": digest({"n": i, "t": time.time()})[:32],
            "endpoint": "chat/completions",
            "body": body,
            "route": [hostile.id],
            "continuation": False,
        }
        stream = hostile.overlay.stream(to, "wwwserve.delegate", request, timeout=10)
        first = await anext(stream)
        async for _ in stream:
            pass
        return first["t"] if first["t"] == "accept" else first["reason"]

    answers = [await ask(i) for i in range(12)]
    assert answers == ["accept"] * 12
    grace = (
        2 * net.genesis.ledger.payment_batch_window_s + 4 * GOSSIP.interval_s * GOSSIP.sync_every_rounds + 5
    )
    deadline = time.monotonic() + grace + 30
    refused = None
    while time.monotonic() < deadline and refused is None:
        answer = await ask(100 + int(time.monotonic()))
        if answer != "accept":
            refused = answer
        else:
            await asyncio.sleep(1.0)  # polling B's decision, one request a second (bounded above)
    assert refused is not None and "not paid" in refused
    assert b.metric("wwwserve_peer_requests_total", outcome="unpaid") >= 1


# -- an executor that accepts and never answers ----------------------------------------------------


async def test_an_executor_that_accepts_and_never_answers_is_replaced(net: Network) -> None:
    """It stays alive to gossip (it acks probes), accepts, then sends nothing, not even a heartbeat:
    the entry gives up at the stall deadline, the app gets its answer from another executor, and
    the silent one is avoided afterwards. (A key of its own: an earlier test got the first struck.)"""
    hostile = HostileMember(net.genesis, net.second_hostile_key)
    await hostile.start()
    try:
        await _accepts_and_never_answers(net, hostile)
    finally:
        await hostile.stop()


async def _accepts_and_never_answers(net: Network, hostile: HostileMember) -> None:
    a = net.nodes["A"]
    me = hostile.id
    accepted: list[str] = []
    forever = asyncio.Event()

    async def silent_executor(peer: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        accepted.append(request["id"])
        yield {"t": "accept", "route": [*request["route"], me]}
        await forever.wait()  # until the test ends

    hostile.serve_delegations(silent_executor)
    hostile.append(me, "join", {"grant": CREDITS})
    hostile.append(me, "bond", {"amount": 900})
    to = await hostile.connect(a.url)
    await hostile.announce_ledger(to)
    await hostile.gossip(to, hostile.alive(models=[{"name": MODEL}], stake=900))
    await asyncio.to_thread(
        wait_until,
        lambda: (
            a.peers().get(me, {}).get("state") == "alive" and a.balances().get(me, {}).get("bonded") == 900
        ),
        30,
        what="H staked and alive at A",
    )
    try:
        for _ in range(10):
            raw = await off_loop(chat, a)
            assert raw.http_response.status_code == 200
            assert raw.headers["x-wwwserve-route"].split(",")[-1] != me
            if accepted:
                break
        assert accepted, "H was never drawn"
        assert (await off_loop(a.peers))[me]["state"] == "alive"  # the stall, not gossip, replaced it
        routes = {(await off_loop(chat, a)).headers["x-wwwserve-route"].split(",")[-1] for _ in range(6)}
        assert me not in routes and len(accepted) == 1, "a silent executor is still drawn"
    finally:
        forever.set()
