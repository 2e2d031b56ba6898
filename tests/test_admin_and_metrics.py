"""Backends added and removed on a running node; metrics; per-deployment limits."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator

import httpx
import pytest
import yaml

from tests.conftest import API_KEY
from tests.support import LlamaServer, NodeProcess, wait_until
from tests.test_http_errors import assert_openai_error

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": "Bearer admin-secret"}


def chat(node: NodeProcess, model: str, headers: dict | None = None, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    return httpx.post(node.url + "/v1/chat/completions", json=body, headers=headers or {}, timeout=30)


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.match(r"^([\w:]+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    raise AssertionError(f"{name}{labels} not in metrics")


def test_admin_needs_its_own_key(gateway: NodeProcess) -> None:
    assert_openai_error(httpx.get(gateway.url + "/wwwserve/admin/backends"), 401)
    assert_openai_error(httpx.get(gateway.url + "/wwwserve/admin/backends", headers=AUTH), 401)
    listing = httpx.get(gateway.url + "/wwwserve/admin/backends", headers=ADMIN).json()["backends"]
    smol = next(b for b in listing if b["model_name"] == "smollm2")
    assert smol["embedded"] and smol["ready"] and smol["model_file"].endswith(".gguf")
    assert "api_key" not in smol


def test_add_use_and_remove_a_backend(gateway: NodeProcess, llama_tiny: LlamaServer) -> None:
    entry = {
        "model_name": "hot",
        "litellm_params": {"model": "openai/tiny-ext", "api_base": llama_tiny.base_url},
        "model_info": {"id": "hot-1"},
    }
    assert_openai_error(chat(gateway, "hot", AUTH), 404)
    added = httpx.post(gateway.url + "/wwwserve/admin/backends", json=entry, headers=ADMIN)
    assert added.status_code == 201, added.text
    assert added.json()["id"] == "hot-1"
    wait_until(lambda: chat(gateway, "hot", AUTH).status_code == 200, 10, what="new backend serving")
    assert "hot" in {m["id"] for m in httpx.get(gateway.url + "/v1/models", headers=AUTH).json()["data"]}
    assert_openai_error(httpx.post(gateway.url + "/wwwserve/admin/backends", json=entry, headers=ADMIN), 409)
    removed = httpx.delete(gateway.url + "/wwwserve/admin/backends/hot-1", headers=ADMIN)
    assert removed.status_code == 204
    assert_openai_error(chat(gateway, "hot", AUTH), 404)
    assert_openai_error(httpx.delete(gateway.url + "/wwwserve/admin/backends/hot-1", headers=ADMIN), 404)


def test_add_rejects_a_bad_entry_naming_the_key(gateway: NodeProcess) -> None:
    entry = {"model_name": "bad", "litellm_params": {"model": "openai/x", "api_bsae": "http://127.0.0.1:1"}}
    error = assert_openai_error(
        httpx.post(gateway.url + "/wwwserve/admin/backends", json=entry, headers=ADMIN), 400
    )
    assert "api_bsae" in error["message"] and "api_base" in error["message"]


def test_metrics(gateway: NodeProcess) -> None:
    assert chat(gateway, "tiny", AUTH).status_code == 200
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        headers=AUTH,
        timeout=30,
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "stream": True,
        },
    ) as resp:
        resp.read()
    text = httpx.get(gateway.url + "/metrics").text
    assert (
        metric(text, "wwwserve_requests_total", endpoint="chat/completions", model="tiny", status="200") >= 2
    )
    assert (
        metric(text, "wwwserve_request_duration_seconds_count", endpoint="chat/completions", model="tiny")
        >= 2
    )
    assert metric(text, "wwwserve_time_to_first_token_seconds_count", model="tiny") >= 1
    assert metric(text, "wwwserve_tokens_total", model="tiny", kind="completion") >= 5
    assert metric(text, "wwwserve_requests_in_flight") == 0
    assert metric(text, "wwwserve_backend_ready", model="tiny") == 1

    # llama.cpp's own load report, polled from its /metrics.
    def smollm2_usage() -> float | None:
        try:
            return metric(httpx.get(gateway.url + "/metrics").text, "wwwserve_backend_usage", model="smollm2")
        except AssertionError:
            return None

    assert wait_until(lambda: smollm2_usage() is not None, 15, what="smollm2 load gauges") is not None
    assert smollm2_usage() == 0


def test_error_counter(gateway: NodeProcess) -> None:
    def errors() -> float:
        try:
            return metric(
                httpx.get(gateway.url + "/metrics").text,
                "wwwserve_request_errors_total",
                endpoint="chat/completions",
                type="invalid_request_error",
            )
        except AssertionError:
            return 0

    before = errors()
    chat(gateway, "no-such-model", AUTH)
    assert errors() == before + 1


@pytest.fixture
def limited_node(tmp_path_factory: pytest.TempPathFactory, llama_tiny: LlamaServer) -> Iterator[NodeProcess]:
    config = {
        "node": {"admin_key": "admin-secret"},
        "model_list": [
            {
                "model_name": "rpm2",
                "litellm_params": {"model": "openai/t", "api_base": llama_tiny.base_url, "rpm": 2},
            },
        ],
    }
    node = NodeProcess(config, tmp_path_factory.mktemp("limited")).start()
    yield node
    node.stop()


def test_rpm_limit_gives_429(limited_node: NodeProcess) -> None:
    assert chat(limited_node, "rpm2").status_code == 200
    assert chat(limited_node, "rpm2").status_code == 200
    resp = chat(limited_node, "rpm2")
    assert_openai_error(resp, 429, code="rate_limit_exceeded")
    assert resp.headers["retry-after"]


def test_reload_from_file_and_sighup(limited_node: NodeProcess, llama_tiny: LlamaServer) -> None:
    config = yaml.safe_load(limited_node.config_path.read_text())
    config["model_list"].append(
        {"model_name": "fresh", "litellm_params": {"model": "openai/t", "api_base": llama_tiny.base_url}}
    )
    limited_node.config_path.write_text(yaml.safe_dump(config))
    reloaded = httpx.post(limited_node.url + "/wwwserve/admin/reload", headers=ADMIN)
    assert reloaded.json() == {"added": ["fresh:openai/t"], "removed": []}
    wait_until(lambda: chat(limited_node, "fresh").status_code == 200, 10, what="reloaded backend")

    config["model_list"] = config["model_list"][1:]
    limited_node.config_path.write_text(yaml.safe_dump(config))
    assert limited_node.proc is not None
    limited_node.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: chat(limited_node, "rpm2").status_code == 404, 10, what="SIGHUP reload")
    assert chat(limited_node, "fresh").status_code == 200


def test_admin_disabled_without_key(tmp_path_factory: pytest.TempPathFactory) -> None:
    node = NodeProcess({"model_list": []}, tmp_path_factory.mktemp("noadmin")).start()
    try:
        assert_openai_error(httpx.get(node.url + "/wwwserve/admin/backends"), 403, code="admin_disabled")
    finally:
        node.stop()
