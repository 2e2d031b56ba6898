"""vLLM and SGLang backends: the OpenAI pass-through plus a load probe of the server's Prometheus /metrics.

Requests go through `OpenAICompatBackend` untouched. `probe_load` reads the engine's own gauges from
`{api_base without /v1}/metrics` (or `metrics_url`):

- vLLM: `vllm:num_requests_running`, `vllm:num_requests_waiting`, and the KV-cache fraction from
  `vllm:kv_cache_usage_perc` (0.9 and later) or `vllm:gpu_cache_usage_perc` (older releases). 0.9 exports
  both with one value, so the newer name wins; the two are never added.
- SGLang (started with `--enable-metrics`, else /metrics is 404): `sglang:num_running_reqs`,
  `sglang:num_queue_reqs`, `sglang:token_usage`.

Counts are summed over label sets (a data-parallel server has one per engine); the usage fraction is
averaged over them, since summing would report two engines at 60 % as 120 %. Any failure (connection
refused, non-200, text without the running gauge) gives None, and the gateway falls back to its own count.

Readiness: like the pass-through, these backends are ready as soon as they start, without contacting the
server. A remote server may be briefly down or restarting; its requests then fail fast with 502 and the
probe reports nothing, instead of the deployment dropping out of routing until a health check passes.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import aiohttp
from pydantic import Field

from wwwserve_gateway.backends.openai_compat import OpenAICompatBackend, OpenAICompatSettings
from wwwserve_gateway.plugin_api.backend import BackendLoad
from wwwserve_gateway.prom_text import gauge_values

# The registry also bounds each probe by its poll interval; this guards direct callers.
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5)


class MetricsProbeSettings(OpenAICompatSettings):
    metrics_url: str | None = Field(
        None, description="the server's Prometheus endpoint (default: api_base without /v1, plus /metrics)"
    )


class VLLMSettings(MetricsProbeSettings):
    api_base: str = Field("http://127.0.0.1:8000/v1", description="the vLLM server's base URL, ending in /v1")


class SGLangSettings(MetricsProbeSettings):
    api_base: str = Field(
        "http://127.0.0.1:30000/v1", description="the SGLang server's base URL, ending in /v1"
    )


class MetricsProbedBackend(OpenAICompatBackend):
    """A pass-through whose load comes from three Prometheus gauges named by the subclass."""

    Settings = MetricsProbeSettings
    settings: MetricsProbeSettings
    continuation_params: ClassVar[dict[str, Any]] = {
        "continue_final_message": True,
        "add_generation_prompt": False,
    }

    running_metric: ClassVar[str]
    waiting_metric: ClassVar[str]
    usage_metrics: ClassVar[tuple[str, ...]]  # fraction 0..1; the first one present is used

    @property
    def metrics_url(self) -> str:
        if self.settings.metrics_url:
            return self.settings.metrics_url
        return re.sub(r"/v1/?$", "", self.base_url.rstrip("/")) + "/metrics"

    async def probe_load(self) -> BackendLoad | None:
        try:
            async with self.session().get(self.metrics_url, timeout=PROBE_TIMEOUT) as resp:
                if resp.status != 200:
                    return None
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
            return None
        return load_from_metrics(text, self.running_metric, self.waiting_metric, self.usage_metrics)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["metrics_url"] = self.metrics_url
        return info


class VLLMBackend(MetricsProbedBackend):
    Settings = VLLMSettings
    settings: VLLMSettings
    running_metric = "vllm:num_requests_running"
    waiting_metric = "vllm:num_requests_waiting"
    usage_metrics = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


class SGLangBackend(MetricsProbedBackend):
    Settings = SGLangSettings
    settings: SGLangSettings
    running_metric = "sglang:num_running_reqs"
    waiting_metric = "sglang:num_queue_reqs"
    usage_metrics = ("sglang:token_usage",)


def load_from_metrics(
    text: str, running: str, waiting: str, usage_names: tuple[str, ...]
) -> BackendLoad | None:
    """The load in a Prometheus text exposition, or None when it lacks the running gauge."""
    try:
        gauges = gauge_values(text, {running, waiting, *usage_names})
    except ValueError:  # not Prometheus text (a proxy's HTML page, say)
        return None
    if not gauges.get(running):  # another server, or an engine that has not reported yet
        return None
    fractions = next((gauges[name] for name in usage_names if gauges.get(name)), [])
    usage = sum(fractions) / len(fractions) if fractions else 0.0
    return BackendLoad(
        running=round(sum(gauges[running])),
        waiting=round(sum(gauges.get(waiting, []))),
        usage=min(1.0, max(0.0, usage)),
    )
