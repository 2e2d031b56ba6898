"""A LiteLLM proxy `config.yaml` read as LiteLLM reads it, turned into a node's config.

`adopt_litellm(raw)` runs on the parsed YAML before validation. Each key of LiteLLM's proxy config
is either honoured (moved to where the node keeps it) or accepted with exactly one warning that names
it and says why it has no effect on a node; none is an error. `os.environ/` references inside keys
that are dropped are never resolved, so a config does not need `REDIS_HOST` or `DATABASE_URL` set
for sections the node does not use. docs/litellm-config.md has the whole mapping.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

NO_DB = "a node keeps no database (keys, budgets and spend live in its ledger)"
NO_REDIS = "each node keeps its own routing state; the network shares load through gossip"
NO_CALLBACKS = "LiteLLM callbacks are not run; use /metrics and the access log (node.access_log)"
NO_CACHE = "a node keeps no response cache"
NO_UI = "LiteLLM's admin UI is not part of a node; the node has its dashboard at /ui"
PASSED_ON = "requests are forwarded as sent: the backend judges its own parameters"
NOT_HERE = "a LiteLLM proxy feature a node does not have"

# LiteLLM's top-level sections besides model_list and the four settings sections.
TOP_LEVEL = {
    "include": "included files are not read: copy their sections into this file",
    "guardrails": "guardrails are not run (the node's judge plugin checks answers instead)",
    "callback_settings": NO_CALLBACKS,
    "credential_list": "credentials are given per deployment (litellm_params.api_key)",
    "mcp_servers": NOT_HERE,
    "mcp_tools": NOT_HERE,
    "vector_store_registry": NOT_HERE,
    "files_settings": NOT_HERE,
    "finetune_settings": NOT_HERE,
    "assistant_settings": NOT_HERE,
    "search_tools": NOT_HERE,
    "prompts": NOT_HERE,
    "model_group_settings": NOT_HERE,
}

LITELLM_SETTINGS = {
    "drop_params": PASSED_ON,
    "modify_params": PASSED_ON,
    "set_verbose": "use node.log_level",
    "cache": NO_CACHE,
    "cache_params": NO_CACHE,
    "telemetry": "a node sends no telemetry",
    "max_budget": NO_DB,
    "budget_duration": NO_DB,
    "default_team_settings": NO_DB,
    "default_internal_user_params": NO_DB,
    "max_parallel_requests": "set max_parallel_requests per deployment in litellm_params",
    "force_ipv4": "the node connects to api_base as given",
}
LITELLM_SETTINGS_CALLBACK = re.compile(
    r"callback|langfuse|logging|log_raw|redact|turn_off_message|otel|sentry"
)

GENERAL_SETTINGS = {
    "database_url": NO_DB,
    "database_connection_pool_limit": NO_DB,
    "database_connection_timeout": NO_DB,
    "store_model_in_db": NO_DB + "; deployments come from model_list and the admin API",
    "proxy_batch_write_at": NO_DB,
    "disable_spend_logs": NO_DB,
    "allow_requests_on_db_unavailable": NO_DB,
    "alerting": NO_CALLBACKS,
    "alerting_threshold": NO_CALLBACKS,
    "alert_types": NO_CALLBACKS,
    "ui_access_mode": NO_UI,
    "custom_auth": "apps authenticate with node.api_keys",
    "pass_through_endpoints": "pass-through routes are not served",
    "background_health_checks": "the node probes its deployments' load every node.load_poll_interval",
    "health_check_interval": "the node probes its deployments' load every node.load_poll_interval",
}

ROUTER_SETTINGS = {
    "redis_host": NO_REDIS,
    "redis_port": NO_REDIS,
    "redis_password": NO_REDIS,
    "redis_url": NO_REDIS,
    "cache_responses": NO_CACHE,
    "enable_pre_call_checks": "context windows are checked by the backend (context_window_fallbacks "
    "then apply)",
    "routing_strategy_args": "the strategies here take no arguments",
    "provider_budget_config": NO_DB,
    "model_group_retry_policy": "retries follow num_retries for every error kind",
    "retry_policy": "retries follow num_retries for every error kind",
    "allowed_fails_policy": "cooldowns follow allowed_fails for every error kind",
}
ROUTING_STRATEGIES = {"least-busy", "simple-shuffle", "latency-based-routing"}
ROUTER_KEYS = {
    "routing_strategy",
    "num_retries",
    "timeout",
    "allowed_fails",
    "cooldown_time",
    "retry_after",
    "fallbacks",
    "context_window_fallbacks",
    "default_fallbacks",
    "model_group_alias",
}

# litellm_params keys LiteLLM knows that a node's OpenAI-style backends do not take. (The
# `litellm/` backend takes them all: LiteLLM itself reads them.)
REQUEST_DEFAULTS = {
    "temperature",
    "max_tokens",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "stop",
    "seed",
    "n",
    "response_format",
}
DEPLOYMENT_PARAMS = {
    "keep_alive": PASSED_ON + " (send keep_alive in the request to an Ollama backend)",
    "api_version": "OpenAI-style backends have no API version (use a litellm/ model for Azure)",
    "input_cost_per_token": "prices are the network's (ledger), not per deployment",
    "output_cost_per_token": "prices are the network's (ledger), not per deployment",
    "input_cost_per_second": "prices are the network's (ledger), not per deployment",
    "output_cost_per_second": "prices are the network's (ledger), not per deployment",
    "tags": "tag-based routing is not done",
    "order": "deployments are chosen by routing_strategy",
    "region_name": NOT_HERE,
    "drop_params": PASSED_ON,
    "mock_response": NOT_HERE,
    "use_in_pass_through": NOT_HERE,
    "merge_reasoning_content_in_choices": PASSED_ON,
    "litellm_credential_name": "credentials are given per deployment (api_key)",
    "configurable_clientside_auth_params": "apps cannot supply backend credentials",
    "max_budget": NO_DB,
    "budget_duration": NO_DB,
    "custom_llm_provider": None,  # honoured: it becomes the model's provider prefix
    "headers": None,  # honoured: extra_headers
}

# Bare model names LiteLLM infers as OpenAI's.
OPENAI_NAMES = re.compile(
    r"^(gpt-|chatgpt-|o1|o3|o4|text-embedding-|text-moderation|omni-moderation|dall-e|gpt-image|whisper|tts-"
    r"|davinci|babbage|computer-use)"
)


@functools.cache
def backend_providers() -> frozenset[str]:
    """Provider prefixes with a wwwserve backend (entry points, third-party ones included); other
    LiteLLM providers are served through the LiteLLM SDK backend (`litellm/`)."""
    return frozenset(ep.name for ep in entry_points(group="wwwserve.backends"))


@dataclass(frozen=True)
class ConfigWarning:
    """A key the node accepted without using it (or read differently): shown once at start."""

    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}"


def adopt_litellm(raw: dict[str, Any]) -> tuple[dict[str, Any], list[ConfigWarning]]:
    """The node config that a LiteLLM proxy config means, and a warning per key without effect."""
    raw = dict(raw)
    warnings: list[ConfigWarning] = []

    def warn(key: str, reason: str) -> None:
        warnings.append(ConfigWarning(key, f"no effect on a wwwserve node: {reason}"))

    node = dict(raw.get("node") or {})
    router = dict(raw.get("router_settings") or {})

    env = raw.pop("environment_variables", None)
    if isinstance(env, dict):
        for name, value in env.items():  # as LiteLLM does: into the process environment
            if value is not None:
                os.environ.setdefault(str(name), str(value))

    for key in [k for k in raw if k in TOP_LEVEL]:
        raw.pop(key)
        warn(key, TOP_LEVEL[key])

    litellm = raw.pop("litellm_settings", None) or {}
    for key, value in litellm.items():
        loc = f"litellm_settings.{key}"
        if key == "request_timeout":
            node.setdefault("request_timeout", value)
        elif key == "num_retries":
            router.setdefault("num_retries", value)
        elif key in ("fallbacks", "context_window_fallbacks", "default_fallbacks"):
            router.setdefault(key, value)
        elif key == "json_logs":
            if value:
                node.setdefault("log_format", "json")
        elif key in LITELLM_SETTINGS:
            warn(loc, LITELLM_SETTINGS[key])
        elif LITELLM_SETTINGS_CALLBACK.search(key):
            warn(loc, NO_CALLBACKS)
        else:
            warn(loc, NOT_HERE)

    general = raw.pop("general_settings", None) or {}
    for key, value in general.items():
        loc = f"general_settings.{key}"
        if key == "master_key":
            # LiteLLM's master key is the admin's and also opens the API to apps. An os.environ/
            # reference moves along, to be resolved with the node section.
            if value:
                node.setdefault("admin_key", value)
                node["api_keys"] = [*(node.get("api_keys") or []), value]
        else:
            warn(loc, GENERAL_SETTINGS.get(key, NOT_HERE))

    for key in [k for k in router if k not in ROUTER_KEYS]:
        router.pop(key)
        warn(f"router_settings.{key}", ROUTER_SETTINGS.get(key, NOT_HERE))
    if "timeout" in router:  # LiteLLM's default per-call timeout: the node's
        node.setdefault("request_timeout", router["timeout"])
    strategy = router.get("routing_strategy")
    if strategy is not None and strategy not in ROUTING_STRATEGIES:
        router.pop("routing_strategy")
        warn("router_settings.routing_strategy", f"{strategy!r} is not offered; least-busy is used")

    models = raw.get("model_list")
    if isinstance(models, list):
        raw["model_list"] = [_adopt_entry(i, e, warn) for i, e in enumerate(models)]
    if node or "node" in raw:
        raw["node"] = node
    if router or "router_settings" in raw:
        raw["router_settings"] = router
    return raw, warnings


def _adopt_entry(index: int, entry: Any, warn: Any) -> Any:
    if not isinstance(entry, dict) or not isinstance(entry.get("litellm_params"), dict):
        return entry  # the schema reports it
    params = dict(entry["litellm_params"])
    model = params.get("model")
    provider = params.pop("custom_llm_provider", None)
    if isinstance(model, str) and "/" not in model:
        params["model"] = f"{infer_provider(model, provider, params.get('api_base'))}/{model}"
    elif isinstance(model, str) and provider and model.split("/", 1)[0] not in backend_providers():
        params["model"] = f"{provider}/{model}"
    model = params.get("model")
    if isinstance(model, str) and "/" in model and model.split("/", 1)[0] not in backend_providers():
        params["model"] = f"litellm/{model}"  # anthropic/..., gemini/...: LiteLLM's own providers
    if "headers" in params:
        params["extra_headers"] = {**(params.pop("headers") or {}), **(params.get("extra_headers") or {})}
    if not str(params.get("model", "")).startswith("litellm/"):
        for key in list(params):
            loc = f"model_list[{index}].litellm_params.{key}"
            if key in REQUEST_DEFAULTS:
                params.pop(key)
                warn(loc, "request defaults are not applied: apps send their own")
            elif DEPLOYMENT_PARAMS.get(key):
                params.pop(key)
                warn(loc, DEPLOYMENT_PARAMS[key])
    return {**entry, "litellm_params": params}


def infer_provider(model: str, provider: str | None, api_base: Any) -> str:
    """The provider prefix LiteLLM would infer for a bare model name."""
    if provider:
        return provider
    if OPENAI_NAMES.match(model) or api_base:
        return "openai"
    return "litellm"  # LiteLLM's own inference (claude-*, gemini-*, command-*, ...)
