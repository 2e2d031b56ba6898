"""The official openai SDK, sync and async, as a client of a real node over real llama.cpp servers."""

from __future__ import annotations

import asyncio

import aiohttp
import httpx
import openai
import pytest

from tests.conftest import API_KEY
from tests.support import DEADLINE_S, NodeProcess


@pytest.fixture(scope="module")
def client(gateway: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def aclient(gateway: NodeProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0)


HELLO = [{"role": "user", "content": "Say hello in three words."}]


def test_chat_with_smollm2(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=16, temperature=0)
    assert reply.object == "chat.completion"
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 16
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_without_usage_hides_injected_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, stream=True))
    assert chunks, "no chunks"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.choices for c in chunks), "the usage-only chunk the gateway asked for leaked to the app"
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_stream_include_usage_is_honoured(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 8


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6)
    assert reply.object == "text_completion"
    assert reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens == 6


def test_completions_stream(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model="tiny", prompt="Once", max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices)


def test_embeddings(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model="tiny-embed", input=["hello", "world"])
    assert len(reply.data) == 2
    assert len(reply.data[0].embedding) == 64
    assert reply.data[0].embedding != reply.data[1].embedding


def test_external_pass_through(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny-ext", messages=HELLO, max_tokens=4)
    assert reply.usage is not None and reply.usage.completion_tokens == 4


def test_models_list_and_get(client: openai.OpenAI) -> None:
    names = {m.id for m in client.models.list()}
    assert {"smollm2", "tiny", "tiny-embed", "tiny-ext", "down"} <= names
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_unasked_parameters_reach_the_backend(client: openai.OpenAI) -> None:
    """Parameters the gateway does not interpret are forwarded untouched: llama.cpp honours
    `stop` and `seed`, and rejects its own invalid values (n=2) with its own 400."""
    reply = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=30, seed=7, temperature=0, logprobs=True, top_logprobs=2
    )
    assert reply.choices[0].logprobs is not None
    assert len(reply.choices[0].logprobs.content[0].top_logprobs) == 2
    text = reply.choices[0].message.content
    stop = text[3]
    stopped = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=30, seed=7, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, n=2)


async def test_async_client(aclient: openai.AsyncOpenAI) -> None:
    reply = await aclient.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5)
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    stream = await aclient.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, stream=True)
    pieces = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)


def test_sse_framing(gateway: NodeProcess) -> None:
    """Raw bytes: every event is a 'data: ' line ended by a blank line; the last is [DONE]."""
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 5, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(resp.iter_bytes())
    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    events = raw.split(b"\n\n")[:-1]
    assert all(e.startswith(b"data: ") for e in events)
    assert events.count(b"data: [DONE]") == 1


@pytest.mark.parametrize("model", ["tiny", "tiny-ext"])
async def test_many_concurrent_streams_all_complete(gateway: NodeProcess, model: str) -> None:
    """llama.cpp closes the connection after each stream although it offers keep-alive: pooled dead
    connections gave 502s to 10-50% of streams at this rate. A raw client keeps the rate high."""
    body = {"model": model, "messages": HELLO, "max_tokens": 4, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    gate = asyncio.Semaphore(32)
    failures: list[str] = []

    async def one(session: aiohttp.ClientSession) -> None:
        async with (
            gate,
            session.post(gateway.url + "/v1/chat/completions", json=body, headers=headers) as resp,
        ):
            raw = await resp.read()
            if resp.status != 200 or not raw.endswith(b"data: [DONE]\n\n") or b'"error"' in raw:
                failures.append(f"{resp.status}: {raw[-200:]!r}")

    # None stalls: all end well within a generous deadline (the throughput: benchmarks/gateway_overhead.py).
    async with aiohttp.ClientSession() as session, asyncio.timeout(DEADLINE_S):
        await asyncio.gather(*(one(session) for _ in range(400)))
    assert not failures, f"{len(failures)} of 400 failed, e.g. {failures[0]}"
