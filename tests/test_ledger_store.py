"""The ledger store, against SQLite and a real PostgreSQL server: chain rules, reads, tamper detection,
and crash safety (a writer killed with SIGKILL at random points loses nothing it acknowledged)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import delete, update

from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.plugins.ledger.ops import Operation, sign_op
from wwwserve_gateway.plugins.ledger.store import (
    HEADS,
    OPS,
    ChainError,
    ChainFork,
    LedgerStore,
    TamperedLedger,
    WrongNetwork,
    default_url,
)

if TYPE_CHECKING:  # imported at run time by pytest_plugins, so that pytest can rewrite its asserts
    from tests.postgres import PostgresServer

pytest_plugins = ("tests.postgres",)

NET = "a" * 64


class Chain:
    """Signs the next operations of one author's chain."""

    def __init__(self, identity: NodeIdentity | None = None) -> None:
        self.identity = identity or NodeIdentity.generate()
        self.author = self.identity.node_id
        self.seq, self.hash = 0, ""

    def next(self, n: int = 1, kind: str = "pay") -> list[Operation]:
        out = []
        for _ in range(n):
            op = sign_op(self.identity, self.seq + 1, self.hash, kind, {"n": self.seq + 1}, 1700000000.5)
            self.seq, self.hash = op.seq, op.hash
            out.append(op)
        return out


@pytest.fixture
def store(ledger_url: str) -> Iterator[LedgerStore]:
    s = LedgerStore(ledger_url, NET)
    yield s
    s.close()


def test_append_and_read(store: LedgerStore) -> None:
    a, b = Chain(), Chain()
    first = a.next(3) + b.next(2)
    store.append(first)
    more = a.next(2)
    store.append(more)
    assert store.heads() == {a.author: (5, a.hash), b.author: (2, b.hash)}
    assert store.head(a.author) == (5, a.hash)
    assert store.head("f" * 64) is None
    assert store.count() == 7
    assert [op.seq for op in store.ops(a.author)] == [1, 2, 3, 4, 5]
    assert [op.seq for op in store.ops(a.author, start=2, end=4)] == [2, 3, 4]
    assert [op.seq for op in store.ops(a.author, start=2, limit=2)] == [2, 3]
    got = store.ops(a.author, 4, 5)
    assert got == more  # the decoded operation equals the one appended, raw bytes included
    assert sorted((op.author, op.seq) for op in store.all_ops()) == sorted(
        (op.author, op.seq) for op in first + more
    )
    assert store.verify() == []


def test_redelivered_ops_are_skipped(store: LedgerStore) -> None:
    a = Chain()
    ops = a.next(4)
    store.append(ops[:2])
    store.append(ops)  # 1-2 again, then 3-4
    store.append(ops[1:2] + ops[1:2])
    assert store.head(a.author) == (4, a.hash)
    assert store.count() == 4


def test_conflict_carries_stored_op_and_stores_nothing(store: LedgerStore) -> None:
    a, b = Chain(), Chain()
    ops = a.next(3)
    store.append(ops)
    fork = sign_op(a.identity, 2, ops[0].hash, "pay", {"other": True}, 1.0)
    with pytest.raises(ChainFork) as caught:
        store.append([*b.next(1), fork])
    assert caught.value.stored == ops[1]
    assert caught.value.offered == fork
    assert store.head(b.author) is None  # all or nothing: b's valid op was not kept
    assert store.count() == 3


def test_chain_errors(store: LedgerStore) -> None:
    a = Chain()
    ops = a.next(4)
    with pytest.raises(ChainError, match="head is at seq 0"):
        store.append(ops[1:2])
    store.append(ops[:2])
    with pytest.raises(ChainError, match="head is at seq 2"):
        store.append(ops[3:])  # a gap
    wrong_prev = sign_op(a.identity, 3, ops[0].hash, "pay", {}, 1.0)
    with pytest.raises(ChainError, match="prev"):
        store.append([wrong_prev])
    gap = sign_op(a.identity, 6, ops[3].hash, "pay", {}, 1.0)
    with pytest.raises(ChainError, match="head is at seq 4"):
        store.append([ops[2], ops[3], gap])  # all or nothing: 3 and 4 are not kept either
    assert store.head(a.author) == (2, ops[1].hash)
    assert store.verify() == []


