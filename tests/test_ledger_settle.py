"""Payments by the ledger plugin, against SQLite and a real PostgreSQL server: debts are durable when
settle returns, paid in batches (by count, by time window, at stop), one pay operation per flush with
one payment per executor, exactly once across crashes (simulated, and a real SIGKILL)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import signal
import sys
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from prometheus_client import CollectorRegistry

from tests.fakes.plugins import node_api
from tests.support import until
from wwwserve_gateway.network.genesis import LedgerParams, NetworkGenesis
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.network.receipts import InvalidReceipt, sign_receipt
from wwwserve_gateway.overlay.overlay import Overlay
from wwwserve_gateway.plugin_api import NodeAPI, PluginSettings
from wwwserve_gateway.plugins.gossip.swim import SwimGossip
from wwwserve_gateway.plugins.ledger.chains import ChainLedger, ChainSettings, debt_row
from wwwserve_gateway.plugins.ledger.fold import Balances
from wwwserve_gateway.plugins.ledger.ops import Operation
from wwwserve_gateway.plugins.ledger.rules import MICRO, payment_amount, price_micro, receipt_key
from wwwserve_gateway.plugins.ledger.store import LedgerStore, default_url

pytest_plugins = ("tests.postgres",)

ROOT = Path(__file__).resolve().parent.parent
PRICE_PER_REQUEST = 0.5
PRICE_PER_1K = 0.3


# The node whose debts every test settles, funded by the genesis; the same key in every process (the
# crash test runs one in a child).
ENTRY = NodeIdentity(nacl.signing.SigningKey(hashlib.sha256(b"settle-test entry").digest()))


def genesis(window: float = 3600.0, batch: int = 100, grant: int = 1000) -> NetworkGenesis:
    return NetworkGenesis(
        name="settle-test",
        ledger=LedgerParams(
            allocations={ENTRY.node_id: grant},
            price_per_request=PRICE_PER_REQUEST,
            price_per_1k_tokens=PRICE_PER_1K,
            payment_batch_window_s=window,
            payment_batch_max=batch,
        ),
    )


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def receipt(
    executor: NodeIdentity, entry: str, n: int, tokens: int = 30, *, net: NetworkGenesis
) -> dict[str, Any]:
    """A receipt of `executor` for request number `n` of `entry`, in network `net`."""
    return sign_receipt(
        executor,
        net=net.network_id,
        entry=entry,
        request=h(f"request {n}"),
        response=h(f"response {n} of {executor.node_id}"),
        model="m",
        prompt_tokens=tokens // 3,
        completion_tokens=tokens - tokens // 3,
        started=1.7e9 + n,
        finished=1.7e9 + n + 0.5,
    )


def ledger_node(identity: NodeIdentity, net: NetworkGenesis, data_dir: Path) -> NodeAPI:
    """What a node gives its ledger: a real overlay (not started) and gossip plugin (not started)."""
    registry = CollectorRegistry(auto_describe=True)
    return node_api(
        identity=identity,
        genesis=net,
        overlay=Overlay(identity, net.network_id, metrics=registry),
        metrics=registry,
        public_url="http://127.0.0.1:9",
        data_dir=data_dir,
        gossip=lambda api: SwimGossip(api, PluginSettings()),
    )


def crash(ledger: ChainLedger) -> None:
    """What a killed process leaves: no stop, no flush; only what is on disk survives."""
    ledger._stopped = True
    ledger._disarm_flush()
    ledger.store.close()


def pay_ops(store: LedgerStore, author: str) -> list[Operation]:
    return [op for op in store.ops(author, 1, None, 100_000) if op.kind == "pay"]


def paid_keys(ops: list[Operation]) -> Counter[tuple[str, str, str]]:
    return Counter(
        receipt_key(r["body"]) for op in ops for payment in op.body["payments"] for r in payment["receipts"]
    )


def price(r: dict[str, Any]) -> float:
    return price_micro(r["body"], genesis().ledger) / MICRO


class Ledgers:
    """Builds ledgers of one node identity on one database; stops those still running at teardown."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url = url
        self.data_dir = data_dir
        self.me = ENTRY
        self.open: list[ChainLedger] = []

    async def start(self, net: NetworkGenesis) -> ChainLedger:
        ledger = ChainLedger(ledger_node(self.me, net, self.data_dir), ChainSettings(database_url=self.url))
        self.open.append(ledger)
        await ledger.start()
        return ledger

    async def stop(self, ledger: ChainLedger) -> None:
        self.open.remove(ledger)
        await ledger.stop()

    def crash(self, ledger: ChainLedger) -> None:
        self.open.remove(ledger)
        crash(ledger)

    def store(self, net: NetworkGenesis) -> LedgerStore:
        return LedgerStore(self.url, net.network_id)


