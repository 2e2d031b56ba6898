"""The built-in ledger plugin: per-author signed chains, replicated by gossip, folded into balances.

- Own operations are signed, stored durably, then folded (an acknowledged operation is on disk).
- Replication: a gossip delegate carries a constant-size digest, 64 hashes over buckets of authors'
  `(seq, head hash)`. For the buckets that differ, the peer's heads are fetched ("ledger.heads");
  where it is ahead on a chain, the missing range is pulled ("ledger.range"), and every operation is
  verified (signature, chain links, kind rules) and stored in one transaction.
- A peer whose head differs from ours at the same seq has seen an equivocation: both operations are
  fetched and a `fraud` operation carrying them is appended to our own chain.
- Payments: `settle(receipt)` records a debt in `ledger_pending` (durable before it returns). Debts
  are paid in batches, one `pay` operation per flush (one payment per executor): when
  `payment_batch_max` receipts are pending, `payment_batch_window_s` after the first pending one, on
  `stop()`, and on `start()` for debts a crash left behind. The pay operation and the deletion of the
  pending rows it covers are one transaction, so a debt is paid exactly once whenever the node dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import Field

from wwwserve_gateway.network.canonical import canonical
from wwwserve_gateway.network.genesis import NetworkGenesis
from wwwserve_gateway.network.identity import verify
from wwwserve_gateway.network.receipts import InvalidReceipt, check_receipt
from wwwserve_gateway.plugin_api.base import PluginSettings
from wwwserve_gateway.plugin_api.gossip import GossipDelegate
from wwwserve_gateway.plugin_api.ledger import Account, LedgerPlugin
from wwwserve_gateway.plugin_api.node import NodeAPI
from wwwserve_gateway.plugins.ledger.fold import Balances
from wwwserve_gateway.plugins.ledger.ops import MAX_OP_BYTES, InvalidOperation, Operation, sign_op
from wwwserve_gateway.plugins.ledger.rules import (
    MICRO,
    batch_body,
    check_op,
    item_price_micro,
    payment_amount,
    receipt_key,
    to_micro,
)
from wwwserve_gateway.plugins.ledger.store import (
    ChainError,
    ChainFork,
    LedgerStore,
    PendingGone,
    ReceiptKey,
    default_url,
)
from wwwserve_gateway.plugins.ledger.verify import Verifier

log = structlog.get_logger(__name__)

RANGE_KIND = "ledger.range"
HEADS_KIND = "ledger.heads"
COUNTERSIGN_KIND = "ledger.countersign"
ANNOUNCE_KIND = "ledger.announce"
# An executor that does not countersign within this is paid by its receipts (the long form).
COUNTERSIGN_TIMEOUT_S = 5.0
BUCKETS = 64
RANGE_LIMIT = 1000
# A range answer must fit one overlay frame (1 MiB); receipt-laden pay operations run to a few KB.
RANGE_MAX_BYTES = 512 * 1024
PULL_TIMEOUT_S = 30.0
HEADS_VIEW_TIMEOUT_S = 2.0  # the dashboard's replication lag: a peer slower than this shows none
# Pulled ranges usually sort before operations already folded, and each would force a full refold
# (seconds at 100,000 operations): they are stored at once and folded together when no pull is left
# running, and at least this long after the last append.
REFOLD_AFTER_S = 0.2
# A pulled range longer than this is a catch-up: stored now, folded in one go when pulls drain.
INCREMENTAL_MAX = 100
# Room left in a pay operation for everything but its receipts (payments' `to` and `amount`, the op).
PAY_OVERHEAD_BYTES = 1024
PAY_BYTES_PER_PAYMENT = 160


@dataclass(frozen=True, slots=True)
class _Debt:
    receipt: dict[str, Any]  # the signed receipt
    paid: tuple[int, int]  # the (prompt, completion) tokens paid: at most the receipt's
    size: int  # bytes of its canonical encoding
    price: int  # micro-credits
    since: float  # event-loop time it became pending here

    @property
    def item(self) -> list[Any]:
        return [self.receipt["body"]["request"], *self.paid]


def debt_row(receipt: dict[str, Any], paid: tuple[int, int]) -> bytes:
    """What a pending debt is stored as: the receipt, and the tokens this node pays of it."""
    return canonical({"receipt": receipt, "paid": list(paid)})


class ChainSettings(PluginSettings):
    database_url: str | None = Field(
        None,
        description="an SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db (default: SQLite in the data dir)",
    )
    verify_workers: int | None = Field(
        None, ge=1, description="processes that verify a catch-up (default: one per CPU; 1: a thread)"
    )


class ChainLedger(LedgerPlugin, GossipDelegate):
    Settings = ChainSettings
    settings: ChainSettings

    def __init__(self, node: NodeAPI, settings: ChainSettings) -> None:
        super().__init__(node, settings)
        self.params = node.genesis.ledger
        workers = settings.verify_workers
        # Opening re-verifies each chain's latest operations: a tampered database stops the node
        # here, with the offending rows named.
        self.store = LedgerStore(settings.database_url or default_url(node.data_dir), node.genesis.network_id)
        try:
            self.store.hold_author(node.node_id)
            # Every row's links now (cheap: a flipped byte stops the node here, naming the row);
            # signatures in the background once running (see start).
            self._stored: list[Operation] | None = self.store.linked_ops()
        except Exception:
            self.store.close()
            raise
        self._signatures_checked = False
        self._checking: asyncio.Task[None] | None = None
        self.net = node.genesis.network_id
        self.balances = Balances(self.params, self.net)
        self._lock = asyncio.Lock()
        self._pulling: dict[str, asyncio.Task[None]] = {}  # by "peer:author"
        self._refold: asyncio.TimerHandle | None = None
        self._stale = False  # operations stored but not yet folded
        self._refolding: asyncio.Task[None] | None = None
        # Debts of this node not paid yet, oldest first: a mirror of its `ledger_pending` rows.
        self._pending: dict[ReceiptKey, _Debt] = {}
        self._owed = 0  # micro-credits: the sum of the pending debts' prices
        self.payments = 0  # receipts paid by this process's pay operations
        self.rejected: Counter[str] = Counter()  # peers' operations refused, by reason
        self._flush_lock = asyncio.Lock()
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._stopped = False
        self._verifier = Verifier(self.params, self.net, workers)
        self._to_record: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._recording: asyncio.Task[None] | None = None
        node.metrics.register(_LedgerCollector(self))

    @classmethod
    def verify_offline(
        cls, settings: ChainSettings, data_dir: Path, genesis: NetworkGenesis, location: str | None = None
    ) -> tuple[str, list[str]]:
        """Re-check a whole stored ledger without a running node: signatures, hashes, links, heads."""
        url = location or settings.database_url or default_url(data_dir)
        store = LedgerStore(url, genesis.network_id, check_on_open=False)
        try:
            return url, store.verify()
        finally:
            store.close()

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        overlay = self.node.overlay
        overlay.on_request(RANGE_KIND, self._serve_range)
        overlay.on_request(HEADS_KIND, self._serve_heads)
        overlay.on_request(COUNTERSIGN_KIND, self._serve_countersign)
        overlay.on_request(ANNOUNCE_KIND, self._serve_announce)
        ops, self._stored = self._stored or [], None
        self.balances = await asyncio.to_thread(Balances.fold, ops, self.params, self.net)
        del ops
        self._checking = asyncio.create_task(self._check_signatures())
        if self.store.head(self.node.identity.node_id) is None:
            grant = self.params.allocations.get(self.node.node_id, 0)
            await self.append_own("join", {"grant": grant})
        self.node.gossip.add_delegate("ledger", self)
        # Debts a crash left behind (recorded, never paid) are paid now.
        await self._load_pending()
        if self._pending:
            try:
                await self._flush()
            except Exception as exc:
                log.warning("paying pending receipts failed; retrying later", error=str(exc))
                self._arm_flush(self.params.payment_batch_window_s)

    async def drain(self, within_s: float) -> None:
        """Pay the pending debts, then announce this node's head to every live peer, each of which
        pulls what it lacks before it answers: a payment made on the way out reaches the network
        before this node is gone (gossip would carry it a sync round later, too late)."""
        try:
            async with asyncio.timeout(within_s):
                await self._flush()
                head = self.store.head(self.node.node_id)
                peers = [p.id for p in self.node.gossip.peers() if p.alive and p.id != self.node.node_id]
                if head is None or not peers:
                    return
                body = {"author": self.node.node_id, "seq": head[0], "head": head[1]}
                answers = await asyncio.gather(
                    *(self.node.overlay.request(p, ANNOUNCE_KIND, body, timeout=within_s) for p in peers),
                    return_exceptions=True,
                )
                caught_up = sum(isinstance(a, dict) and a.get("seq") == head[0] for a in answers)
                log.info("ledger handed over", head=head[0], peers=len(peers), caught_up=caught_up)
        except TimeoutError:
            log.warning("ledger hand-over cut short at the stop deadline", within_s=within_s)
        except Exception as exc:  # still on disk: it goes out when the node is back
            log.warning("ledger hand-over failed", error=str(exc))

    async def _check_signatures(self) -> None:
        """Every stored operation's signature, off the event loop. Until it is done this node serves
        no ledger data (a peer asks again on its next sync); if it fails, it never does."""
        started = time.perf_counter()
        problems = await asyncio.to_thread(self.store.verify)
        if problems:
            log.error("the stored ledger fails verification: serving none of it", problems=problems[:20])
            return
        self._signatures_checked = True
        log.info("stored ledger verified", seconds=round(time.perf_counter() - started, 3))

    def _require_checked(self) -> None:
        if not self._signatures_checked:
            raise ValueError("this node's stored ledger is still being verified; ask again later")

    async def _serve_announce(self, peer_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """A peer about to leave names its own head: pull what is missing of its chain, then say
        where this node's copy stands. Only the announcer's own chain, from the announcer."""
        author, seq = body.get("author"), body.get("seq")
        if author != peer_id or not isinstance(seq, int):
            raise ValueError("ledger.announce takes {author: the sender's own id, seq: int}")
        head = self.store.head(author)
        if head is None or head[0] < seq:
            await asyncio.shield(self._schedule_pull(peer_id, author))
            head = self.store.head(author)
        return {"seq": head[0] if head else 0}

    async def stop(self) -> None:
        self._stopped = True
        self._disarm_flush()
        if self._flushing is not None:
            with contextlib.suppress(Exception):
                await self._flushing
        try:
            await self._flush()
        except Exception as exc:  # still on disk: paid on the next start
            log.warning("paying pending receipts at stop failed", pending=len(self._pending), error=str(exc))
        if self._refold is not None:
            self._refold.cancel()
        if self._refolding is not None:
            self._refolding.cancel()
        if self._checking is not None:
            self._checking.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._checking
        self._verifier.close()
        await asyncio.to_thread(self.store.close)

    # -- own chain -----------------------------------------------------------------------------------
    async def append_own(self, kind: str, body: dict[str, Any]) -> Operation:
        """Sign, store durably, then fold an operation of this node's own chain."""
        return await self._append_own(kind, body)

    async def _append_own(
        self, kind: str, body: dict[str, Any], settled: Iterable[ReceiptKey] = ()
    ) -> Operation:
        """append_own; the pending receipts `settled` leave `ledger_pending` in the same transaction."""
        me = self.node.identity
        async with self._lock:
            head = self.store.head(me.node_id)
            seq, prev = (head[0] + 1, head[1]) if head else (1, "")
            op = sign_op(me, seq, prev, kind, body, round(time.time(), 3))
            check_op(op, self.params, self.net)
            await asyncio.to_thread(self.store.append, [op], list(settled))
            self.balances.add(op)
        return op

    # -- payments ------------------------------------------------------------------------------------
    async def settle(self, receipt: dict[str, Any], paid: tuple[int, int] | None = None) -> None:
        """Owe the executor of a signed receipt naming this node as entry; paid in a later batch,
        for `paid` (prompt, completion) tokens (default: what the receipt claims; never more).

        When settle returns the debt is committed (see LedgerStore.add_pending). Settling a
        receipt again (pending or paid) does nothing. Raises InvalidReceipt for a receipt that is
        not valid, or not this node's to pay.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._to_record.append((receipt, paid, future))
        if self._recording is None or self._recording.done():
            self._recording = asyncio.get_running_loop().create_task(self._record_queued())
        await future

    async def _record_queued(self) -> None:
        """Group commit: every receipt queued meanwhile is checked and written in one transaction,
        on one worker-thread trip (each trip costs about as much CPU as a write)."""
        while self._to_record:
            batch, self._to_record = self._to_record, []
            try:
                checked = await asyncio.to_thread(self._record_debts, [(r, p) for r, p, _ in batch])
            except Exception as exc:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            paid_meanwhile = []
            for (receipt, _, future), result in zip(batch, checked, strict=True):
                if isinstance(result, InvalidReceipt):
                    if not future.done():
                        future.set_exception(result)
                    continue
                key, paid, size, price = result
                if self._is_paid(key):  # already paid: it is not a debt
                    paid_meanwhile.append(key)
                elif key not in self._pending:  # (a duplicate is ignored)
                    self._add_debt(key, receipt, paid, size, price)
                if not future.done():
                    future.set_result(None)
            if paid_meanwhile:
                await asyncio.to_thread(self.store.drop_pending, paid_meanwhile)

    def _record_debts(
        self, debts: list[tuple[dict[str, Any], tuple[int, int] | None]]
    ) -> list[tuple[ReceiptKey, tuple[int, int], int, int] | InvalidReceipt]:
        checked: list[tuple[ReceiptKey, tuple[int, int], int, int] | InvalidReceipt] = []
        rows = []
        now = time.time()
        for receipt, paid in debts:
            try:
                key, paid, raw, price = self._check_debt(receipt, paid)
            except InvalidReceipt as exc:
                checked.append(exc)
                continue
            rows.append((key, raw, now))
            checked.append((key, paid, len(raw), price))
        self.store.add_pending_many(rows)
        return checked

    def _check_debt(
        self, receipt: dict[str, Any], paid: tuple[int, int] | None
    ) -> tuple[ReceiptKey, tuple[int, int], bytes, int]:
        body = check_receipt(receipt, self.net)
        me = self.node.node_id
        if body["entry"] != me:
            raise InvalidReceipt("the receipt names another entry node: not this node's debt")
        if body["id"] == me:
            raise InvalidReceipt("a receipt signed by this node: a node does not pay itself")
        claimed = (body["prompt_tokens"], body["completion_tokens"])
        paid = claimed if paid is None else (min(paid[0], claimed[0]), min(paid[1], claimed[1]))
        price = item_price_micro(*paid, self.params)
        return receipt_key(body), paid, debt_row(receipt, paid), price

    def _add_debt(
        self, key: ReceiptKey, receipt: dict[str, Any], paid: tuple[int, int], size: int, price: int
    ) -> None:
        first = not self._pending
        self._pending[key] = _Debt(receipt, paid, size, price, asyncio.get_running_loop().time())
        self._owed += price
        if len(self._pending) >= self.params.payment_batch_max:
            self._kick_flush(whole_batches=True)
        elif first:
            self._arm_flush(self.params.payment_batch_window_s)

    def _drop_debt(self, key: ReceiptKey) -> None:
        debt = self._pending.pop(key, None)
        if debt is not None:
            self._owed -= debt.price

    def _is_paid(self, key: ReceiptKey) -> bool:
        """Whether a pay operation held (and folded) already pays this receipt key."""
        return self.balances.is_paid(key)

    async def _load_pending(self) -> None:
        """Mirror the debts on disk (left by a crash, or by a replica sharing the database)."""
        me = self.node.identity.node_id
        rows = await asyncio.to_thread(self.store.pending, me)
        bad: list[ReceiptKey] = []
        for raw, _created in rows:
            row = orjson.loads(raw)
            try:
                receipt, paid = row["receipt"], tuple(row["paid"])
                key, paid, _, price = self._check_debt(receipt, paid)  # type: ignore[arg-type]
            except (InvalidReceipt, KeyError, TypeError, ValueError) as exc:
                log.error("dropping a pending receipt that fails its check", error=str(exc))
                with contextlib.suppress(Exception):
                    bad.append(receipt_key(row["receipt"]["body"]))
                continue
            if key not in self._pending:
                self._pending[key] = _Debt(receipt, paid, len(raw), price, 0.0)
                self._owed += price
        if bad:
            await asyncio.to_thread(self.store.drop_pending, bad)

    def _arm_flush(self, delay: float) -> None:
        if self._stopped or self._flush_timer is not None:
            return
        self._flush_timer = asyncio.get_running_loop().call_later(delay, self._on_flush_timer)

    def _disarm_flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None

    def _on_flush_timer(self) -> None:
        self._flush_timer = None
        self._kick_flush(whole_batches=False)

    def _kick_flush(self, whole_batches: bool) -> None:
        """Start a background flush unless one runs (a running flush ends by paying the full
        batches that arrived meanwhile, and by arming the timer for the rest)."""
        if self._stopped or (self._flushing is not None and not self._flushing.done()):
            return
        self._flushing = asyncio.get_running_loop().create_task(self._flush_in_background(whole_batches))

    async def _flush_in_background(self, whole_batches: bool) -> None:
        try:
            await self._flush(whole_batches)
        except Exception as exc:  # the debts stay on disk and in memory: try again a window later
            log.warning("paying pending receipts failed; retrying later", error=str(exc))
            self._arm_flush(self.params.payment_batch_window_s)

    async def _flush(self, whole_batches: bool = False) -> None:
        """Pay the debts pending now (with whole_batches, only as many full batches of
        payment_batch_max as they make), in pay operations of at most payment_batch_max receipts."""
        async with self._flush_lock:
            self._disarm_flush()
            keys = self._full_batches() if whole_batches else list(self._pending)
            while keys:
                while keys:
                    batch, keys = self._next_batch(keys)
                    await self._pay(batch)
                keys = self._full_batches()  # arrived during this flush
            # No await from here on: a debt settled now sees this timer, or an empty table.
            if self._pending:
                oldest = min(debt.since for debt in self._pending.values())
                now = asyncio.get_running_loop().time()
                self._arm_flush(max(0.0, oldest + self.params.payment_batch_window_s - now))

    def _full_batches(self) -> list[ReceiptKey]:
        keys = list(self._pending)
        return keys[: len(keys) - len(keys) % self.params.payment_batch_max]

    def _next_batch(self, keys: list[ReceiptKey]) -> tuple[list[ReceiptKey], list[ReceiptKey]]:
        """As many of `keys` (oldest first) as one pay operation may carry: by count, and by bytes."""
        room = MAX_OP_BYTES - PAY_OVERHEAD_BYTES
        taken = 0
        for key in keys[: self.params.payment_batch_max]:
            room -= self._pending[key].size + PAY_BYTES_PER_PAYMENT
            if room < 0 and taken:
                break
            taken += 1
        return keys[:taken], keys[taken:]

    async def _pay(self, keys: list[ReceiptKey]) -> None:
        """One pay operation for `keys` (one payment per executor), the rows deleted with it."""
        for _attempt in range(3):
            keys = [k for k in keys if k in self._pending]
            fresh = [k for k in keys if not self._is_paid(k)]
            try:
                if fresh:
                    by_executor: dict[str, list[_Debt]] = {}
                    for key in fresh:
                        by_executor.setdefault(key[0], []).append(self._pending[key])
                    payments = await asyncio.gather(
                        *(self._payment(to, debts) for to, debts in sorted(by_executor.items()))
                    )
                    await self._append_own("pay", {"payments": list(payments)}, settled=keys)
                elif keys:  # all paid already: the rows are only dropped
                    await asyncio.to_thread(self.store.drop_pending, keys)
            except PendingGone as exc:
                # A replica sharing the database paid (or dropped) some of them: forget those.
                for key in exc.missing:
                    self._drop_debt(key)
                continue
            for key in keys:
                self._drop_debt(key)
            self.payments += len(fresh)
            return
        raise RuntimeError("pending receipts kept changing under this flush")

    async def _payment(self, to: str, debts: list[_Debt]) -> dict[str, Any]:
        """A payment to one executor: compact if it countersigns the items, else by its receipts."""
        items = [debt.item for debt in debts]
        receipts = [debt.receipt for debt in debts]
        amount = payment_amount(items, self.params)
        try:
            reply = await self.node.overlay.request(
                to, COUNTERSIGN_KIND, {"receipts": receipts, "items": items}, timeout=COUNTERSIGN_TIMEOUT_S
            )
            sig = reply.get("sig")
            if not isinstance(sig, str):
                raise InvalidOperation("no signature in the answer")
            verify(to, canonical(batch_body(self.net, to, self.node.node_id, items)), bytes.fromhex(sig))
        except Exception as exc:
            log.debug("paying by receipts: no countersignature", executor=to[:16], error=str(exc))
            return {"to": to, "amount": amount, "items": items, "receipts": receipts}
        return {"to": to, "amount": amount, "items": items, "sig": sig}

    async def _serve_countersign(self, peer_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """An entry asks this node to sign, once, the items of its receipts it is about to pay.
        Each item names a receipt's request and at most its tokens (an entry pays what it could
        verify): signing less than claimed loses nothing a refusal would keep, the entry would
        pay the same by receipts."""
        records, items = body.get("receipts"), body.get("items")
        if (
            not isinstance(records, list)
            or not isinstance(items, list)
            or not 0 < len(records) <= self.params.payment_batch_max
            or len(items) != len(records)
        ):
            raise ValueError("ledger.countersign takes {receipts, items}: 1..payment_batch_max of each")
        # Signature checks cost ~70 us each: off the event loop.
        await asyncio.to_thread(self._check_own_receipts, records, items, peer_id)
        signed = batch_body(self.net, self.node.node_id, peer_id, items)
        return {"sig": self.node.identity.sign(canonical(signed)).hex()}

    def _check_own_receipts(self, records: list[Any], items: list[Any], entry: str) -> None:
        me = self.node.node_id
        for record, item in zip(records, items, strict=True):
            receipt = check_receipt(record, self.net)
            if receipt["id"] != me or receipt["entry"] != entry:
                raise ValueError("only this node's receipts for the asking entry are countersigned")
            if (
                not isinstance(item, list)
                or len(item) != 3
                or item[0] != receipt["request"]
                or not all(type(n) is int and n >= 0 for n in item[1:])
                or item[1] > receipt["prompt_tokens"]
                or item[2] > receipt["completion_tokens"]
            ):
                raise ValueError("an item must name its receipt's request and at most its tokens")

    # -- gossip delegate -----------------------------------------------------------------------------
    def local_state(self) -> dict[str, Any]:
        """Constant-size: one hash per bucket of authors' heads, whatever the number of authors."""
        return {"buckets": bucket_hashes(self.store.heads())}

    def merge_remote_state(self, peer_id: str, state: dict[str, Any]) -> None:
        theirs = state.get("buckets") if isinstance(state, dict) else None
        if not isinstance(theirs, list) or len(theirs) != BUCKETS:
            return
        differing = [
            i
            for i, (a, b) in enumerate(zip(bucket_hashes(self.store.heads()), theirs, strict=True))
            if a != b
        ]
        if differing:
            asyncio.get_running_loop().create_task(self._compare_heads(peer_id, differing))

    async def _compare_heads(self, peer_id: str, buckets: list[int]) -> None:
        """Fetch the peer's heads in the buckets that differ and pull each chain it is ahead on."""
        try:
            reply = await self.node.overlay.request(
                peer_id, HEADS_KIND, {"buckets": buckets}, timeout=PULL_TIMEOUT_S
            )
        except Exception as exc:
            log.info("ledger heads request failed", peer=peer_id[:16], error=str(exc))
            return
        heads = reply.get("heads") if isinstance(reply, dict) else None
        if not isinstance(heads, dict):
            return
        mine = self.store.heads()
        for author, entry in heads.items():
            if not (isinstance(author, str) and isinstance(entry, list) and len(entry) == 2):
                continue
            seq, head = entry
            if not isinstance(seq, int) or not isinstance(head, str):
                continue
            local = mine.get(author)
            if local is None or seq > local[0] or (seq == local[0] and head != local[1]):
                self._schedule_pull(peer_id, author)

    async def _serve_heads(self, peer_id: str, body: dict[str, Any]) -> dict[str, Any]:
        self._require_checked()
        wanted = body.get("buckets")
        if not isinstance(wanted, list) or not all(isinstance(i, int) for i in wanted):
            raise ValueError("ledger.heads takes {buckets: [int]}")
        wanted_set = set(wanted)
        heads = self.store.heads()
        return {"heads": {a: [seq, h] for a, (seq, h) in heads.items() if bucket_of(a) in wanted_set}}

    def _schedule_pull(self, peer_id: str, author: str) -> asyncio.Task[None]:
        """The pull of `author`'s chain from `peer_id`: the one running, or a new one."""
        key = f"{peer_id}:{author}"
        task = self._pulling.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._pull(peer_id, author))
            self._pulling[key] = task
            task.add_done_callback(lambda _: self._pull_done(key))
        return task

    def _pull_done(self, key: str) -> None:
        self._pulling.pop(key, None)
        if not self._pulling and self._stale:
            self._schedule_refold()

    async def _pull(self, peer_id: str, author: str) -> None:
        """Fetch and store what the peer holds beyond our head of `author`'s chain."""
        while True:
            head = self.store.head(author)
            start = head[0] + 1 if head else 1
            # Ask from one before our head: a different op there means an equivocation.
            ask_from = max(1, start - 1)
            try:
                reply = await self.node.overlay.request(
                    peer_id,
                    RANGE_KIND,
                    {"author": author, "from": ask_from, "limit": RANGE_LIMIT},
                    timeout=PULL_TIMEOUT_S,
                )
                raw_ops = reply.get("ops")
                if not isinstance(raw_ops, list):
                    raise InvalidOperation("ledger.range answer without an ops list")
                # Signature checks cost ~100 us each: off the event loop (across processes for catch-up).
                ops = await self._verifier.verify(raw_ops)
            except InvalidOperation as exc:
                log.warning("peer sent invalid ledger operations", peer=peer_id[:16], error=str(exc))
                self.rejected["invalid_operation"] += 1
                return
            except Exception as exc:
                log.info("ledger pull failed", peer=peer_id[:16], author=author[:16], error=str(exc))
                return
            new = [op for op in ops if op.author == author and op.seq >= start]
            overlap = [op for op in ops if op.author == author and op.seq < start]
            for op in overlap:
                stored = self.store.ops(author, op.seq, op.seq)
                if stored and stored[0].hash != op.hash:
                    await self._report_fraud(stored[0], op)
                    return
            if not new:
                return
            try:
                async with self._lock:
                    await asyncio.to_thread(self.store.append, new)
                    # Usually the new operations sort after all folded ones (a peer's latest
                    # payments): fold them at once. Otherwise the stored set is refolded later.
                    if not self._stale and len(new) <= INCREMENTAL_MAX and self.balances.extend(new):
                        continue
                self._stale = True
            except ChainFork as exc:
                await self._report_fraud(exc.stored, exc.offered)
                return
            except (ChainError, InvalidOperation) as exc:
                log.warning(
                    "refused ledger operations", peer=peer_id[:16], author=author[:16], error=str(exc)
                )
                return

    def _schedule_refold(self) -> None:
        if self._refold is not None:
            self._refold.cancel()
        loop = asyncio.get_running_loop()
        self._refold = loop.call_later(REFOLD_AFTER_S, self._start_refold)

    def _start_refold(self) -> None:
        if self._pulling:  # more ranges are arriving: their last pull schedules the refold
            return
        self._refolding = asyncio.get_running_loop().create_task(self._refold_now())

    async def _refold_now(self) -> None:
        """Fold everything stored, off the event loop, and swap the result in."""
        self._stale = False
        async with self._lock:
            ops = await asyncio.to_thread(lambda: list(self.store.all_ops()))
            self.balances = await asyncio.to_thread(Balances.fold, ops, self.params, self.net)

    async def _report_fraud(self, a: Operation, b: Operation) -> None:
        if self.balances.is_barred(a.author):
            return
        log.warning("equivocation detected", author=a.author[:16], seq=a.seq)
        await self.append_own("fraud", {"a": a.signed, "b": b.signed})

    async def _serve_range(self, peer_id: str, body: dict[str, Any]) -> dict[str, Any]:
        self._require_checked()
        author, start, limit = body.get("author"), body.get("from", 1), body.get("limit", RANGE_LIMIT)
        if not isinstance(author, str) or not isinstance(start, int) or not isinstance(limit, int):
            raise ValueError("ledger.range takes {author: str, from: int, limit: int}")
        ops = await asyncio.to_thread(self.store.ops, author, max(1, start), None, min(limit, RANGE_LIMIT))
        answer, size = [], 0
        for op in ops:
            size += len(op.raw)
            if answer and size > RANGE_MAX_BYTES:
                break
            answer.append(op.signed)
        return {"ops": answer}

    # -- views ---------------------------------------------------------------------------------------
    def balances_view(self) -> dict[str, dict[str, Any]]:
        view = self.balances.view(time.time())
        for node, duels in self.balances.duel_view().items():
            view.setdefault(node, {}).update(duels)
        return view

    def quality(self, node_id: str, model: str) -> float:
        return self.balances.quality(node_id, model)

    def ops_view(self, author: str, start: int, limit: int) -> list[dict[str, Any]]:
        return [dict(op.op, hash=op.hash, sig=op.sig) for op in self.store.ops(author, start, None, limit)]

    def pending_view(self) -> dict[str, Any]:
        now = asyncio.get_running_loop().time()
        oldest = min((debt.since for debt in self._pending.values()), default=None)
        return {
            "count": len(self._pending),
            "credits": self._owed / MICRO,
            "oldest_s": None if oldest is None else round(max(now - oldest, 0.0), 3),
        }

    def heads_view(self) -> dict[str, int]:
        return {author: seq for author, (seq, _) in self.store.heads().items()}

    async def peer_heads(self, peer_id: str) -> dict[str, int] | None:
        try:
            reply = await self.node.overlay.request(
                peer_id, HEADS_KIND, {"buckets": list(range(BUCKETS))}, timeout=HEADS_VIEW_TIMEOUT_S
            )
        except Exception:
            return None
        heads = reply.get("heads") if isinstance(reply, dict) else None
        if not isinstance(heads, dict):
            return None
        return {
            a: e[0]
            for a, e in heads.items()
            if isinstance(a, str) and isinstance(e, list) and e and type(e[0]) is int
        }

    def account(self, node_id: str) -> Account:
        """Folded operations only: this node's pending debts are not in its liquid balance until paid."""
        return self.balances.account(node_id, time.time())

    def is_paid(self, executor: str, entry: str, request: str) -> bool:
        return self.balances.is_paid((executor, entry, request))

    def can_delegate(self, node_id: str) -> bool:
        """Not barred; for this node also: what it holds, less its pending (unpaid) debts, still pays
        one more request at the base price (a payment moves at most what its payer holds)."""
        now = time.time()
        if node_id != self.node.node_id:
            return self.balances.can_delegate(node_id, now)
        account = self.balances.account(node_id, now)
        spare = to_micro(account.liquid) - self._owed
        return not account.barred and spare >= item_price_micro(0, 0, self.params)

    @property
    def pending_receipts(self) -> int:
        return len(self._pending)

    @property
    def owed(self) -> float:
        """Credits this node owes for receipts not paid yet."""
        return self._owed / MICRO


