"""More of the OpenAI API through a node: `/v1/responses` (the openai SDK's responses.create and
responses.stream), the pass-through endpoints (rerank, moderations, images) with the same auth,
metrics and error shapes, and CORS for browser front-ends. Real `wwwserve node` process in front of a
real llama.cpp server (which serves /v1/responses itself)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support import ListeningChild, LlamaServer, NodeProcess

KEY = "sk-responses-test"
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def stub() -> Iterator[ListeningChild]:
    """An OpenAI-style server with chat completions only (/v1/responses is a 404 there)."""
    child = ListeningChild("stub", [sys.executable, "benchmarks/stub_server.py", "--port", "0"])
    yield child
    child.stop()


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, llama_tiny: LlamaServer, stub: ListeningChild
) -> Iterator[NodeProcess]:
    config = {
        "node": {"api_keys": [KEY], "cors_allow_origins": [ORIGIN]},
        "model_list": [
            {
                "model_name": "tiny",
                "litellm_params": {"model": "openai/tiny-ext", "api_base": llama_tiny.base_url},
                "model_info": {"id": "tiny-1"},
            },
            {
                "model_name": "chat-only",
                "litellm_params": {"model": "openai/stub", "api_base": stub.url + "/v1"},
            },
        ],
    }
    proc = NodeProcess(config, tmp_path_factory.mktemp("responses")).start()
    yield proc
    proc.stop()


@pytest.fixture
def app(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_responses_create(node: NodeProcess, app: openai.OpenAI) -> None:
    before = node.metric("wwwserve_requests_total", endpoint="responses", status="200")
    response = app.responses.create(model="tiny", input="Say hi", max_output_tokens=4)
    assert response.object == "response" and response.status == "completed"
    assert response.output_text and response.usage.output_tokens > 0
    assert node.metric("wwwserve_requests_total", endpoint="responses", status="200") == before + 1
    tokens = node.metric("wwwserve_tokens_total", model="tiny", kind="completion")
    assert tokens >= response.usage.output_tokens


def test_responses_stream(app: openai.OpenAI) -> None:
    with app.responses.stream(model="tiny", input="Say hi", max_output_tokens=4) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and "response.output_text.delta" in kinds
    assert kinds[-1] == "response.completed"
    assert final.output_text and final.usage.output_tokens > 0


def test_responses_through_chat_completions_where_the_backend_lacks_them(app: openai.OpenAI) -> None:
    response = app.responses.create(model="chat-only", input="Say hi", instructions="Be brief")
    assert response.status == "completed" and response.output_text == "Hello! This is a canned stub answer."
    assert response.usage.input_tokens == 9 and response.usage.output_tokens == 9
    with app.responses.stream(model="chat-only", input=[{"role": "user", "content": "hi"}]) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas and final.output_text == "".join(deltas) and final.usage.output_tokens > 0
    with pytest.raises(openai.BadRequestError) as bad:
        app.responses.create(model="chat-only", input="hi", tools=[{"type": "web_search"}])
    assert bad.value.body["param"] == "tools"


def test_pass_through_endpoints_keep_auth_and_error_shapes(node: NodeProcess, app: openai.OpenAI) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=node.url + "/v1", api_key="sk-wrong", max_retries=0).moderations.create(
            model="tiny", input="x"
        )
    with pytest.raises(openai.BadRequestError) as bad:
        app.post("/rerank", body={"model": "tiny", "query": "q"}, cast_to=object)
    assert bad.value.body["param"] == "documents"
    # llama.cpp started without --reranking answers 501: relayed in OpenAI's shape.
    with pytest.raises(openai.APIStatusError) as relayed:
        app.post("/rerank", body={"model": "tiny", "query": "q", "documents": ["a", "b"]}, cast_to=object)
    assert relayed.value.status_code == 501 and "rerank" in relayed.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        app.images.generate(model="elsewhere", prompt="a cat")
    assert missing.value.body["code"] == "model_not_found"


def test_cors_preflight_and_simple_request(node: NodeProcess) -> None:
    preflight = httpx.options(
        node.url + "/v1/chat/completions",
        headers={
            "origin": ORIGIN,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    other = httpx.options(
        node.url + "/v1/chat/completions",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    answer = httpx.get(node.url + "/v1/models", headers={"origin": ORIGIN, "authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN


def test_no_cors_headers_without_settings(tmp_path: Path, llama_tiny: LlamaServer) -> None:
    from wwwserve_gateway.config.loading import parse_config
    from wwwserve_gateway.http.cors import with_cors

    settings = parse_config({"node": {"data_dir": str(tmp_path)}}).node
    app = object()
    assert with_cors(app, settings) is app  # nothing wrapped, nothing paid per request