@pytest.fixture
async def ledgers(ledger_url: str, tmp_path: Path) -> AsyncIterator[Ledgers]:
    made = Ledgers(ledger_url, tmp_path)
    yield made
    for ledger in list(made.open):
        await made.stop(ledger)


EXECUTORS = [NodeIdentity.generate() for _ in range(3)]


async def test_batches_by_count_one_payment_per_executor(ledgers: Ledgers) -> None:
    net = genesis(batch=4)
    ledger = await ledgers.start(net)
    me = ledgers.me.node_id
    receipts = [receipt(EXECUTORS[n % 3], me, n, tokens=10 * n, net=net) for n in range(11)]
    for r in receipts[:3]:
        await ledger.settle(r)
    assert ledger.pending_receipts == 3 and pay_ops(ledger.store, me) == []  # below the count
    await ledger.settle(receipts[3])  # the 4th: a flush, in the background
    await until(lambda: len(pay_ops(ledger.store, me)) == 1, what="the first batch paid")
    await until(lambda: ledger.pending_receipts == 0, what="the first batch gone from pending")
    for r in receipts[4:8]:
        await ledger.settle(r)
    await until(lambda: len(pay_ops(ledger.store, me)) == 2, what="the second batch paid")
    for r in receipts[8:]:
        await ledger.settle(r)
    assert ledger.pending_receipts == 3
    await ledgers.stop(ledger)  # stop pays what is pending

    store = ledgers.store(net)
    try:
        ops = pay_ops(store, me)
        assert [sum(len(p["receipts"]) for p in op.body["payments"]) for op in ops] == [4, 4, 3]
        for op, batch in zip(ops, (receipts[0:4], receipts[4:8], receipts[8:]), strict=True):
            # One payment per executor, its amount the genesis price of its receipts.
            by_executor: dict[str, list[dict[str, Any]]] = {}
            for r in batch:
                by_executor.setdefault(r["body"]["id"], []).append(r)
            assert [p["to"] for p in op.body["payments"]] == sorted(by_executor)
            for payment in op.body["payments"]:
                assert payment["receipts"] == by_executor[payment["to"]]
                assert payment["amount"] == payment_amount(payment["items"], net.ledger)
                expected = sum(
                    PRICE_PER_REQUEST
                    + PRICE_PER_1K * r["body"]["prompt_tokens"] / 1000
                    + PRICE_PER_1K * r["body"]["completion_tokens"] / 1000
                    for r in payment["receipts"]
                )
                assert payment["amount"] == pytest.approx(expected, abs=1e-6)
        assert paid_keys(ops) == Counter(receipt_key(r["body"]) for r in receipts)
        assert store.pending(me) == []
        # Balances folded from the database: the entry paid each executor its receipts' price.
        folded = Balances.fold(list(store.all_ops()), net.ledger, net.network_id)
        total = sum(price(r) for r in receipts)
        assert folded.account(me).liquid == pytest.approx(1000 - total, abs=1e-6)
        for executor in EXECUTORS:
            earned = sum(price(r) for r in receipts if r["body"]["id"] == executor.node_id)
            assert folded.account(executor.node_id).liquid == pytest.approx(earned, abs=1e-6)
    finally:
        store.close()


