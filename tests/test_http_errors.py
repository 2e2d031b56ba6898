"""Every bad input gets the right status and OpenAI's error shape, and the node keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY
from tests.support import NodeProcess, SilentBackend

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def assert_openai_error(resp: httpx.Response, status: int, *, param: str | None = None, code=None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def post(gateway: NodeProcess, path: str = "/v1/chat/completions", **kwargs) -> httpx.Response:
    kwargs.setdefault("headers", AUTH)
    return httpx.post(gateway.url + path, timeout=30, **kwargs)


def test_missing_api_key(gateway: NodeProcess) -> None:
    error = assert_openai_error(post(gateway, json=CHAT, headers={}), 401, code="invalid_api_key")
    assert "API key" in error["message"]


def test_wrong_api_key(gateway: NodeProcess) -> None:
    assert_openai_error(post(gateway, json=CHAT, headers={"Authorization": "Bearer sk-wrong"}), 401)
    assert_openai_error(post(gateway, json=CHAT, headers={"Authorization": API_KEY}), 401)


def test_models_need_the_key_too(gateway: NodeProcess) -> None:
    assert_openai_error(httpx.get(gateway.url + "/v1/models"), 401)


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_malformed_json(gateway: NodeProcess, raw: bytes) -> None:
    resp = post(gateway, content=raw, headers={**AUTH, "content-type": "application/json"})
    assert_openai_error(resp, 400, code="invalid_json")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "tiny"}, "messages"),
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": "hi"}, "messages"),
        ({"model": "tiny", "messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": 42, "messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({**CHAT, "max_tokens": "5"}, "max_tokens"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "temperature": 5}, "temperature"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ],
)
def test_invalid_fields_name_the_param(gateway: NodeProcess, body: dict, param: str) -> None:
    assert_openai_error(post(gateway, json=body), 400, param=param)


def test_completion_and_embedding_fields(gateway: NodeProcess) -> None:
    assert_openai_error(post(gateway, "/v1/completions", json={"model": "tiny"}), 400, param="prompt")
    assert_openai_error(post(gateway, "/v1/embeddings", json={"model": "tiny-embed"}), 400, param="input")


def test_unknown_model(gateway: NodeProcess) -> None:
    error = assert_openai_error(post(gateway, json={**CHAT, "model": "gpt-17"}), 404, code="model_not_found")
    assert "gpt-17" in error["message"]


def test_endpoint_the_model_does_not_serve(gateway: NodeProcess) -> None:
    assert_openai_error(
        post(gateway, "/v1/embeddings", json={"model": "tiny", "input": "x"}), 400, param="model"
    )


def test_body_over_the_limit(gateway: NodeProcess) -> None:
    huge = {**CHAT, "messages": [{"role": "user", "content": "x" * 70000}]}
    assert_openai_error(post(gateway, json=huge), 413)


def test_chunked_body_over_the_limit(gateway: NodeProcess) -> None:
    """No Content-Length: the limit is enforced while the body streams in."""

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}]}'

    assert_openai_error(post(gateway, content=chunks()), 413)


def test_backend_unreachable(gateway: NodeProcess) -> None:
    assert_openai_error(post(gateway, json={**CHAT, "model": "down"}), 502, code="backend_unreachable")
    assert_openai_error(post(gateway, json={**CHAT, "model": "down", "stream": True}), 502)


def test_backend_http_error_is_relayed(gateway: NodeProcess) -> None:
    error = assert_openai_error(post(gateway, json={**CHAT, "n": 2}), 400)
    assert error["type"] == "invalid_request_error"


def test_unknown_path_and_method(gateway: NodeProcess) -> None:
    assert_openai_error(httpx.get(gateway.url + "/v1/nope", headers=AUTH), 404)
    assert_openai_error(httpx.get(gateway.url + "/v1/chat/completions", headers=AUTH), 405)


def test_node_still_serves_after_bad_input(gateway: NodeProcess) -> None:
    resp = post(gateway, json=CHAT)
    assert resp.status_code == 200
    assert resp.json()["usage"]["completion_tokens"] == 2


@pytest.fixture(scope="module")
def silent_server() -> Iterator[int]:
    """A backend that accepts connections and never answers."""
    server = SilentBackend()
    yield server.port
    server.close()


@pytest.fixture(scope="module")
def timeout_node(tmp_path_factory: pytest.TempPathFactory, silent_server: int) -> Iterator[NodeProcess]:
    config = {
        "model_list": [
            {
                "model_name": "silent",
                "litellm_params": {
                    "model": "openai/silent",
                    "api_base": f"http://127.0.0.1:{silent_server}/v1",
                    "timeout": 0.5,
                },
            },
            {
                "model_name": "never-ready",
                "litellm_params": {"model": "llamacpp/x", "model_path": "/nonexistent/model.gguf"},
            },
        ]
    }
    node = NodeProcess(config, tmp_path_factory.mktemp("timeouts")).start(wait_ready=False)
    yield node
    node.stop()


def test_backend_timeout(timeout_node: NodeProcess) -> None:
    assert_openai_error(post(timeout_node, json={**CHAT, "model": "silent"}), 504, code="backend_timeout")
    assert_openai_error(post(timeout_node, json={**CHAT, "model": "silent", "stream": True}), 504)


def test_backend_not_ready(timeout_node: NodeProcess) -> None:
    resp = post(timeout_node, json={**CHAT, "model": "never-ready"})
    assert_openai_error(resp, 503, code="backend_unavailable")
    assert resp.headers["retry-after"] == "1"
    ready = httpx.get(timeout_node.url + "/health/ready")
    assert ready.status_code == 503
    assert {
        "id": "never-ready:llamacpp/x",
        "model": "never-ready",
        "ready": False,
        "cooldown_s": None,
    } in ready.json()["backends"]


def test_startup_failure_is_logged(timeout_node: NodeProcess) -> None:
    assert "/nonexistent/model.gguf" in Path(timeout_node.log_path).read_text()
