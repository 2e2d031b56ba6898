"""A client that goes away cancels the backend's work; a backend that dies ends the stream cleanly."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.support import LlamaServer, NodeProcess, wait_until

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


def in_flight(node: NodeProcess) -> float:
    for line in httpx.get(node.url + "/metrics").text.splitlines():
        if line.startswith("wwwserve_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no in-flight gauge")


def test_disconnect_mid_stream_cancels_backend(node: NodeProcess, smol_server: LlamaServer) -> None:
    with httpx.stream(
        "POST", node.url + "/v1/chat/completions", json={**LONG, "stream": True}, timeout=30
    ) as resp:
        assert resp.status_code == 200
        chunks = resp.iter_bytes()
        next(chunks)
        next(chunks)
        assert smol_server.busy_slots() == 1
    # The client closed the connection; the gateway must drop the backend request.
    wait_until(lambda: smol_server.busy_slots() == 0, timeout=10, what="llama.cpp slot freed")
    wait_until(lambda: in_flight(node) == 0, timeout=5, what="gateway in-flight back to 0")


class SilentBackend:
    """Accepts connections, never answers, and records when the peer closes one."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = threading.Event()
        self.closed_by_peer = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        self.accepted.set()
        with conn:
            while conn.recv(65536):
                pass
        self.closed_by_peer.set()


def test_disconnect_while_waiting_for_a_whole_answer(tmp_path_factory: pytest.TempPathFactory) -> None:
    """llama.cpp keeps decoding a non-streamed request whose client left (checked here directly),
    so what the gateway can do, and must, is drop its upstream connection."""
    backend = SilentBackend()
    api_base = f"http://127.0.0.1:{backend.port}/v1"
    config = {
        "model_list": [{"model_name": "s", "litellm_params": {"model": "openai/s", "api_base": api_base}}]
    }
    node = NodeProcess(config, tmp_path_factory.mktemp("whole")).start()
    try:
        body = {**LONG, "model": "s"}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(node.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
        assert backend.accepted.is_set()
        assert backend.closed_by_peer.wait(10), "the gateway kept the backend request open"
        wait_until(lambda: in_flight(node) == 0, timeout=5, what="gateway in-flight back to 0")
        assert "wwwserve_client_disconnects_total 1.0" in httpx.get(node.url + "/metrics").text
    finally:
        node.stop()


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