async def test_batches_by_window(ledgers: Ledgers) -> None:
    window = 0.3
    net = genesis(window=window)
    ledger = await ledgers.start(net)
    me = ledgers.me.node_id
    receipts = [receipt(EXECUTORS[n % 2], me, n, net=net) for n in range(3)]
    started = time.monotonic()
    for r in receipts:
        await ledger.settle(r)
    assert ledger.pending_receipts == 3
    assert pay_ops(ledger.store, me) == []  # nothing before the window
    await until(lambda: len(pay_ops(ledger.store, me)) == 1, what="the window's batch paid")
    assert time.monotonic() - started >= window
    await until(lambda: ledger.pending_receipts == 0, what="pending emptied")
    [op] = pay_ops(ledger.store, me)
    assert len(op.body["payments"]) == 2
    assert paid_keys([op]) == Counter(receipt_key(r["body"]) for r in receipts)
    # A later receipt opens a new window: paid by a second operation.
    await ledger.settle(receipt(EXECUTORS[2], me, 99, net=net))
    await until(lambda: len(pay_ops(ledger.store, me)) == 2, what="the second window's batch paid")
    assert ledger.store.pending(me) == []


async def test_pending_debts_survive_a_crash_and_are_paid_once(ledgers: Ledgers) -> None:
    net = genesis()
    me = ledgers.me.node_id
    receipts = [receipt(EXECUTORS[n % 3], me, n, net=net) for n in range(5)]
    first = await ledgers.start(net)
    for r in receipts:
        await first.settle(r)
    assert first.can_delegate(me)
    ledgers.crash(first)

    store = ledgers.store(net)
    try:
        assert len(store.pending(me)) == 5 and pay_ops(store, me) == []
    finally:
        store.close()

    second = await ledgers.start(net)  # loads the debts and pays them
    ops = pay_ops(second.store, me)
    assert len(ops) == 1
    assert paid_keys(ops) == Counter(receipt_key(r["body"]) for r in receipts)
    assert second.pending_receipts == 0 and second.store.pending(me) == []
    assert second.payments == 5
    assert second.account(me).liquid == pytest.approx(1000 - sum(price(r) for r in receipts), abs=1e-6)
    # The same receipts settled again (an app retrying after the crash) are not paid twice.
    for r in receipts:
        await second.settle(r)
    assert second.pending_receipts == 0
    await ledgers.stop(second)

    third = await ledgers.start(net)
    assert third.pending_receipts == 0
    assert paid_keys(pay_ops(third.store, me)) == Counter(receipt_key(r["body"]) for r in receipts)
    assert len(pay_ops(third.store, me)) == 1
    await ledgers.stop(third)


async def test_a_pending_row_already_paid_is_dropped_without_paying(ledgers: Ledgers) -> None:
    net = genesis()
    me = ledgers.me.node_id
    r = receipt(EXECUTORS[0], me, 1, net=net)
    first = await ledgers.start(net)
    await first.settle(r)
    await ledgers.stop(first)  # paid at stop
    store = ledgers.store(net)
    try:
        # A leftover row for the paid receipt (as a replica sharing the database could leave).
        paid = (r["body"]["prompt_tokens"], r["body"]["completion_tokens"])
        assert store.add_pending(receipt_key(r["body"]), debt_row(r, paid), time.time())
    finally:
        store.close()
    second = await ledgers.start(net)
    assert second.pending_receipts == 0 and second.store.pending(me) == []
    assert len(pay_ops(second.store, me)) == 1  # no second pay operation
    assert second.payments == 0


async def test_duplicates_are_ignored(ledgers: Ledgers) -> None:
    net = genesis(batch=3)
    ledger = await ledgers.start(net)
    me = ledgers.me.node_id
    a, b = (
        receipt(EXECUTORS[0], me, 1, net=net),
        receipt(EXECUTORS[1], me, 1, net=net),
    )  # one request, two executors
    await asyncio.gather(*(ledger.settle(a) for _ in range(5)))
    await ledger.settle(json.loads(json.dumps(a)))  # an equal copy
    assert ledger.pending_receipts == 1 and len(ledger.store.pending(me)) == 1
    await ledger.settle(b)  # a duel's second executor: another debt
    assert ledger.pending_receipts == 2
    await ledgers.stop(ledger)
    store = ledgers.store(net)
    try:
        ops = pay_ops(store, me)
        assert len(ops) == 1 and len(ops[0].body["payments"]) == 2
        assert paid_keys(ops) == Counter([receipt_key(a["body"]), receipt_key(b["body"])])
    finally:
        store.close()