class _LedgerCollector:
    """Payment metrics, read from the ledger at scrape time."""

    def __init__(self, ledger: ChainLedger) -> None:
        self.ledger = ledger

    def collect(self):
        yield GaugeMetricFamily(
            "wwwserve_ledger_pending_receipts",
            "Receipts this node owes for, stored and not yet paid",
            value=self.ledger.pending_receipts,
        )
        yield CounterMetricFamily(
            "wwwserve_ledger_payments",
            "Receipts paid by this node's pay operations",
            value=self.ledger.payments,
        )
        rejected = CounterMetricFamily(
            "wwwserve_ledger_rejected",
            "Operations peers sent that failed verification (signature, chain, kind rules)",
            labels=["reason"],
        )
        for reason, count in sorted(self.ledger.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        account = self.ledger.account(self.ledger.node.node_id)
        balance = GaugeMetricFamily(
            "wwwserve_ledger_balance",
            "This node's credits, by kind (liquid, bonded, unbonding)",
            labels=["kind"],
        )
        for kind in ("liquid", "bonded", "unbonding"):
            balance.add_metric([kind], getattr(account, kind))
        yield balance
        yield GaugeMetricFamily(
            "wwwserve_ledger_owed_credits",
            "Credits this node owes for receipts not paid yet",
            value=self.ledger.owed,
        )
        heads = self.ledger.heads_view()
        own = heads.get(self.ledger.node.node_id, 0)
        operations = GaugeMetricFamily(
            "wwwserve_ledger_operations",
            "Operations stored, by chain (own: this node's; peers: everyone else's)",
            labels=["chain"],
        )
        operations.add_metric(["own"], own)
        operations.add_metric(["peers"], sum(heads.values()) - own)
        yield operations


def bucket_of(author: str) -> int:
    return int(author[:4], 16) % BUCKETS


def bucket_hashes(heads: Mapping[str, tuple[int, str]]) -> list[str]:
    """A short hash per bucket over its authors' (author, seq, head): equal buckets need no exchange."""
    entries: list[list[str]] = [[] for _ in range(BUCKETS)]
    for author, (seq, head) in heads.items():
        entries[bucket_of(author)].append(f"{author}:{seq}:{head}")
    return [hashlib.sha256("\n".join(sorted(e)).encode()).hexdigest()[:16] for e in entries]
