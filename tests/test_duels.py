"""Duel-and-judge between real node processes on loopback.

E is an entry that always delegates; X serves SmolLM2 on a real llama.cpp server, Y the instant stub
(a canned answer: wrong to every question); J1-J3 judge with the reference judge and serve nothing.
The genesis duels every delegated request. A hostile member, funded like the others, writes forged
duel operations into chains of its own.
"""

from __future__ import annotations

import asyncio
import copy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.hostile import HostileMember
from tests.support import ListeningChild, LlamaServer, NodeProcess, wait_until
from wwwserve_gateway.network.genesis import (
    DuelParams,
    GossipParams,
    LedgerParams,
    NetworkGenesis,
    write_genesis,
)
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.network.receipts import sign_receipt, text_hash
from wwwserve_gateway.network.votes import sign_vote

MODEL = "smol"
QUESTION = "What is the capital city of France? Reply with the city name only."
CREDITS = 1000
BOND = 100
GOSSIP = GossipParams(interval_s=0.3, probe_timeout_s=0.25, suspect_timeout_s=1.5, refresh_s=2.0)
DUELS = DuelParams(rate=1.0, judges=3, judge_timeout_s=30, canary_rate=0.0, gamma=0.1, judge_price=0.2)
REQUESTS = 3


class Network:
    def __init__(self, workdir: Path, smollm2: Path) -> None:
        self.llama = LlamaServer(smollm2, MODEL)
        self.stub = ListeningChild("stub", [sys.executable, "benchmarks/stub_server.py", "--port", "0"])
        names = ["E", "X", "Y", "J1", "J2", "J3"]
        self.ids = {n: NodeIdentity.load_or_create(workdir / f"{n}-data").node_id for n in names}
        self.hostile_key = NodeIdentity.generate()
        allocations = {**dict.fromkeys(self.ids.values(), CREDITS), self.hostile_key.node_id: CREDITS}
        ledger = LedgerParams(allocations=allocations, payment_batch_window_s=0.3, duels=DUELS)
        self.genesis = NetworkGenesis(name="duel-test", gossip=GOSSIP, ledger=ledger)
        genesis_path = workdir / "network.yaml"
        write_genesis(self.genesis, genesis_path)
        backends = {
            "X": {"model": "openai/smol", "api_base": self.llama.base_url},
            "Y": {"model": "openai/stub", "api_base": self.stub.url + "/v1"},
        }
        self.nodes: dict[str, NodeProcess] = {}
        for name in names:
            entry = name == "E"
            config: dict[str, Any] = {
                "node": {
                    "network": str(genesis_path),
                    "bootstrap": [self.nodes["E"].url] if self.nodes else [],
                    "request_timeout": 60,
                },
                "model_list": [{"model_name": MODEL, "litellm_params": backends[name]}]
                if name in backends
                else [],
                "policy": {
                    "settings": {
                        "target_usage": -1,
                        "offload_frequency": 1.0,
                        "accept_frequency": 0.0,
                        "bond": 0,
                    }
                    if entry
                    else {"target_usage": 1.0, "accept_frequency": 1.0, "bond": BOND}
                },
                "router": {"settings": {"explore": 0.0}},
                "judge": {"plugin": "reference"},
            }
            self.nodes[name] = NodeProcess(config, workdir, name=name).start()

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.stub.stop()
        self.llama.stop()


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Network]:
    network = Network(tmp_path_factory.mktemp("duels"), smollm2_path)
    try:
        e = network.nodes["E"]
        others = [i for n, i in network.ids.items() if n != "E"]
        wait_until(
            lambda: all(
                e.peers().get(i, {}).get("state") == "alive" and e.balances().get(i, {}).get("bonded") == BOND
                for i in others
            ),
            90,
            interval=0.2,
            what="every member alive and staked at E",
        )
        yield network
    finally:
        network.close()


def same_everywhere(net: Network) -> dict[str, dict[str, Any]] | None:
    """The balances (with duel records) if every node folds the same, else None."""
    views = [node.balances() for node in net.nodes.values()]
    return views[0] if all(v == views[0] for v in views[1:]) else None