async def test_can_delegate_counts_own_pending_debts(ledgers: Ledgers) -> None:
    # A grant of 2 credits; each receipt costs 0.5 + 0.3 * 30 / 1000 = 0.509. A node delegates while
    # what it holds, less what it owes, still pays one more request at the base price (0.5).
    net = genesis(grant=2)
    ledger = await ledgers.start(net)
    me = ledgers.me.node_id
    receipts = [receipt(EXECUTORS[n % 3], me, n, net=net) for n in range(4)]
    for r in receipts[:2]:
        await ledger.settle(r)
    assert ledger.owed == pytest.approx(2 * 0.509)
    assert ledger.account(me).liquid == 2  # not paid yet
    assert ledger.can_delegate(me)  # 2 - 1.018 >= 0.5
    await ledger.settle(receipts[2])
    assert not ledger.can_delegate(me)  # 2 - 1.527 < 0.5
    await ledger.settle(receipts[3])  # delegated anyway (a debt it cannot fully pay)
    assert ledger.account(me).liquid == 2
    # Other nodes: only a bar stops them (an executor that never joined holds 0).
    assert ledger.can_delegate(EXECUTORS[0].node_id)
    await ledgers.stop(ledger)

    again = await ledgers.start(net)
    # It paid what it held and no more: the last executor paid is short of 0.036.
    assert again.account(me).liquid == 0
    assert not again.can_delegate(me)
    earned = sum(again.account(x.node_id).liquid for x in EXECUTORS)
    assert earned == pytest.approx(2, abs=1e-6)
    # The ledger's balances agree with a fold of what the database holds.
    now = time.time()
    folded = Balances.fold(list(again.store.all_ops()), net.ledger, net.network_id)
    assert again.balances.view(now) == folded.view(now)


async def test_settle_refuses_receipts_that_are_not_this_nodes_debt(ledgers: Ledgers) -> None:
    net = genesis()
    ledger = await ledgers.start(net)
    me = ledgers.me.node_id
    with pytest.raises(InvalidReceipt):
        await ledger.settle(receipt(EXECUTORS[0], EXECUTORS[1].node_id, 1, net=net))  # another entry's
    with pytest.raises(InvalidReceipt):
        await ledger.settle(receipt(ledgers.me, me, 1, net=net))  # its own work
    forged = receipt(EXECUTORS[0], me, 1, net=net)
    forged["body"]["completion_tokens"] += 1
    with pytest.raises(InvalidReceipt):
        await ledger.settle(forged)
    assert ledger.pending_receipts == 0 and ledger.store.pending(me) == []


async def test_metrics(ledgers: Ledgers) -> None:
    net = genesis(batch=2)
    ledger = await ledgers.start(net)
    me = ledgers.me.node_id
    registry = ledger.node.metrics
    await ledger.settle(receipt(EXECUTORS[0], me, 1, net=net))
    assert registry.get_sample_value("wwwserve_ledger_pending_receipts") == 1
    assert registry.get_sample_value("wwwserve_ledger_payments_total") == 0
    await ledger.settle(receipt(EXECUTORS[1], me, 2, net=net))
    await until(lambda: ledger.pending_receipts == 0, what="the batch paid")
    assert registry.get_sample_value("wwwserve_ledger_pending_receipts") == 0
    assert registry.get_sample_value("wwwserve_ledger_payments_total") == 2


