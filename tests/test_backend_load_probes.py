"""The vLLM and SGLang load probes, read from recorded /metrics payloads served on loopback.

Each fixture under tests/fixtures/ keeps the real HELP/TYPE lines, label sets and histogram families of
its server (see the comment at the top of each file), so the Prometheus parsing is exercised as in use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.support import free_port
from wwwserve_gateway.backends.vllm import SGLangBackend, VLLMBackend
from wwwserve_gateway.plugin_api.backend import BackendLoad

FIXTURES = Path(__file__).parent / "fixtures"
PROM_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsServer:
    """Serves `body` with `status` at /metrics on 127.0.0.1, and notes what was asked for."""

    def __init__(self) -> None:
        self.status = 200
        self.body = ""
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization header)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve(self, body: str, status: int = 200) -> None:
        self.body, self.status = body, status

    async def _handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, request.headers.get("Authorization")))
        if request.path not in ("/metrics", "/engine-metrics"):
            return web.Response(status=404, text="Not Found")
        return web.Response(
            status=self.status, body=self.body.encode(), headers={"Content-Type": PROM_CONTENT_TYPE}
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def metrics() -> AsyncIterator[MetricsServer]:
    server = MetricsServer()
    await server.start()
    yield server
    await server.stop()


@pytest.mark.parametrize(
    ("fixture", "model", "cls", "expected"),
    [
        # vLLM 0.6 (V0 engine): the older gpu_cache_usage_perc; cpu_cache_usage_perc (0.0) is not KV use.
        (
            "vllm_metrics_v0.txt",
            "hosted_vllm/meta-llama/Llama-3.1-8B-Instruct",
            VLLMBackend,
            (7, 2, 0.6315789),
        ),
        # vLLM V1 with two data-parallel engines: counts summed, the KV fraction averaged (0.3125, 0.1875).
        ("vllm_metrics_v1.txt", "vllm/Qwen/Qwen3-0.6B", VLLMBackend, (8, 2, 0.25)),
        ("sglang_metrics.txt", "sglang/meta-llama/Llama-3.1-8B-Instruct", SGLangBackend, (162, 2826, 0.28)),
    ],
    ids=["vllm-v0", "vllm-v1-dp2", "sglang"],
)
async def test_probe_reads_recorded_metrics(
    metrics: MetricsServer,
    make_backend,
    fixture: str,
    model: str,
    cls: type,
    expected: tuple[int, int, float],
) -> None:
    metrics.serve((FIXTURES / fixture).read_text())
    backend = await make_backend(model, api_base=f"{metrics.url}/v1", api_key="sk-upstream")
    assert type(backend) is cls
    assert backend.ready  # ready at start, without contacting the server

    load = await backend.probe_load()

    assert load is not None
    assert (load.running, load.waiting) == expected[:2]
    assert load.usage == pytest.approx(expected[2], abs=1e-6)
    # /metrics sits at the server root, beside /v1, and gets the backend's key like every call.
    assert metrics.seen == [("/metrics", "Bearer sk-upstream")]


async def test_vllm_0_9_exports_both_cache_gauges_and_they_are_not_added(
    metrics: MetricsServer, make_backend
) -> None:
    # vLLM 0.9 kept the deprecated gauge beside its new name, with the same value.
    metrics.serve(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 4.0\n'
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="m"} 1.0\n'
        "# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage."
        "DEPRECATED: Use vllm:kv_cache_usage_perc instead.\n"
        "# TYPE vllm:gpu_cache_usage_perc gauge\n"
        'vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.42\n'
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.42\n'
    )
    backend = await make_backend("hosted_vllm/m", api_base=f"{metrics.url}/v1")
    assert await backend.probe_load() == BackendLoad(4, 1, pytest.approx(0.42))


async def test_sglang_label_set_of_newer_releases(metrics: MetricsServer, make_backend) -> None:
    # Newer SGLang labels scheduler gauges with engine_type and the parallel ranks.
    labels = 'engine_type="unified",model_name="Qwen/Qwen3-8B",moe_ep_rank="0",pp_rank="0",tp_rank="0"'
    metrics.serve(
        "# HELP sglang:num_running_reqs The number of running requests.\n"
        "# TYPE sglang:num_running_reqs gauge\n"
        f"sglang:num_running_reqs{{{labels}}} 24.0\n"
        "# HELP sglang:token_usage The token usage.\n"
        "# TYPE sglang:token_usage gauge\n"
        f"sglang:token_usage{{{labels}}} 0.73\n"
        "# HELP sglang:num_queue_reqs The number of requests in the waiting queue.\n"
        "# TYPE sglang:num_queue_reqs gauge\n"
        f"sglang:num_queue_reqs{{{labels}}} 3.0\n"
    )
    backend = await make_backend("sglang/Qwen/Qwen3-8B", api_base=f"{metrics.url}/v1")
    assert await backend.probe_load() == BackendLoad(24, 3, pytest.approx(0.73))


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, "Internal Server Error"),
        (404, "Not Found"),  # SGLang without --enable-metrics
        (200, "<html><body>login</body></html>"),  # not Prometheus text
        (
            200,
            "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 1\n",
        ),  # another server
        (200, 'vllm:num_requests_running{model_name="m"} NaN\n'),  # no usable value
    ],
    ids=["500", "404", "html", "no-gauge", "nan"],
)
@pytest.mark.parametrize("model", ["hosted_vllm/m", "sglang/m"])
async def test_probe_gives_none_when_the_metrics_say_nothing(
    metrics: MetricsServer, make_backend, model: str, status: int, body: str
) -> None:
    metrics.serve(body, status)
    backend = await make_backend(model, api_base=f"{metrics.url}/v1")
    assert await backend.probe_load() is None


@pytest.mark.parametrize("model", ["hosted_vllm/m", "sglang/m"])
async def test_probe_gives_none_when_the_server_is_down(make_backend, model: str) -> None:
    backend = await make_backend(model, api_base=f"http://127.0.0.1:{free_port()}/v1")
    assert backend.ready  # a remote server may be briefly down: requests get 502, routing keeps it
    assert await backend.probe_load() is None


async def test_metrics_url_from_api_base_forms_and_override(metrics: MetricsServer, make_backend) -> None:
    metrics.serve((FIXTURES / "vllm_metrics_v1.txt").read_text())
    trailing = await make_backend("vllm/m", api_base=f"{metrics.url}/v1/")
    override = await make_backend(
        "vllm/m", api_base=f"{metrics.url}/v1", metrics_url=f"{metrics.url}/engine-metrics"
    )
    assert trailing.metrics_url == f"{metrics.url}/metrics"
    assert (await trailing.probe_load()) == (await override.probe_load()) == BackendLoad(8, 2, 0.25)
    assert [path for path, _ in metrics.seen] == ["/metrics", "/engine-metrics"]
    assert override.describe()["metrics_url"] == f"{metrics.url}/engine-metrics"


async def test_default_servers_are_local(make_backend) -> None:
    vllm = await make_backend("hosted_vllm/m")
    sglang = await make_backend("sglang/m")
    assert (vllm.base_url, vllm.metrics_url) == ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/metrics")
    assert (sglang.base_url, sglang.metrics_url) == (
        "http://127.0.0.1:30000/v1",
        "http://127.0.0.1:30000/metrics",
    )