def test_duels_between_real_executors_settle_identically_on_every_node(net: Network) -> None:
    e = net.nodes["E"]
    client = openai.OpenAI(base_url=e.url + "/v1", api_key="none", max_retries=0, timeout=60)
    for i in range(REQUESTS):
        answer = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=32,  # the stub always writes 20 tokens: fewer allowed would get it struck
            temperature=0,
            stream=i == 1,  # a streamed request is duelled too
        )
        if i == 1:
            answer = "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
        assert answer  # the app got an answer, whichever executor gave it
        # X serves one request at a time: the next duel waits until this one is judged.
        wait_until(
            lambda n=i + 1: e.metric("wwwserve_duels_total", outcome="settled") >= n,
            120,
            what=f"duel {i + 1} settled at E",
        )
    assert e.metric("wwwserve_duel_hedges_total") == REQUESTS
    view = wait_until(lambda: same_everywhere(net), 60, interval=0.3, what="every node folds the same duels")
    x, y = net.ids["X"], net.ids["Y"]
    assert view[x]["duels"]["won"] + view[x]["duels"]["tied"] == REQUESTS  # the stub never answers Paris
    assert view[x]["duels"]["won"] >= 1 and view[y]["duels"]["lost"] == view[x]["duels"]["won"]
    assert view[x]["quality"][MODEL] > 1500 > view[y]["quality"][MODEL]
    assert view[y]["bonded"] < BOND  # the loser's committed stake moved to the winner
    judges = [net.ids[j] for j in ("J1", "J2", "J3")]
    assert sum(view[j]["liquid"] for j in judges) > 3 * (CREDITS - BOND)  # paid for their votes
    assert view[net.ids["E"]]["liquid"] < CREDITS  # the entry only pays
    peers = e.peers()
    assert next(m for m in peers[x]["models"] if m["name"] == MODEL)["quality"] == view[x]["quality"][MODEL]


def forged_duels(hostile: HostileMember, honest_op: dict[str, Any], net_id: str) -> list[str]:
    """Sybil chains, each ending in one forged duel; returns their authors."""
    authors = []

    def chain(body: dict[str, Any]) -> None:
        author = hostile.sybil()
        hostile.append(author, "join", {"grant": 0})
        hostile.append(author, "duel", body)
        authors.append(author)

    # 1. A duel the honest entry settled, replayed under another author.
    chain(copy.deepcopy(honest_op["body"]))
    # 2. The same duel with a vote changed after it was signed.
    changed = copy.deepcopy(honest_op["body"])
    changed["votes"][0]["body"]["choice"] = "B" if changed["votes"][0]["body"]["choice"] != "B" else "A"
    chain(changed)
    # 3. A duel of its own between two Sybil executors, judged by one of the executors.
    boss = hostile.sybil()
    x_key, y_key = (hostile.keys[hostile.sybil()] for _ in range(2))
    request = "ab" * 32
    texts = (text_hash("mine"), text_hash("theirs"))
    receipts = [
        sign_receipt(
            k,
            net=net_id,
            entry=boss,
            request=request,
            response=request,
            model=MODEL,
            prompt_tokens=1,
            completion_tokens=1,
            started=1.0,
            finished=2.0,
            text=t,
            stake=1.0,
        )
        for k, t in zip((x_key, y_key), texts, strict=True)
    ]
    vote = sign_vote(x_key, net=net_id, entry=boss, duel=request, a=texts[0], b=texts[1], choice="A")
    hostile.append(boss, "join", {"grant": 0})
    hostile.append(boss, "duel", {"receipts": receipts, "votes": [vote]})
    authors.append(boss)
    return authors


async def test_forged_duel_operations_are_refused_by_every_node(net: Network) -> None:
    e = net.nodes["E"]
    honest = await asyncio.to_thread(
        lambda: next(
            op for op in e.get_json(f"/wwwserve/ledger/ops?author={net.ids['E']}") if op["kind"] == "duel"
        )
    )
    before = {
        n: await asyncio.to_thread(node.metric, "wwwserve_ledger_rejected_total")
        for n, node in net.nodes.items()
    }
    hostile = HostileMember(net.genesis, net.hostile_key)
    await hostile.start()
    try:
        authors = forged_duels(hostile, honest, net.genesis.network_id)
        for node in net.nodes.values():
            to = await hostile.connect(node.url)
            await hostile.announce_ledger(to)

        def refused_everywhere() -> bool:
            return all(
                node.metric("wwwserve_ledger_rejected_total") >= before[n] + len(authors)
                for n, node in net.nodes.items()
            )

        await asyncio.to_thread(
            wait_until, refused_everywhere, 60, 0.3, "every node refused the forged duels"
        )
    finally:
        await hostile.stop()
    view = await asyncio.to_thread(same_everywhere, net)
    assert view is not None
    for author in authors:  # the joins (grant 0) may be in; nothing after them is
        assert view.get(author, {}).get("duels") is None