async def test_concurrent_settles_pay_each_receipt_once(ledgers: Ledgers) -> None:
    net = genesis(window=0.05, batch=5)
    ledger = await ledgers.start(net)
    me = ledgers.me.node_id
    receipts = [receipt(EXECUTORS[n % 3], me, n, net=net) for n in range(40)]
    doubled = receipts + random.Random(1).sample(receipts, 20)
    await asyncio.gather(*(ledger.settle(r) for r in doubled))
    await until(lambda: ledger.pending_receipts == 0, what="everything paid")
    ops = pay_ops(ledger.store, me)
    assert all(sum(len(p["receipts"]) for p in op.body["payments"]) <= 5 for op in ops)
    assert paid_keys(ops) == Counter(receipt_key(r["body"]) for r in receipts)
    assert ledger.store.pending(me) == []


# -- a real crash: the settling process is killed with SIGKILL ----------------------------------------

CRASH_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    import structlog
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout is for acks
    from tests.test_ledger_settle import ENTRY, genesis, ledger_node, receipt
    from wwwserve_gateway.network.identity import NodeIdentity
    from wwwserve_gateway.plugins.ledger.chains import ChainLedger, ChainSettings

    url, data_dir = sys.argv[1], Path(sys.argv[2])
    me = ENTRY
    executors = [NodeIdentity.generate() for _ in range(3)]
    net = genesis(window=0.01, batch=3)

    async def main():
        # Small batches and a short window: payments run all the time, the kill lands anywhere.
        ledger = ChainLedger(ledger_node(me, net, data_dir), ChainSettings(database_url=url))
        await ledger.start()
        n = 0
        while True:
            r = receipt(executors[n % 3], me.node_id, n, net=net)
            await ledger.settle(r)
            print(json.dumps(r), flush=True)  # acknowledged: settle returned
            n += 1

    asyncio.run(main())
    """
)


async def test_debts_acknowledged_before_sigkill_are_paid_exactly_once(
    ledger_url: str, tmp_path: Path
) -> None:
    net = genesis(window=0.01, batch=3)
    data_dir = tmp_path / "node"
    acknowledged: list[dict[str, Any]] = []
    for round_ in range(3):  # several kills on the same database
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CRASH_SCRIPT,
            ledger_url,
            str(data_dir),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        want = random.Random(round_).randint(10, 40)
        for _ in range(want):
            async with asyncio.timeout(60):
                line = await proc.stdout.readline()
            if not line:
                await proc.wait()
                raise AssertionError(f"the settling process died: {(await proc.stderr.read()).decode()}")
            acknowledged.append(json.loads(line))
        proc.send_signal(signal.SIGKILL)
        await proc.wait()

    me = ENTRY
    ledger = ChainLedger(ledger_node(me, net, data_dir), ChainSettings(database_url=ledger_url))
    await ledger.start()  # pays what the kills left pending
    try:
        paid = paid_keys(pay_ops(ledger.store, me.node_id))
        assert ledger.store.pending(me.node_id) == []
        assert all(count == 1 for count in paid.values()), "a receipt was paid twice"
        missing = [r for r in acknowledged if receipt_key(r["body"]) not in paid]
        assert not missing, f"{len(missing)} acknowledged debts were lost"
        assert len(paid) >= len(acknowledged)  # plus, at most, one settled but not acknowledged per kill
        assert len(paid) <= len(acknowledged) + 3
    finally:
        await ledger.stop()


def test_a_pending_write_leaves_ledger_commits_fully_synchronous(tmp_path: Path) -> None:
    """Debts are written without an fsync of their own; the connection they used must go back to
    the pool with synchronous=FULL, or later ledger operations would lose their power-cut safety."""
    net = genesis()
    store = LedgerStore(default_url(tmp_path), net.network_id)
    try:
        entry, executor = NodeIdentity.generate(), NodeIdentity.generate()
        for n in range(3):
            signed = receipt(executor, entry.node_id, n, net=net)
            key = (executor.node_id, entry.node_id, signed["body"]["request"])
            assert store.add_pending(key, json.dumps(signed).encode(), time.time())
        with store.engine.connect() as conn:
            assert conn.connection.driver_connection.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        store.close()
