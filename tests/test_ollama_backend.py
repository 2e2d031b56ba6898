"""The Ollama backend through a real gateway node process and the official OpenAI SDK.

Ollama itself cannot be installed here, so the default target is tests/fakes/ollama_server.py, which
replays Ollama's recorded response shapes (tests/fixtures/ollama/). The same tests run against a real
Ollama when OLLAMA_BASE_URL is set (e.g. http://127.0.0.1:11434); OLLAMA_MODEL names a pulled chat
model (default llama3.2). Against the fake, answers are checked to the byte; against a real server, by shape.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from openai import OpenAI

from tests.fakes.ollama_server import FIXTURES, FakeOllama
from tests.support import NodeProcess, free_port, wait_until
from wwwserve_gateway.backends.ollama import OllamaBackend, full_name, ollama_root
from wwwserve_gateway.plugin_api.backend import BackendLoad

API_KEY = "sk-ollama-test"
ADMIN_KEY = "admin-ollama-test"
ABSENT = "wwwserve-absent-model"  # a model no Ollama has pulled
REAL_BASE_URL = os.environ.get("OLLAMA_BASE_URL")
REAL_MODEL = os.environ.get("OLLAMA_MODEL", "llama3.2")
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]

RECORDED = json.loads((FIXTURES / "chat_completion.json").read_text())
RECORDED_TEXT = RECORDED["choices"][0]["message"]["content"]
RECORDED_USAGE = RECORDED["usage"]

needs_real = pytest.mark.skipif(
    not REAL_BASE_URL,
    reason="no real Ollama: set OLLAMA_BASE_URL (e.g. http://127.0.0.1:11434) and optionally OLLAMA_MODEL",
)


@dataclass
class Target:
    api_base: str
    model: str  # the upstream model name
    fake: FakeOllama | None  # None for a real Ollama


@pytest.fixture(scope="module", params=["fake", pytest.param("real", marks=needs_real)])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "real":
        assert REAL_BASE_URL is not None
        yield Target(REAL_BASE_URL, REAL_MODEL, None)
        return
    with FakeOllama() as fake:
        yield Target(fake.url, "llama3.2", fake)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, target: Target) -> Iterator[NodeProcess]:
    model_list = [
        {
            "model_name": "chat",
            "litellm_params": {"model": f"ollama_chat/{target.model}", "api_base": target.api_base},
        },
        {
            "model_name": "absent",
            "litellm_params": {"model": f"ollama_chat/{ABSENT}", "api_base": target.api_base},
        },
    ]
    if target.fake is not None:
        # The /v1 form of api_base, and the 'ollama/' prefix, for the embedding model the fake knows.
        embed = {"model": "ollama/nomic-embed-text", "api_base": target.api_base + "/v1"}
        model_list.append({"model_name": "embed", "litellm_params": embed})
    config = {
        "node": {"api_keys": [API_KEY], "admin_key": ADMIN_KEY, "load_poll_interval": 0.2},
        "model_list": model_list,
    }
    node = NodeProcess(config, tmp_path_factory.mktemp("ollama")).start()
    yield node
    node.stop()


@pytest.fixture
def client(node: NodeProcess) -> OpenAI:
    return OpenAI(base_url=node.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


def last_request(fake: FakeOllama, path: str) -> dict:
    return next(body for seen, body in reversed(fake.requests) if seen == path)


# -- through the gateway ---------------------------------------------------------------------------


def test_chat(client: OpenAI, target: Target) -> None:
    resp = client.chat.completions.create(model="chat", messages=QUESTION, max_tokens=32, temperature=0)

    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage is not None
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.system_fingerprint == "fp_ollama"
    assert resp.model == target.model  # Ollama echoes the model it was asked for
    if target.fake is not None:
        assert choice.message.content == RECORDED_TEXT
        assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (
            RECORDED_USAGE["prompt_tokens"],
            RECORDED_USAGE["completion_tokens"],
            RECORDED_USAGE["total_tokens"],
        )
        assert resp.id == RECORDED["id"]
        sent = last_request(target.fake, "/v1/chat/completions")
        assert (sent["model"], sent["messages"], sent["max_tokens"]) == ("llama3.2", QUESTION, 32)


def test_chat_streamed(client: OpenAI, target: Target) -> None:
    stream = client.chat.completions.create(
        model="chat", messages=QUESTION, max_tokens=32, temperature=0, stream=True
    )
    chunks = list(stream)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    # Unasked, the usage chunk the gateway requested for its own accounting is not relayed.
    assert all(c.usage is None and c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    if target.fake is not None:
        assert text == RECORDED_TEXT
        sent = last_request(target.fake, "/v1/chat/completions")
        assert sent["stream"] is True
        assert sent["stream_options"] == {"include_usage": True}


def test_chat_streamed_with_usage(client: OpenAI, target: Target) -> None:
    stream = client.chat.completions.create(
        model="chat",
        messages=QUESTION,
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    if target.fake is not None:
        assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
            RECORDED_USAGE["prompt_tokens"],
            RECORDED_USAGE["completion_tokens"],
            RECORDED_USAGE["total_tokens"],
        )


def test_model_not_pulled_is_relayed_as_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="absent", messages=QUESTION, max_tokens=4)
    assert ABSENT in caught.value.message


def test_admin_view_shows_whether_the_model_is_loaded(client: OpenAI, node: NodeProcess) -> None:
    client.chat.completions.create(model="chat", messages=QUESTION, max_tokens=1)  # loads a real model

    def loaded() -> dict[str, bool | None] | None:
        resp = httpx.get(
            node.url + "/wwwserve/admin/backends", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5
        )
        states = {b["model_name"]: b.get("loaded") for b in resp.json()["backends"]}
        return states if states["chat"] is True and states["absent"] is False else None

    wait_until(loaded, timeout=15, what="admin view: chat loaded, absent not loaded")


def test_embeddings(client: OpenAI, target: Target) -> None:
    if target.fake is None:
        pytest.skip("needs an embedding model; the real-Ollama run covers chat only")
    resp = client.embeddings.create(model="embed", input=["Why is the sky blue?", "Why is the grass green?"])

    assert [d.index for d in resp.data] == [0, 1]
    assert all(len(d.embedding) == 10 for d in resp.data)
    assert resp.usage.prompt_tokens == 16
    assert resp.model == "nomic-embed-text"
    sent = last_request(target.fake, "/v1/embeddings")
    assert sent["model"] == "nomic-embed-text"


# -- the backend on its own ------------------------------------------------------------------------


async def test_probe_load_on_target(make_backend, target: Target) -> None:
    backend = await make_backend(f"ollama_chat/{target.model}", api_base=target.api_base)
    assert await backend.probe_load() == BackendLoad(running=0, waiting=0, usage=0.0)
    assert isinstance(backend.loaded, bool)
    if target.fake is not None:
        assert backend.loaded is True  # the recorded /api/ps lists llama3.2:latest
        assert backend.describe()["loaded"] is True


async def test_probe_load_follows_api_ps(make_backend) -> None:
    with FakeOllama() as fake:
        backend = await make_backend("ollama/llama3.2", api_base=fake.url)
        # /api/ps counts no requests: running is the gateway's own in-flight count.
        backend.state.in_flight = 3
        assert await backend.probe_load() == BackendLoad(running=3, waiting=0, usage=0.0)
        assert backend.describe()["loaded"] is True

        fake.loaded = ["qwen2.5:7b"]  # another model took the memory
        assert await backend.probe_load() == BackendLoad(running=3, waiting=0, usage=0.0)
        assert backend.describe()["loaded"] is False

        fake.loaded = ["llama3.2:latest"]
        await backend.probe_load()
        assert backend.loaded is True

        fake.ps_status = 500
        assert await backend.probe_load() is None
        assert backend.loaded is None


async def test_probe_when_ollama_is_down(make_backend) -> None:
    backend = await make_backend("ollama_chat/llama3.2", api_base=f"http://127.0.0.1:{free_port()}")
    assert backend.ready  # ready at start: a local Ollama may still be starting
    assert await backend.probe_load() is None
    assert backend.describe()["loaded"] is None


@pytest.mark.parametrize(
    "api_base",
    [
        "http://127.0.0.1:11434",
        "http://127.0.0.1:11434/",
        "http://127.0.0.1:11434/v1",
        "http://127.0.0.1:11434/v1/",
    ],
)
async def test_api_base_with_or_without_v1(make_backend, api_base: str) -> None:
    backend = await make_backend("ollama_chat/llama3.2", api_base=api_base)
    assert isinstance(backend, OllamaBackend)
    assert backend.root == ollama_root(api_base) == "http://127.0.0.1:11434"
    assert backend.base_url == "http://127.0.0.1:11434/v1"
    assert backend.url("chat/completions") == "http://127.0.0.1:11434/v1/chat/completions"


async def test_default_api_base_is_local_ollama(make_backend) -> None:
    backend = await make_backend("ollama/llama3.2")
    assert isinstance(backend, OllamaBackend)
    assert backend.base_url == "http://127.0.0.1:11434/v1"


@pytest.mark.parametrize(
    ("name", "full"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("llama3.2:3b", "llama3.2:3b"),
        ("library/llama3.2", "library/llama3.2:latest"),
        ("registry.local:5000/team/model", "registry.local:5000/team/model:latest"),
        (
            "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
            "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
        ),
    ],
)
def test_model_names_get_ollamas_default_tag(name: str, full: str) -> None:
    assert full_name(name) == full
