"""The LiteLLM SDK adapter backend, and the LiteLLM SDK as a client, against a real node process.

The node runs `via-litellm` and `embed-via-litellm` (the adapter, in front of real llama.cpp servers),
`litellm-down` (the adapter, pointed at a port nobody listens on) and `tiny-ext` (the pass-through).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import API_KEY
from tests.support import LlamaServer, NodeProcess

if importlib.util.find_spec("litellm") is None:
    pytest.skip("litellm is not installed (pip install 'wwwserve[litellm]')", allow_module_level=True)

HELLO = [{"role": "user", "content": "Say hello in three words."}]
DEAD_BASE = "http://127.0.0.1:9/v1"


@pytest.fixture(scope="module")
def llama_embed(tiny_path: Path) -> Iterator[LlamaServer]:
    server = LlamaServer(tiny_path, "tiny-embed-ext", embedding=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, llama_tiny: LlamaServer, llama_embed: LlamaServer
) -> Iterator[NodeProcess]:
    workdir = tmp_path_factory.mktemp("litellm")
    config = {
        "node": {"api_keys": [API_KEY]},
        "model_list": [
            {
                "model_name": "via-litellm",
                "litellm_params": {
                    "model": "litellm/openai/tiny-ext",
                    "api_base": llama_tiny.base_url,
                    "api_key": "none",
                    # Not a gateway key: a LiteLLM argument, and a default the request may override.
                    "max_tokens": 3,
                },
            },
            {
                "model_name": "embed-via-litellm",
                "litellm_params": {
                    "model": "litellm/openai/tiny-embed-ext",
                    "api_base": llama_embed.base_url,
                    "api_key": "none",
                },
            },
            {
                # max_retries is not a gateway key: it reaches LiteLLM as an extra litellm_params key.
                "model_name": "litellm-down",
                "litellm_params": {
                    "model": "litellm/openai/down",
                    "api_base": DEAD_BASE,
                    "api_key": "none",
                    "max_retries": 0,
                },
            },
            {
                "model_name": "tiny-ext",
                "litellm_params": {"model": "openai/tiny-ext", "api_base": llama_tiny.base_url},
            },
        ],
    }
    process = NodeProcess(config, workdir, name="litellm-node").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def litellm() -> ModuleType:
    return pytest.importorskip("litellm")


def sse_events(node: NodeProcess, path: str, body: dict[str, Any]) -> list[bytes]:
    """The raw SSE events of a streamed answer, checking each is one whole `data:` event."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", node.url + path, json=body, headers=headers, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read()
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events), raw
    return [e[6:] for e in events]


def test_chat(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="via-litellm", messages=HELLO, max_tokens=8)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.completion_tokens == 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8


def test_chat_stream_hides_usage_unless_asked(node: NodeProcess, client: openai.OpenAI) -> None:
    events = sse_events(
        node,
        "/v1/chat/completions",
        {"model": "via-litellm", "messages": HELLO, "max_tokens": 8, "stream": True},
    )
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("usage" not in c for c in chunks), "the usage chunk the gateway asked for leaked to the app"
    assert all(c["choices"] for c in chunks)

    parsed = list(
        client.chat.completions.create(model="via-litellm", messages=HELLO, max_tokens=8, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in parsed)
    assert parsed[-1].choices[0].finish_reason == "length"


def test_chat_stream_include_usage(node: NodeProcess, client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="via-litellm",
            messages=HELLO,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == [], "OpenAI's usage chunk carries no choices"
    assert last.usage is not None
    assert last.usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1])


def test_text_completion(node: NodeProcess, client: openai.OpenAI) -> None:
    reply = client.completions.create(model="via-litellm", prompt="Once upon a time", max_tokens=6)
    assert reply.object == "text_completion"
    assert reply.choices[0].text
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 6

    chunks = list(
        client.completions.create(
            model="via-litellm",
            prompt="Once upon a time",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


def test_extra_litellm_params_are_defaults(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="via-litellm", messages=HELLO)
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    reply = client.chat.completions.create(model="via-litellm", messages=HELLO, max_tokens=5)
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_embeddings(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model="embed-via-litellm", input=["hello", "world"])
    assert [d.index for d in reply.data] == [0, 1]
    assert len(reply.data[0].embedding) > 0
    assert reply.usage.prompt_tokens > 0


def test_unreachable_api_base_is_502(node: NodeProcess, client: openai.OpenAI) -> None:
    for stream in (False, True):
        resp = httpx.post(
            node.url + "/v1/chat/completions",
            json={"model": "litellm-down", "messages": HELLO, "stream": stream},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=60,
        )
        assert resp.status_code == 502, resp.text
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "backend_unreachable"
        assert error["type"] == "api_error"

    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="litellm-down", messages=HELLO)
    assert caught.value.status_code == 502


def test_upstream_error_keeps_its_status(client: openai.OpenAI) -> None:
    # `grammar` is llama.cpp's own parameter: it reaches the backend through LiteLLM, which refuses it.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="via-litellm", messages=HELLO, max_tokens=4, extra_body={"grammar": "root ::= ("}
        )
    assert "grammar" in caught.value.message


@pytest.mark.parametrize("key", ["api_base", "base_url", "api_key", "mock_response", "num_retries"])
def test_request_cannot_override_the_deployment(client: openai.OpenAI, key: str) -> None:
    """Body keys become LiteLLM arguments; ones that retarget the call or its credentials are refused."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="via-litellm", messages=HELLO, max_tokens=4, extra_body={key: DEAD_BASE}
        )
    assert caught.value.body["param"] == key  # type: ignore[index]


@pytest.mark.parametrize("model", ["tiny-ext", "via-litellm"])
async def test_litellm_sdk_as_client(litellm: ModuleType, node: NodeProcess, model: str) -> None:
    """LiteLLM's own SDK, pointed at the node as an OpenAI server (pass-through and adapter entries)."""
    common = {"model": f"openai/{model}", "api_base": node.url + "/v1", "api_key": API_KEY, "messages": HELLO}
    reply = await litellm.acompletion(**common, max_tokens=8)
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens == 8

    stream = await litellm.acompletion(
        **common, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = getattr(chunk, "usage", None) or usage
    assert text
    assert usage is not None
    assert usage.completion_tokens == 8


def test_node_log_is_clean(node: NodeProcess) -> None:
    """The adapter must not leak LiteLLM's debug banner into the node's output."""
    assert "Give Feedback" not in node.log()


def test_models_list(client: openai.OpenAI) -> None:
    names = {m.id for m in client.models.list()}
    assert {"via-litellm", "embed-via-litellm", "litellm-down", "tiny-ext"} <= names
