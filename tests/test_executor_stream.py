"""The executor's hot path: heartbeats over a silent backend, and the text it hashes into receipts
(which must be exactly the text the entry reads from the same answer)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wwwserve_gateway.delegation.answers import AnswerReader, AnswerText, MalformedAnswer
from wwwserve_gateway.delegation.executor import with_heartbeats
from wwwserve_gateway.plugin_api.backend import Endpoint


async def test_heartbeats_fill_a_silence_and_items_pass_in_order() -> None:
    release = asyncio.Event()

    async def source() -> AsyncIterator[int]:
        yield 1
        await release.wait()  # silent until the consumer has seen a heartbeat
        yield 2
        yield 3

    seen: list[int | None] = []
    async for item in with_heartbeats(source(), 0.01):
        seen.append(item)
        if item is None:
            release.set()
    assert seen[0] == 1 and seen[-2:] == [2, 3]
    assert None in seen[1:-2]


async def test_a_failing_source_raises_to_the_consumer() -> None:
    async def source() -> AsyncIterator[int]:
        yield 1
        raise RuntimeError("backend broke")

    with pytest.raises(RuntimeError, match="backend broke"):
        async for _ in with_heartbeats(source(), 5.0):
            pass


texts = st.text(max_size=20)
choice = st.fixed_dictionaries(
    {"index": st.sampled_from([0, 1, "0", None])},
    optional={
        "delta": st.fixed_dictionaries({}, optional={"content": texts | st.none()}),
        "message": st.fixed_dictionaries({}, optional={"content": texts}),
        "text": texts,
    },
)
chunk = st.fixed_dictionaries({"id": st.just("x")}, optional={"choices": st.lists(choice, max_size=3)})


@given(st.lists(chunk, min_size=1, max_size=6))
def test_the_executor_hashes_the_text_the_entry_reads(chunks: list[dict]) -> None:
    payload = "".join(f"data: {orjson.dumps(c).decode()}\n\n" for c in chunks)
    entry = AnswerReader(Endpoint.CHAT, "id", "m")
    entry.events(payload)
    executor = AnswerText()
    executor.events(payload)
    assert executor.text == entry.text
    whole_entry = AnswerReader(Endpoint.CHAT, "id", "m")
    try:
        whole_entry.whole(orjson.dumps(chunks[0]).decode())
    except MalformedAnswer:
        return  # refused by the entry: never paid, whatever its hash
    whole = AnswerText()
    whole.whole(orjson.dumps(chunks[0]).decode())
    assert whole.text == whole_entry.text
