"""Verifying pulled operations: on a worker thread, or across worker processes for a catch-up.

Ed25519 checks are most of a syncing node's time, and threads do not spread them: parsing and
canonical encoding around each check hold the GIL (threads gained 1.17x). Ranges of at least
PARALLEL_MIN operations are split over a pool of worker processes, started on the first catch-up.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from wwwserve_gateway.network.genesis import LedgerParams
from wwwserve_gateway.plugins.ledger.ops import Operation, parse_op
from wwwserve_gateway.plugins.ledger.rules import check_op

PARALLEL_MIN = 200


def verify_ops(raw_ops: list[Any], params: LedgerParams, net: str) -> list[Operation]:
    """Parse and check operations (signature, shape, kind rules); raise InvalidOperation."""
    ops = [parse_op(signed) for signed in raw_ops]
    for op in ops:
        check_op(op, params, net)
    return ops


class Verifier:
    def __init__(self, params: LedgerParams, net: str, workers: int | None = None) -> None:
        self.params = params
        self.net = net
        self.workers = workers if workers is not None else (os.cpu_count() or 1)
        self._pool: ProcessPoolExecutor | None = None

    async def verify(self, raw_ops: list[Any]) -> list[Operation]:
        if len(raw_ops) < PARALLEL_MIN or self.workers < 2:
            return await asyncio.to_thread(verify_ops, raw_ops, self.params, self.net)
        if self._pool is None:
            # spawn, not fork: the node runs threads and an event loop that a fork would copy.
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context)
        loop = asyncio.get_running_loop()
        size = -(-len(raw_ops) // self.workers)
        chunks = [raw_ops[i : i + size] for i in range(0, len(raw_ops), size)]
        parts = await asyncio.gather(
            *(loop.run_in_executor(self._pool, verify_ops, chunk, self.params, self.net) for chunk in chunks)
        )
        return [op for part in parts for op in part]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