def test_concurrent_writers_share_a_database(ledger_url: str) -> None:
    """Two stores (gateway replicas) delivering the same chains at once: each op is stored once."""
    chains = [Chain() for _ in range(3)]
    ops = [op for c in chains for op in c.next(40)]
    stores = [LedgerStore(ledger_url, NET), LedgerStore(ledger_url, NET)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def deliver(store: LedgerStore) -> None:
        barrier.wait()
        try:
            for i in range(0, len(ops), 6):
                store.append(ops[i : i + 6])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deliver, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert stores[0].count() == len(ops)
    assert stores[1].verify() == []
    for s in stores:
        s.close()


def test_refuses_database_of_another_network(ledger_url: str) -> None:
    LedgerStore(ledger_url, NET).close()
    with pytest.raises(WrongNetwork):
        LedgerStore(ledger_url, "b" * 64)
    LedgerStore(ledger_url, NET).close()


def test_sqlite_is_wal_and_synchronous_full(tmp_path: Path) -> None:
    store = LedgerStore(default_url(tmp_path), NET)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    store.close()
    assert (tmp_path / "ledger.db").exists()


def _tampered(url: str, *statements: object) -> LedgerStore:
    store = LedgerStore(url, NET, check_on_open=False)
    with store.engine.begin() as conn:
        for stmt in statements:
            conn.execute(stmt)  # type: ignore[call-overload]
    return store


def test_tampering_is_named(ledger_url: str) -> None:
    a = Chain()
    store = LedgerStore(ledger_url, NET)
    ops = a.next(20)
    store.append(ops)
    store.close()
    who = f"author={a.author[:8]}.."

    # An edited body deep in the chain: only the full verify reads that row.
    forged = ops[4].raw.replace(b'"n":5', b'"n":9')
    store = _tampered(ledger_url, update(OPS).where(OPS.c.seq == 5).values(raw=forged))
    problems = store.verify()
    assert any(p.startswith(f"ledger_ops row {who} seq=5: its contents are not a valid") for p in problems)
    assert store.verify(tail=8) == []
    store.close()
    LedgerStore(ledger_url, NET).close()  # the fast check on open does not reach seq 5

    # A hash column that does not match its row, in the tail: refused on open.
    store = _tampered(
        ledger_url,
        update(OPS).where(OPS.c.seq == 5).values(raw=ops[4].raw),
        update(OPS).where(OPS.c.seq == 17).values(hash="0" * 64),
    )
    assert f"ledger_ops row {who} seq=17: hash does not match its contents" in store.verify()
    store.close()
    with pytest.raises(TamperedLedger, match=r"seq=17: hash does not match"):
        LedgerStore(ledger_url, NET)

    # A deleted row and a head that moved back.
    store = _tampered(
        ledger_url,
        update(OPS).where(OPS.c.seq == 17).values(hash=ops[16].hash),
        delete(OPS).where(OPS.c.seq == 10),
        update(HEADS).values(seq=19, hash=ops[18].hash),
    )
    problems = store.verify()
    assert f"ledger_ops row {who} seq=11: follows seq 9 (a gap)" in problems
    assert f"ledger_heads row {who}: seq 19, but its last op is seq 20" in problems
    assert f"ledger_ops rows {who}: 19 ops for seqs 1..20" in problems
    store.close()
    with pytest.raises(TamperedLedger):
        LedgerStore(ledger_url, NET)


def test_head_hash_must_match(ledger_url: str) -> None:
    a = Chain()
    store = LedgerStore(ledger_url, NET)
    store.append(a.next(3))
    store.close()
    store = _tampered(ledger_url, update(HEADS).values(hash="1" * 64))
    assert store.verify() == [f"ledger_heads row author={a.author[:8]}..: hash does not match op seq 3"]
    store.close()


def test_batches_spanning_chains_append_whole(store: LedgerStore) -> None:
    """Batches of 100 that start and end mid-chain, four chains one after another: all stored, in order.
    (How fast: benchmarks/ledger_throughput.py, verified appends/s by batch size.)"""
    chains = [Chain() for _ in range(4)]
    ops = [op for c in chains for op in c.next(500)]
    for i in range(0, len(ops), 100):
        store.append(ops[i : i + 100])
    assert store.count() == len(ops)
    assert store.heads() == {c.author: (500, c.hash) for c in chains}
    assert store.verify() == []


WRITER = textwrap.dedent(
    """
    import random, sys, time
    import nacl.signing
    from wwwserve_gateway.network.identity import NodeIdentity
    from wwwserve_gateway.plugins.ledger.ops import sign_op
    from wwwserve_gateway.plugins.ledger.store import LedgerStore

    url, net, *seeds = sys.argv[1:]
    sys.stdin.readline()  # started ahead (imports take most of a second): wait for the go
    ids = [NodeIdentity(nacl.signing.SigningKey(bytes.fromhex(s))) for s in seeds]
    store = LedgerStore(url, net)
    heads = [store.head(i.node_id) or (0, "") for i in ids]
    print("ready", flush=True)
    rng = random.Random()
    while True:
        batch = []
        for _ in range(rng.choice([1, 1, 3, 20, 100])):
            k = rng.randrange(len(ids))
            seq, prev = heads[k]
            body = {"n": seq + 1, "pad": "x" * rng.randrange(2000)}
            op = sign_op(ids[k], seq + 1, prev, "pay", body, time.time())
            heads[k] = (op.seq, op.hash)
            batch.append(op)
        store.append(batch)
        # Acknowledged only now that append has returned: each author's head after this batch.
        print(" ".join(f"{k}:{s}:{h}" for k, (s, h) in enumerate(heads)), flush=True)
    """
)


def _read_lines(stream: Iterable[str], into: list[str]) -> None:
    into.extend(stream)


def _spawn(command: list[str]) -> subprocess.Popen[str]:
    pipe = subprocess.PIPE
    return subprocess.Popen(command, stdin=pipe, stdout=pipe, stderr=pipe, text=True)


def _crash_rounds(tmp_path: Path, url: str, kills: int, crash_server: PostgresServer | None = None) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    ids = [NodeIdentity.generate() for _ in range(3)]
    seeds = [bytes(i.signing_key).hex() for i in ids]
    acked: dict[int, tuple[int, str]] = {}
    rng = random.Random(1234)
    command = [sys.executable, str(script), url, NET, *seeds]
    upcoming = _spawn(command)
    for round_ in range(kills):
        proc = upcoming
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        # The next writer imports while this one runs; it opens the store only when told to.
        upcoming = _spawn(command)
        ready = proc.stdout.readline()
        assert ready == "ready\n", ready + proc.communicate()[1]
        lines: list[str] = []
        reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines))
        reader.start()
        time.sleep(rng.uniform(0.01, 0.3))
        if crash_server is not None and round_ == kills - 1:
            crash_server.stop("immediate")  # the server crashes under the writer: WAL recovery
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join()
        if crash_server is not None and round_ == kills - 1:
            crash_server.start()
        for line in lines:
            if line.endswith("\n"):  # a line cut by the kill was never acknowledged
                for item in line.split():
                    k, seq, hash_ = item.split(":")
                    if int(seq):
                        acked[int(k)] = (int(seq), hash_)
        store = LedgerStore(url, NET)  # the fast check on open passes after every crash
        for k, (seq, hash_) in acked.items():
            head = store.head(ids[k].node_id)
            assert head is not None and head[0] >= seq, f"round {round_}: lost acked seq {seq}"
            assert [op.hash for op in store.ops(ids[k].node_id, seq, seq)] == [hash_]
        store.close()
    upcoming.kill()
    upcoming.communicate()
    store = LedgerStore(url, NET)
    assert store.verify() == []
    assert store.count() == sum(seq for seq, _ in store.heads().values())
    assert sum(seq for seq, _ in acked.values()) > kills  # the writer got real work done
    store.close()


def test_crash_safety_sqlite(tmp_path: Path) -> None:
    _crash_rounds(tmp_path, default_url(tmp_path), kills=20)


def test_crash_safety_postgres(tmp_path: Path, postgres_server: PostgresServer) -> None:
    _crash_rounds(tmp_path, postgres_server.create_database(), kills=6, crash_server=postgres_server)


def test_one_process_per_author_on_postgresql(postgres_server: PostgresServer) -> None:
    from wwwserve_gateway.plugins.ledger.store import AuthorInUse

    url = postgres_server.create_database()
    first, second = LedgerStore(url, NET), LedgerStore(url, NET)
    try:
        first.hold_author("a" * 64)
        with pytest.raises(AuthorInUse, match="two processes with one identity"):
            second.hold_author("a" * 64)
        second.hold_author("b" * 64)  # replicas of other identities share the database
        first.close()
        third = LedgerStore(url, NET)
        third.hold_author("a" * 64)  # released with its holder's connection
        third.close()
    finally:
        first.close()
        second.close()
