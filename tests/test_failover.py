"""Deployment failover with real processes: a `wwwserve node` in front of a real llama.cpp server, the
instant stub server, a port nobody listens on, a server that answers 500 and one that never answers.

A request whose deployment fails before its first byte (refused, 5xx, timeout) goes to another
deployment of its group; failing deployments cool down (readiness and the gossiped offer show it);
a group with nothing left falls back to its `router_settings.fallbacks`; every failure is logged
with the deployment id, and the app never sees a backend's address."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest

from tests.support import (
    LOOPBACK,
    ListeningChild,
    LlamaServer,
    NodeProcess,
    SilentBackend,
    free_port,
    http_get,
    wait_until,
)

MESSAGES = [{"role": "user", "content": "hi"}]


class FailingServer:
    """An OpenAI-style server whose every POST answers HTTP 500 with an error object."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                body = json.dumps({"error": {"message": "engine crashed", "type": "server_error"}}).encode()
                self.send_response(500)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def api_base(self) -> str:
        return f"http://{LOOPBACK}:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def entry(group: str, deployment: str, api_base: str, **params: Any) -> dict[str, Any]:
    return {
        "model_name": group,
        "litellm_params": {"model": f"openai/{group}", "api_base": api_base, "api_key": "x", **params},
        "model_info": {"id": deployment},
    }


@pytest.fixture(scope="module")
def stub() -> Iterator[ListeningChild]:
    child = ListeningChild("stub", [sys.executable, "benchmarks/stub_server.py", "--port", "0"])
    yield child
    child.stop()


@pytest.fixture(scope="module")
def dead_base() -> str:
    return f"http://{LOOPBACK}:{free_port()}/v1"  # nothing listens there


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, stub: ListeningChild, llama_tiny: LlamaServer, dead_base: str
) -> Iterator[NodeProcess]:
    failing, silent = FailingServer(), SilentBackend()
    stub_base = stub.url + "/v1"
    config = {
        "node": {"log_format": "json"},
        "router_settings": {
            "routing_strategy": "least-busy",  # all idle: the first listed (the dead one) first
            "allowed_fails": 0,
            "cooldown_time": 120,
            "fallbacks": [{"broken": ["m"]}],
        },
        "model_list": [
            entry("m", "m-dead", dead_base),
            entry("m", "m-llama", llama_tiny.base_url),
            entry("m", "m-stub", stub_base),
            entry("slow", "slow-silent", silent.api_base, timeout=1),
            entry("slow", "slow-stub", stub_base),
            entry("broken", "broken-500", failing.api_base),
            entry("broken", "broken-dead", dead_base),
            entry("lonely", "lonely-dead", dead_base),
        ],
    }
    proc = NodeProcess(config, tmp_path_factory.mktemp("failover")).start()
    yield proc
    proc.stop()
    failing.close()
    silent.close()


@pytest.fixture
def app(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key="none", max_retries=0, timeout=30)


def failures(node: NodeProcess) -> dict[str, list[dict[str, Any]]]:
    """The node's "deployment failed" log events, by deployment id."""
    out: dict[str, list[dict[str, Any]]] = {}
    for line in node.log().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "deployment failed":
                out.setdefault(event["deployment"], []).append(event)
    return out


def readiness(node: NodeProcess) -> tuple[int, dict[str, Any]]:
    status, body = http_get(node.url + "/health/ready")
    return status, json.loads(body)


def test_one_of_three_deployments_dead_fails_no_request(node: NodeProcess, app: openai.OpenAI) -> None:
    answered = 0
    for i in range(12):
        if i % 2:
            stream = app.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3, stream=True)
            answered += sum(1 for _ in stream) > 0
        else:
            answered += bool(app.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3).choices)
    assert answered == 12  # 0 failed requests
    # The dead deployment was tried first, failed once, and has been cooling down since.
    [failure] = failures(node)["m-dead"]
    assert failure["status"] == 502 and "Connect" in (failure["cause"] or "")
    status, ready = readiness(node)
    assert status == 200 and ready["status"] == "degraded"
    cooling = {b["id"]: b["cooldown_s"] for b in ready["backends"]}
    assert cooling["m-dead"] > 0 and cooling["m-llama"] is None and cooling["m-stub"] is None


def test_a_deployment_that_never_answers_times_out_into_the_next(
    node: NodeProcess, app: openai.OpenAI
) -> None:
    for _ in range(2):
        assert app.chat.completions.create(model="slow", messages=MESSAGES).choices
    [failure] = failures(node)["slow-silent"]  # cooled down after the first time out
    assert failure["status"] == 504


def test_the_app_never_sees_a_backend_address(node: NodeProcess, app: openai.OpenAI, dead_base: str) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        app.chat.completions.create(model="lonely", messages=MESSAGES)
    error = caught.value
    assert error.status_code == 502 and error.body["code"] == "backend_unreachable"
    port = dead_base.split(":")[-1].split("/")[0]
    assert "lonely-dead" in error.message
    assert LOOPBACK not in error.message and port not in error.message
    # Its group's only deployment does not cool down: it is tried again next time.
    with pytest.raises(openai.APIStatusError):
        app.chat.completions.create(model="lonely", messages=MESSAGES)
    assert len(failures(node)["lonely-dead"]) == 2


def test_a_group_with_every_deployment_failing_falls_back_then_is_withdrawn(
    node: NodeProcess, app: openai.OpenAI
) -> None:
    # broken-500 and broken-dead both fail (500, refused): the request is answered by group "m".
    answer = app.chat.completions.create(model="broken", messages=MESSAGES, max_tokens=3)
    assert answer.choices
    seen = failures(node)
    assert seen["broken-500"][0]["status"] == 500 and seen["broken-dead"][0]["status"] == 502

    # Both cool down: the node no longer tells peers it serves "broken", and is not ready for it.
    def offered() -> set[str]:
        me = next(p for p in node.get_json("/wwwserve/peers") if p["self"])
        return {m["name"] for m in me["models"]}

    wait_until(lambda: "broken" not in offered(), what="'broken' withdrawn from the gossiped offer")
    assert "m" in offered()
    status, ready = readiness(node)
    assert status == 503 and ready["status"] == "unavailable"
    # The fallback still answers while "broken" cools down.
    assert app.chat.completions.create(model="broken", messages=MESSAGES, max_tokens=3).choices
