"""The ledger between real node processes: catch-up, agreement, equivocation, tampering."""

from __future__ import annotations

import dataclasses
import hashlib
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from tests.support import DEADLINE_S, NodeProcess, wait_until
from wwwserve_gateway.network.genesis import GossipParams, LedgerParams, NetworkGenesis, write_genesis
from wwwserve_gateway.network.identity import KEY_FILE, NodeIdentity
from wwwserve_gateway.plugins.ledger.fold import fold
from wwwserve_gateway.plugins.ledger.ops import Operation, sign_op
from wwwserve_gateway.plugins.ledger.store import LedgerStore, default_url

pytest_plugins = ("tests.postgres",)

# Keys the genesis funds (the same in every run): a chain's join grants what its author is allocated.
KEYS = [NodeIdentity(SigningKey(hashlib.sha256(f"ledger-test {i}".encode()).digest())) for i in range(6)]
GRANT = 1000
GENESIS = NetworkGenesis(
    name="ledger-test",
    gossip=GossipParams(interval_s=0.3, probe_timeout_s=0.25),
    ledger=LedgerParams(allocations={k.node_id: GRANT for k in KEYS}),
)


def keyed(data_dir: Path, identity: NodeIdentity) -> NodeIdentity:
    """`identity` as the key of a node that will run in `data_dir`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    identity.save(data_dir / KEY_FILE)
    return identity


@pytest.fixture(scope="module")
def genesis_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ledger-net") / "network.yaml"
    write_genesis(GENESIS, path)
    return path


def chain(identity: NodeIdentity, length: int, start_ts: float | None = None) -> list[Operation]:
    # Recent timestamps: no unbond matures during the test, so every prefix folds differently.
    start_ts = time.time() - 600 if start_ts is None else start_ts
    grant = GENESIS.ledger.allocations.get(identity.node_id, 0)
    ops = [sign_op(identity, 1, "", "join", {"grant": grant}, start_ts)]
    for seq in range(2, length + 1):
        kind = "bond" if seq % 2 == 0 else "unbond"
        ops.append(sign_op(identity, seq, ops[-1].hash, kind, {"amount": 1}, start_ts + seq / 1000))
    return ops


def store_in(data_dir: Path, ops: list[Operation]) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    store = LedgerStore(default_url(data_dir), GENESIS.network_id)
    for i in range(0, len(ops), 1000):
        store.append(ops[i : i + 1000])
    store.close()


def node(tmp: Path, name: str, genesis_path: Path, bootstrap: list[str] | None = None) -> NodeProcess:
    config = {
        "node": {"network": str(genesis_path), "bootstrap": bootstrap or [], "data_dir": str(tmp / name)},
        "model_list": [],
    }
    return NodeProcess(config, tmp, name=name)


@pytest.fixture
def nodes() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    for n in started:
        n.stop(signal.SIGKILL)


def test_offline_node_catches_up_10000_operations(tmp_path: Path, genesis_path: Path, nodes) -> None:
    a_dir = tmp_path / "a"
    a_id = keyed(a_dir, KEYS[0])
    ops = chain(a_id, 10_000)
    store_in(a_dir, ops)
    a = node(tmp_path, "a", genesis_path)
    nodes.append(a.start())
    b = node(tmp_path, "b", genesis_path, [a.url])
    nodes.append(b.start())

    def holds_the_last() -> bool:
        last = b.get_json(f"/wwwserve/ledger/ops?author={a_id.node_id}&from=10000")
        return [op["seq"] for op in last] == [10_000]

    # How fast: benchmarks/ledger_throughput.py (a new node syncing 100,000 operations).
    wait_until(holds_the_last, timeout=3 * DEADLINE_S, interval=0.5, what="b holds a's 10,000th operation")
    wait_until(lambda: b.balances() == a.balances(), what="b agrees with a")
    # 5,000 bonds of 1 and 4,999 unbonds of 1, none matured: the bonds stop when the grant is spent.
    expected = fold(ops, GENESIS.ledger, GENESIS.network_id).account(a_id.node_id)
    assert expected.liquid == 0 and expected.unbonding == GRANT - expected.bonded
    assert b.balances()[a_id.node_id] == dataclasses.asdict(expected)


def test_tampered_database_is_refused_naming_the_row(tmp_path: Path, genesis_path: Path) -> None:
    me_dir = tmp_path / "t"
    me = keyed(me_dir, KEYS[1])
    store_in(me_dir, chain(me, 20))
    with sqlite3.connect(me_dir / "ledger.db") as db:
        db.execute("UPDATE ledger_ops SET raw = replace(raw, '\"amount\":1', '\"amount\":9') WHERE seq = 20")
    victim = node(tmp_path, "t", genesis_path)
    with pytest.raises(RuntimeError) as failure:
        victim.start(ready_timeout=30)
    assert "cannot start the node" in str(failure.value)
    assert "seq=20" in str(failure.value)


def test_equivocation_becomes_a_fraud_proof_everywhere(tmp_path: Path, genesis_path: Path, nodes) -> None:
    cheat = KEYS[2]
    join = chain(cheat, 1)[0]
    left = sign_op(cheat, 2, join.hash, "bond", {"amount": 5}, 1.0e9 + 1)
    right = sign_op(cheat, 2, join.hash, "bond", {"amount": 7}, 1.0e9 + 1)
    store_in(tmp_path / "b", [join, left])
    store_in(tmp_path / "c", [join, right])
    b = node(tmp_path, "b", genesis_path)
    nodes.append(b.start())
    c = node(tmp_path, "c", genesis_path, [b.url])
    nodes.append(c.start())

    def barred_everywhere() -> bool:
        return all(n.balances().get(cheat.node_id, {}).get("barred") for n in (b, c))

    wait_until(barred_everywhere, interval=0.3, what="the cheat barred on both nodes")
    wait_until(lambda: b.balances() == c.balances(), interval=0.3, what="agreement after the fraud")
    frauds = [
        op for n in (b, c) for op in n.get_json("/wwwserve/ledger/ops?limit=100") if op["kind"] == "fraud"
    ]
    assert frauds, "no fraud operation was appended"


def test_cli_verify_offline(tmp_path: Path, genesis_path: Path) -> None:
    import subprocess
    import sys

    data = tmp_path / "v"
    store_in(data, chain(KEYS[3], 50))
    config = tmp_path / "v.yaml"
    config.write_text(f"node:\n  data_dir: {data}\n  network: {genesis_path}\n")
    run = [sys.executable, "-m", "wwwserve_gateway", "ledger", "verify", "--config", str(config)]
    ok = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    with sqlite3.connect(data / "ledger.db") as db:
        db.execute("DELETE FROM ledger_ops WHERE seq = 25")
    bad = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "seq=26" in bad.stderr or "seq=25" in bad.stderr


def test_node_with_its_ledger_in_postgresql(
    tmp_path: Path, genesis_path: Path, postgres_server, nodes
) -> None:
    url = postgres_server.create_database()
    config = {
        "node": {"network": str(genesis_path), "data_dir": str(tmp_path / "pg")},
        "model_list": [],
        "ledger": {"settings": {"database_url": url}},
    }
    keyed(tmp_path / "pg", KEYS[4])
    n = NodeProcess(config, tmp_path, name="pg")
    nodes.append(n.start())
    me = n.own_id()
    mine = n.balances()[me]
    # The default policy bonds part of the grant as stake at start.
    assert mine["liquid"] + mine["bonded"] == GRANT
    n.stop()
    store = LedgerStore(url, GENESIS.network_id)
    try:
        # The join (and the bond) are in PostgreSQL, durable after the node is gone.
        assert [op.kind for op in store.ops(me)][:1] == ["join"]
        assert store.head(me)[0] == 1 + (mine["bonded"] > 0)
    finally:
        store.close()
