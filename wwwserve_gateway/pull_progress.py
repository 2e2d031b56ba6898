"""Progress of `wwwserve models pull` as plain lines, for logs and pipes where a live bar cannot draw.

One line at each tenth of the total (by default), one at least every few seconds while bytes keep
coming, and one at the end; each line stands alone (no carriage returns, no colours), e.g.

    smollm2: extracting  40% (39.3 of 98.2 MB)
"""

from __future__ import annotations

import time
from collections.abc import Callable

MB = 1_000_000


class ProgressLines:
    """A `model_store.ProgressFn` that writes a line through `write` at each `step` (a fraction of the
    total) crossed, when `every_s` seconds have passed since the last line, and at completion."""

    def __init__(
        self,
        label: str,
        write: Callable[[str], None],
        *,
        step: float = 0.1,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < step <= 1:
            raise ValueError("step is a fraction of the total in (0, 1]")
        self.label = label
        self.write = write
        self.step = step
        self.every_s = every_s
        self.clock = clock
        self._last_step = 0
        self._last_at = clock()
        self._finished = False

    def __call__(self, done: int, total: int) -> None:
        if self._finished:
            return
        now = self.clock()
        fraction = done / total if total > 0 else 0.0
        reached = int(fraction / self.step + 1e-9)
        finished = total > 0 and done >= total
        if finished or reached > self._last_step or now - self._last_at >= self.every_s:
            self.write(self.line(done, total))
            self._last_step = max(self._last_step, reached)
            self._last_at = now
            self._finished = finished

    def line(self, done: int, total: int) -> str:
        if total > 0:
            percent = min(100, int(100 * done / total))
            return f"{self.label}: extracting {percent:3d}% ({done / MB:.1f} of {total / MB:.1f} MB)"
        return f"{self.label}: extracting {done / MB:.1f} MB"
