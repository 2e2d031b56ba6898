"""Fixtures: real model files, a real llama.cpp server and a real gateway node process (per session);
backends built as the node builds them (per test)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.support import LlamaServer, NodeProcess
from wwwserve_gateway.model_store import TINY_MODEL, find_model, pull
from wwwserve_gateway.plugin_api.backend import Backend, BackendContext

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Models persist between runs (a fresh CI machine pulls them once: ~5 s).
os.environ.setdefault("WWWSERVE_MODELS_DIR", str(Path.home() / ".cache" / "wwwserve" / "models"))

API_KEY = "sk-test-key"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return Path(os.environ["WWWSERVE_MODELS_DIR"])


@pytest.fixture(scope="session")
def smollm2_path(models_dir: Path) -> Path:
    return find_model("smollm2") or pull("smollm2", models_dir)


@pytest.fixture(scope="session")
def tiny_path(models_dir: Path) -> Path:
    return find_model(TINY_MODEL) or pull(TINY_MODEL, models_dir)


@pytest.fixture(scope="session")
def llama_tiny(tiny_path: Path) -> Iterator[LlamaServer]:
    """A standalone llama.cpp server with the tiny model, used as an external backend."""
    server = LlamaServer(tiny_path, "tiny-ext", parallel=2)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, tiny_path: Path, llama_tiny: LlamaServer
) -> Iterator[NodeProcess]:
    """One node in front of embedded SmolLM2, the tiny model (chat and embedding), an external
    llama.cpp server, and a backend that is not listening (for 502s). Requires an API key."""
    workdir = tmp_path_factory.mktemp("gateway")
    config = {
        "node": {"api_keys": [API_KEY], "admin_key": "admin-secret", "max_body_bytes": 65536},
        "model_list": [
            {"model_name": "smollm2", "litellm_params": {"model": "llamacpp/smollm2"}},
            {"model_name": "tiny", "litellm_params": {"model": "llamacpp/tiny-random"}},
            {
                "model_name": "tiny-embed",
                "litellm_params": {"model": "llamacpp/tiny-random", "embedding": True},
            },
            {
                "model_name": "tiny-ext",
                "litellm_params": {"model": "openai/tiny-ext", "api_base": llama_tiny.base_url},
            },
            {
                "model_name": "down",
                "litellm_params": {"model": "openai/down", "api_base": "http://127.0.0.1:9/v1"},
            },
        ],
    }
    node = NodeProcess(config, workdir).start()
    yield node
    node.stop()


@pytest.fixture
async def make_backend(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Backend]]]:
    """Builds backends through the entry points, as the node does (`await make_backend(model, **params)`),
    started; closes them afterwards."""
    from wwwserve_gateway.config.schema import ModelEntry
    from wwwserve_gateway.deployments import build_backend

    made: list[Backend] = []

    async def make(model: str, **params: object) -> Backend:
        entry = ModelEntry(model_name="m", litellm_params={"model": model, **params})
        backend = build_backend(entry, BackendContext(data_dir=tmp_path, request_timeout=30.0))
        await backend.start()
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()
