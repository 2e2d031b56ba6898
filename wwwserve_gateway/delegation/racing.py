"""Hedged requests: two executors answer the same request; the app gets the first executor's answer
unless it has not started within a patience, and then whichever starts first.

A `Contender` reads one execution to its end in a task of its own and keeps every item, so the
winner can be relayed live while the loser is still collected for its duel, and both can be read
again once they are done. `race` picks which to relay: the first executor (the router's draw) if it
starts within `patience`, else whichever starts first; one that fails before any output loses to the
other. As in "The Tail at Scale" (Dean and Barroso), the second request is there for the tail: relayed
from its start instead, a provider that answers fast and badly would win nearly every race, and the
app would get its answers whatever the router's stake and quality weights say.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from wwwserve_gateway.delegation.execution import Execution

CONTENT = frozenset({"sse", "json", "receipt"})


class Contender:
    def __init__(self, ex: Execution) -> None:
        self.ex = ex
        self.items: list[dict[str, Any]] = []
        self.error: Exception | None = None
        self.finished = False
        self._changed = asyncio.Condition()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for item in self.ex.items:
                self.items.append(item)
                async with self._changed:
                    self._changed.notify_all()
        except Exception as exc:  # kept for the reader that relays it (Execution maps it)
            self.error = exc
        finally:
            self.finished = True
            async with self._changed:
                self._changed.notify_all()
            with contextlib.suppress(Exception):
                await self.ex.aclose()

    async def _wait(self, seen: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.items) > seen or self.finished)

    async def started(self) -> bool:
        """Whether it produced output (False: it failed or answered an error first)."""
        seen = 0
        while True:
            for item in self.items[seen:]:
                kind = item.get("t") if isinstance(item, dict) else None
                if kind in CONTENT:
                    return True
                if kind != "wait":
                    return False
            seen = len(self.items)
            if self.finished:
                return False
            await self._wait(seen)

    async def done(self) -> None:
        await asyncio.shield(self.task)

    async def _raw(self) -> AsyncIterator[dict[str, Any]]:
        seen = 0
        while True:
            while seen < len(self.items):
                seen += 1
                yield self.items[seen - 1]
            if self.finished:
                if self.error is not None:
                    raise self.error
                return
            await self._wait(seen)

    def view(self) -> Execution:
        """The execution as the relay reads it: every item from the first, live."""
        return Execution(self.ex.peer, self.ex.route, self.ex.request, self._raw())

    def cancel(self) -> None:
        self.task.cancel()


async def race(
    a: Contender,
    second: Awaitable[Contender | None],
    worse: Callable[[Contender, Contender], bool] = lambda b, a: False,
    patience: float = 0.0,
) -> tuple[Contender, bool]:
    """The contender to relay, and whether the other one started too late to matter (False) or
    won (True: the second one was picked). `second` opens the other executor; it may finish after
    this returns, for the duel to collect. A second that starts first is relayed only once `a` has
    not started for `patience` seconds since the race began, and, if it is `worse(b, a)` (known to
    answer worse), only if `a` fails: speed must not hand the app the worst answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience

    async def b_started() -> Contender | None:
        b = await asyncio.shield(second)  # giving up on the wait must not cancel the opening
        return b if b is not None and await b.started() else None

    a_wait = asyncio.ensure_future(a.started())
    b_wait = asyncio.ensure_future(b_started())
    fallback: Contender | None = None
    try:
        pending: set[asyncio.Future[Any]] = {a_wait, b_wait}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if a_wait in done and a_wait.result():
                return a, False
            if b_wait in done and (b := b_wait.result()) is not None:
                a_failed = a_wait.done() and not a_wait.result()
                if worse(b, a) and not a_failed:
                    fallback = b
                    continue
                if not a_failed and (left := deadline - loop.time()) > 0:
                    with contextlib.suppress(TimeoutError):
                        if await asyncio.wait_for(asyncio.shield(a_wait), left):
                            return a, False
                return b, True
        if fallback is not None:  # A failed before any output: the worse answer beats none
            return fallback, True
        return a, False  # neither started: the relay sees A's failure and fails over
    finally:
        for waiter in (a_wait, b_wait):
            waiter.cancel()
