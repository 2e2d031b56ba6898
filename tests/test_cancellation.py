"""A client that goes away cancels the backend's work; a backend that dies ends the stream cleanly."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.support import DEADLINE_S, LlamaServer, NodeProcess, SilentBackend, wait_until

# SmolLM2 decodes ~60 tokens/s on one thread here, so 4000 tokens would take over a minute:
# a slot freed within seconds can only mean the request was cancelled.
LONG = {
    "model": "smol",
    "messages": [{"role": "user", "content": "Count from one to ten thousand in words."}],
    "max_tokens": 4000,
    "ignore_eos": True,  # a llama.cpp parameter: it also shows unknown parameters pass through
}


@pytest.fixture(scope="module")
def smol_server(smollm2_path: Path) -> Iterator[LlamaServer]:
    server = LlamaServer(smollm2_path, "smol")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, smol_server: LlamaServer) -> Iterator[NodeProcess]:
    config = {
        "model_list": [
            {
                "model_name": "smol",
                "litellm_params": {"model": "openai/smol", "api_base": smol_server.base_url},
            }
        ]
    }
    node = NodeProcess(config, tmp_path_factory.mktemp("cancel")).start()
    yield node
    node.stop()


def test_disconnect_mid_stream_cancels_backend(node: NodeProcess, smol_server: LlamaServer) -> None:
    with httpx.stream(
        "POST", node.url + "/v1/chat/completions", json={**LONG, "stream": True}, timeout=30
    ) as resp:
        assert resp.status_code == 200
        chunks = resp.iter_bytes()
        next(chunks)
        next(chunks)
        assert smol_server.busy_slots() == 1
        assert node.metric("wwwserve_requests_in_flight") == 1
    # The client closed the connection; the gateway must drop the backend request.
    wait_until(lambda: smol_server.busy_slots() == 0, timeout=30, what="llama.cpp slot freed")
    wait_until(lambda: node.metric("wwwserve_requests_in_flight") == 0, what="gateway in-flight back to 0")


def test_disconnect_while_waiting_for_a_whole_answer(tmp_path_factory: pytest.TempPathFactory) -> None:
    """llama.cpp keeps decoding a non-streamed request whose client left (checked here directly),
    so what the gateway can do, and must, is drop its upstream connection."""
    backend = SilentBackend()
    config = {
        "model_list": [
            {"model_name": "s", "litellm_params": {"model": "openai/s", "api_base": backend.api_base}}
        ]
    }
    node = NodeProcess(config, tmp_path_factory.mktemp("whole")).start()
    try:
        body = {**LONG, "model": "s"}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(node.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
        assert backend.accepted.is_set()
        assert backend.closed_by_peer.wait(DEADLINE_S), "the gateway kept the backend request open"
        wait_until(
            lambda: node.metric("wwwserve_requests_in_flight") == 0, what="gateway in-flight back to 0"
        )
        assert node.metric("wwwserve_client_disconnects_total") == 1
    finally:
        node.stop()
        backend.close()


def test_backend_death_mid_stream_ends_with_error_event(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path
) -> None:
    server = LlamaServer(smollm2_path, "victim")
    config = {
        "model_list": [
            {
                "model_name": "victim",
                "litellm_params": {"model": "openai/victim", "api_base": server.base_url},
            }
        ]
    }
    node = NodeProcess(config, tmp_path_factory.mktemp("death")).start()
    try:
        body = {**LONG, "model": "victim", "stream": True}
        with httpx.stream("POST", node.url + "/v1/chat/completions", json=body, timeout=30) as resp:
            chunks = resp.iter_bytes()
            received = next(chunks)
            server.proc.send_signal(signal.SIGKILL)
            received += b"".join(chunks)  # must end, not hang (the read timeout would fail the test)
        events = [e for e in received.split(b"\n\n") if e]
        error = orjson.loads(events[-1].removeprefix(b"data: "))
        assert error["error"]["code"] == "backend_unreachable"
        assert events[0].startswith(b"data: {")
        # The node itself is unharmed.
        assert httpx.get(node.url + "/health").status_code == 200
    finally:
        node.stop()
        server.stop()
