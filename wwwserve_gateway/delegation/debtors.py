"""Entries that do not pay: an executor stops serving an entry whose receipts go unpaid.

Entries pay receipts in batches, within the genesis' payment window, and the payment reaches this
node by ledger replication. A receipt still unpaid `grace_s` after it was issued is a default; an
entry with more than `max_defaults` of them is declined until its payments arrive. The cost of a
non-paying entry is so bounded by about `max_defaults` requests per executor.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

MAX_TRACKED = 10_000  # receipts remembered per entry; older ones are forgotten (and forgiven)


class Debtors:
    def __init__(
        self,
        is_paid: Callable[[str, str], bool],
        grace_s: float,
        max_defaults: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.is_paid = is_paid  # (entry, request hash) -> paid?
        self.grace_s = grace_s
        self.max_defaults = max_defaults
        self.clock = clock
        self._issued: dict[str, deque[tuple[float, str]]] = {}

    def issued(self, entry: str, request: str) -> None:
        queue = self._issued.setdefault(entry, deque(maxlen=MAX_TRACKED))
        queue.append((self.clock(), request))

    def defaults(self, entry: str) -> int:
        """Receipts of `entry` unpaid past the grace period. Only those past it are looked up (the
        queue is in issue order), and paid ones are forgotten: a request costs a look-up per
        receipt that came due since the last one, not one per receipt outstanding."""
        queue = self._issued.get(entry)
        if not queue:
            return 0
        horizon = self.clock() - self.grace_s
        overdue: list[tuple[float, str]] = []
        while queue and queue[0][0] <= horizon:
            receipt = queue.popleft()
            if not self.is_paid(entry, receipt[1]):
                overdue.append(receipt)
        queue.extendleft(reversed(overdue))
        return len(overdue)

    def refuses(self, entry: str) -> bool:
        return self.defaults(entry) > self.max_defaults
