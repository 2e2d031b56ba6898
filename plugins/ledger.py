"""The built-in ledger plugin: per-author signed chains, replicated by gossip, folded into balances.

- Own operations are signed, stored durably, then folded (an acknowledged operation is on disk).
- Replication: a gossip delegate carries a constant-size digest, 64 hashes over buckets of authors'
  `(seq, head hash)`. For the buckets that differ, the peer's heads are fetched ("ledger.heads");
  where it is ahead on a chain, the missing range is pulled ("ledger.range"), and every operation is
  verified (signature, chain links, kind rules) and stored in one transaction.
- A peer whose head differs from ours at the same seq has seen an equivocation: both operations are
  fetched and a `fraud` operation carrying them is appended to our own chain.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Mapping
from typing import Any

import structlog

from wwwserve_gateway.plugin_api import NodeAPI
from wwwserve_gateway.plugins.ledger_fold import Balances
from wwwserve_gateway.plugins.ledger_ops import InvalidOperation, Operation, parse_op, sign_op
from wwwserve_gateway.plugins.ledger_rules import check_op
from wwwserve_gateway.plugins.ledger_store import ChainError, Conflict, LedgerStore, default_url

log = structlog.get_logger(__name__)

RANGE_KIND = "ledger.range"
HEADS_KIND = "ledger.heads"
BUCKETS = 64
RANGE_LIMIT = 1000
# A range answer must fit one overlay frame (1 MiB); receipt-laden pay operations run to a few KB.
RANGE_MAX_BYTES = 512 * 1024
PULL_TIMEOUT_S = 30.0
# Pulled ranges usually sort before operations already folded, and each would force a full refold
# (seconds at 100,000 operations): they are stored at once and folded together when no pull is left
# running, and at least this long after the last append.
REFOLD_AFTER_S = 0.2


class ChainLedger:
    def __init__(self, node: NodeAPI, settings: Mapping[str, Any]) -> None:
        unknown = set(settings) - {"database_url"}
        if unknown:
            raise ValueError(f"unknown ledger settings {sorted(unknown)}; known: database_url")
        self.node = node
        self.params = node.genesis.ledger
        # Opening re-verifies each chain's latest operations: a tampered database stops the node
        # here, with the offending rows named.
        self.store = LedgerStore(
            settings.get("database_url") or default_url(node.data_dir), node.genesis.network_id
        )
        self.balances = Balances(self.params)
        self._lock = asyncio.Lock()
        self._pulling: set[str] = set()
        self._refold: asyncio.TimerHandle | None = None
        self._stale = False  # operations stored but not yet folded
        self._refolding: asyncio.Task[None] | None = None
        node.overlay.on_request(RANGE_KIND, self._serve_range)
        node.overlay.on_request(HEADS_KIND, self._serve_heads)

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        ops = await asyncio.to_thread(lambda: list(self.store.all_ops()))
        self.balances = Balances.fold(ops, self.params)
        if self.store.head(self.node.identity.node_id) is None:
            await self.append_own("join", {"grant": self.params.initial_grant})
        self.node.gossip.add_delegate("ledger", self)

    async def stop(self) -> None:
        if self._refold is not None:
            self._refold.cancel()
        if self._refolding is not None:
            self._refolding.cancel()
        await asyncio.to_thread(self.store.close)

    # -- own chain -----------------------------------------------------------------------------------
    async def append_own(self, kind: str, body: dict[str, Any]) -> Operation:
        """Sign, store durably, then fold an operation of this node's own chain."""
        me = self.node.identity
        async with self._lock:
            head = self.store.head(me.node_id)
            seq, prev = (head[0] + 1, head[1]) if head else (1, "")
            op = sign_op(me, seq, prev, kind, body, round(time.time(), 3))
            check_op(op, self.params)
            await asyncio.to_thread(self.store.append, [op])
            self.balances.add(op)
        return op

    # -- gossip delegate -----------------------------------------------------------------------------
    def local_digest(self) -> dict[str, Any]:
        """Constant-size: one hash per bucket of authors' heads, whatever the number of authors."""
        return {"buckets": bucket_hashes(self.store.heads())}

    def merge_remote_digest(self, peer_id: str, digest: dict[str, Any]) -> None:
        theirs = digest.get("buckets") if isinstance(digest, dict) else None
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
        wanted = body.get("buckets")
        if not isinstance(wanted, list) or not all(isinstance(i, int) for i in wanted):
            raise ValueError("ledger.heads takes {buckets: [int]}")
        wanted_set = set(wanted)
        heads = self.store.heads()
        return {"heads": {a: [seq, h] for a, (seq, h) in heads.items() if bucket_of(a) in wanted_set}}

    def _schedule_pull(self, peer_id: str, author: str) -> None:
        key = f"{peer_id}:{author}"
        if key in self._pulling:
            return
        self._pulling.add(key)
        task = asyncio.get_running_loop().create_task(self._pull(peer_id, author))
        task.add_done_callback(lambda _: self._pull_done(key))

    def _pull_done(self, key: str) -> None:
        self._pulling.discard(key)
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
                # Signature checks cost ~100 us each: off the event loop.
                ops = await asyncio.to_thread(self._verified, raw_ops)
            except InvalidOperation as exc:
                log.warning("peer sent invalid ledger operations", peer=peer_id[:16], error=str(exc))
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
                self._stale = True
            except Conflict as exc:
                await self._report_fraud(exc.stored, exc.offered)
                return
            except (ChainError, InvalidOperation) as exc:
                log.warning(
                    "refused ledger operations", peer=peer_id[:16], author=author[:16], error=str(exc)
                )
                return

    def _verified(self, raw_ops: list[Any]) -> list[Operation]:
        ops = [parse_op(signed) for signed in raw_ops]
        for op in ops:
            check_op(op, self.params)
        return ops

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
            self.balances = await asyncio.to_thread(Balances.fold, ops, self.params)

    async def _report_fraud(self, a: Operation, b: Operation) -> None:
        if self.balances.is_barred(a.author):
            return
        log.warning("equivocation detected", author=a.author[:16], seq=a.seq)
        await self.append_own("fraud", {"a": a.signed, "b": b.signed})

    async def _serve_range(self, peer_id: str, body: dict[str, Any]) -> dict[str, Any]:
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
        return self.balances.view(time.time())

    def ops_view(self, author: str, start: int, limit: int) -> list[dict[str, Any]]:
        return [dict(op.op, hash=op.hash, sig=op.sig) for op in self.store.ops(author, start, None, limit)]


def bucket_of(author: str) -> int:
    return int(author[:4], 16) % BUCKETS


def bucket_hashes(heads: Mapping[str, tuple[int, str]]) -> list[str]:
    """A short hash per bucket over its authors' (author, seq, head): equal buckets need no exchange."""
    entries: list[list[str]] = [[] for _ in range(BUCKETS)]
    for author, (seq, head) in heads.items():
        entries[bucket_of(author)].append(f"{author}:{seq}:{head}")
    return [hashlib.sha256("\n".join(sorted(e)).encode()).hexdigest()[:16] for e in entries]
