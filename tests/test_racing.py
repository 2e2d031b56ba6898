"""The hedge's race (delegation/racing.py): the first executor is relayed if it starts within the
patience, else the first to start, unless that one is known to answer worse than the other, which is
then relayed only if the other fails."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from wwwserve_gateway.delegation import wire
from wwwserve_gateway.delegation.execution import Execution
from wwwserve_gateway.delegation.racing import Contender, race
from wwwserve_gateway.plugin_api.backend import Endpoint

REQUEST = wire.DelegatedRequest("r", Endpoint.CHAT, {"model": "m"}, ("entry",))


def contender(name: str, go: asyncio.Event, fail: bool = False) -> Contender:
    async def items() -> AsyncIterator[dict[str, Any]]:
        await go.wait()
        if fail:
            yield {"t": "error", "status": 500, "body": "{}"}
            return
        yield {"t": "sse", "d": f"data: {name}\n\n"}

    return Contender(Execution(name, ("entry", name), REQUEST, items()))


async def opened(c: Contender) -> Contender:
    return c


def worse_if_named(slow: str):
    return lambda b, a: b.ex.executor == slow


async def test_the_first_to_start_is_relayed() -> None:
    a_go, b_go = asyncio.Event(), asyncio.Event()
    a, b = contender("A", a_go), contender("B", b_go)
    b_go.set()
    relayed, swapped = await race(a, opened(b))
    assert relayed is b and swapped
    a_go.set()


async def test_a_worse_second_waits_for_the_first() -> None:
    a_go, b_go = asyncio.Event(), asyncio.Event()
    a, b = contender("A", a_go), contender("B", b_go)
    b_go.set()
    task = asyncio.ensure_future(race(a, opened(b), worse_if_named("B")))
    await b.started()
    assert not task.done()  # B started first, but it answers worse: A is awaited
    a_go.set()
    relayed, swapped = await task
    assert relayed is a and not swapped


async def test_a_worse_second_is_relayed_when_the_first_fails() -> None:
    a_go, b_go = asyncio.Event(), asyncio.Event()
    a, b = contender("A", a_go, fail=True), contender("B", b_go)
    b_go.set()
    task = asyncio.ensure_future(race(a, opened(b), worse_if_named("B")))
    await b.started()
    a_go.set()
    relayed, swapped = await task
    assert relayed is b and swapped


async def test_within_the_patience_the_first_executor_is_relayed_though_the_second_started_first() -> None:
    a_go, b_go = asyncio.Event(), asyncio.Event()
    a, b = contender("A", a_go), contender("B", b_go)
    b_go.set()
    task = asyncio.ensure_future(race(a, opened(b), patience=3600.0))
    await b.started()
    assert not task.done()  # B is out first, but A still has time
    a_go.set()
    relayed, swapped = await task
    assert relayed is a and not swapped


async def test_past_the_patience_the_second_is_relayed() -> None:
    a_go, b_go = asyncio.Event(), asyncio.Event()
    a, b = contender("A", a_go), contender("B", b_go)
    b_go.set()
    relayed, swapped = await race(a, opened(b), patience=0.05)  # A never starts
    assert relayed is b and swapped
    a_go.set()


async def test_within_the_patience_a_first_that_fails_hands_over_at_once() -> None:
    a_go, b_go = asyncio.Event(), asyncio.Event()
    a, b = contender("A", a_go, fail=True), contender("B", b_go)
    b_go.set()
    task = asyncio.ensure_future(race(a, opened(b), patience=3600.0))
    await b.started()
    a_go.set()
    relayed, swapped = await task
    assert relayed is b and swapped
