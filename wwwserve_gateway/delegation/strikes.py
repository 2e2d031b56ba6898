"""Executors this node caught misbehaving, kept away from its requests for a while.

A strike (an inflated receipt, a broken protocol, a garbage answer) sends the executor to the end
of no queue but out of it: the node's router is told to avoid it for `base_s`, doubling with each
strike up to `cap_s`. This is one node's own experience, never gossiped: what one member says of
another is not believed, so it is not said.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Record:
    strikes: int
    until: float


class Strikes:
    def __init__(
        self, base_s: float = 60.0, cap_s: float = 3600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.clock = clock
        self._records: dict[str, _Record] = {}

    def strike(self, node_id: str) -> float:
        """Count one strike; return how long the node is avoided now."""
        record = self._records.get(node_id)
        strikes = 1 if record is None else record.strikes + 1
        penalty = min(self.base_s * 2 ** (strikes - 1), self.cap_s)
        self._records[node_id] = _Record(strikes, self.clock() + penalty)
        return penalty

    def avoided(self) -> set[str]:
        now = self.clock()
        expired = [n for n, r in self._records.items() if r.until <= now and now - r.until > self.cap_s]
        for node_id in expired:  # forgiven after a quiet cap_s: memory stays bounded
            del self._records[node_id]
        return {n for n, r in self._records.items() if r.until > now}
