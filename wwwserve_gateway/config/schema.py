"""The provider's policy file, as pydantic models: a LiteLLM-style `model_list`, a `node` section and
the plugin slots. Loading it (YAML, environment references, each plugin's own settings) is
`config.loading`'s job."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator


def default_home() -> Path:
    """Where node state and pulled models live unless the config says otherwise."""
    return Path(os.environ.get("WWWSERVE_HOME", Path.home() / ".wwwserve"))


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OtelSettings(StrictModel):
    """OpenTelemetry tracing of the request path (needs the extra: pip install 'wwwserve[otel]')."""

    exporter: Literal["otlp", "file", "console"] = Field(
        "otlp", description="otlp (a collector), file (JSON lines at `path`) or console"
    )
    endpoint: str | None = Field(
        None,
        description="the OTLP collector, e.g. http://127.0.0.1:4318 (http/protobuf) or "
        "http://127.0.0.1:4317 (grpc); unset: OTEL_EXPORTER_OTLP_ENDPOINT or the SDK's default",
    )
    protocol: Literal["http/protobuf", "grpc"] = Field("http/protobuf", description="OTLP transport")
    headers: dict[str, str] = Field(default_factory=dict, description="headers sent to the collector")
    service_name: str = Field("wwwserve", min_length=1, description="the service.name of this node's spans")
    sample_ratio: float = Field(
        1.0, ge=0.0, le=1.0, description="share of app requests traced; peers follow the entry's choice"
    )
    path: Path | None = Field(
        None, validate_default=True, description="exporter file: the JSON-lines file spans are appended to"
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_a_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("path")
    @classmethod
    def _file_needs_a_path(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None and info.data.get("exporter") == "file":
            raise ValueError("the file exporter needs a path")
        return value


class NodeSettings(StrictModel):
    host: str = Field("127.0.0.1", description="address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
    port: int = Field(4000, ge=0, le=65535, description="TCP port to listen on (0 picks a free one)")
    data_dir: Path = Field(
        default_factory=default_home, description="directory for node state and pulled models"
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="keys apps must send as 'Authorization: Bearer KEY'; empty means no auth",
    )
    admin_key: str | None = Field(
        None, description="key for the /wwwserve/admin endpoints; unset disables them"
    )
    operator_keys: list[str] = Field(
        default_factory=list,
        description="read-only operator keys: with one (or the admin key) the network views show "
        "peers' addresses",
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, gt=0, description="largest accepted request body, in bytes (413 above it)"
    )
    request_timeout: float = Field(
        600.0, gt=0, description="seconds to wait for a backend's next byte before answering 504"
    )
    load_poll_interval: float = Field(1.0, gt=0, description="seconds between polls of each backend's load")
    network: Path | None = Field(
        None,
        description="the network genesis file (wwwserve network init); unset uses the default parameters",
    )
    bootstrap: list[str] = Field(
        default_factory=list, description="URLs of nodes to join through, e.g. http://127.0.0.1:4001"
    )
    public_url: str | None = Field(
        None, description="the URL peers reach this node at (default: http://HOST:PORT)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    cors_allow_origins: list[str] = Field(
        default_factory=list,
        description="origins browsers may call the node from, e.g. https://app.example or '*'; empty: no CORS",
    )
    cors_allow_headers: list[str] = Field(
        default_factory=lambda: ["authorization", "content-type"],
        description="request headers a cross-origin call may send ('*' for any)",
    )
    cors_allow_credentials: bool = Field(False, description="let browsers send cookies cross-origin")
    cors_max_age: int = Field(600, ge=0, description="seconds a browser may cache a preflight answer")
    access_log: bool = Field(
        True,
        description="log one line per app request (id, model, deployment, route, status, tokens, timings)",
    )
    log_format: Literal["console", "json"] = "console"
    # Transport limits (docs/security.md, "Transport and HTTP limits"): each refusal is counted in
    # /metrics (wwwserve_http_rejected_total, wwwserve_overlay_rejected_total).
    max_connections: int = Field(
        2048, ge=1, description="open HTTP connections (overlay websockets included); 503 beyond it"
    )
    max_connections_per_source: int = Field(
        256, ge=1, description="open HTTP connections from one client address; 429 beyond it"
    )
    header_timeout: float = Field(
        10.0, gt=0, description="seconds for a request's headers to arrive in full; 408 and closed after"
    )
    body_timeout: float = Field(
        60.0, gt=0, description="seconds for a request's body to arrive once its headers have; 408 after"
    )
    keep_alive_timeout: float = Field(
        75.0,
        gt=0,
        description="seconds an idle keep-alive connection stays open; keep it above clients' pool expiry",
    )
    overlay_max_handshakes: int = Field(64, ge=1, description="overlay handshakes pending at once")
    overlay_handshakes_per_source: int = Field(
        8, ge=1, description="overlay handshakes pending at once from one address"
    )
    overlay_handshake_timeout: float = Field(
        3.0, gt=0, description="seconds an overlay handshake may take, accepting or dialling"
    )
    overlay_stream_window_bytes: int = Field(
        2 * 1024 * 1024,
        ge=2 * 1024 * 1024,
        description="bytes of one overlay stream's items a peer may leave unread here (>= 2 frames)",
    )
    overlay_connection_window_bytes: int = Field(
        16 * 1024 * 1024,
        ge=2 * 1024 * 1024,
        description="bytes of all overlay streams' items one peer may leave unread here",
    )

    otel: OtelSettings | None = Field(
        None, description="OpenTelemetry tracing, e.g. {endpoint: http://127.0.0.1:4318}; unset: none"
    )

    @field_validator("overlay_connection_window_bytes")
    @classmethod
    def _connection_window_holds_a_stream(cls, value: int, info: ValidationInfo) -> int:
        stream = info.data.get("overlay_stream_window_bytes")
        if stream is not None and value < stream:
            raise ValueError(f"must be at least overlay_stream_window_bytes ({stream})")
        return value

    @field_validator("api_keys")
    @classmethod
    def _no_empty_keys(cls, keys: list[str]) -> list[str]:
        if any(not k for k in keys):
            raise ValueError("an API key is empty (is its environment variable set to '')?")
        return keys


class ModelInfo(BaseModel):
    """LiteLLM's free-form `model_info`; `id` names the deployment (generated when absent)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    id: str | None = Field(None, description="a unique id for this deployment")


class ModelEntry(StrictModel):
    model_name: str = Field(..., min_length=1, description="the public model name apps ask for")
    litellm_params: dict[str, Any] = Field(
        ..., description="backend parameters; 'model' is 'provider/name', e.g. 'openai/gpt-4o-mini'"
    )
    model_info: ModelInfo = Field(default_factory=ModelInfo)

    @field_validator("litellm_params")
    @classmethod
    def _needs_model(cls, params: dict[str, Any]) -> dict[str, Any]:
        model = params.get("model")
        if not isinstance(model, str) or "/" not in model:
            raise ValueError(
                "litellm_params.model must be 'provider/name', e.g. 'openai/gpt-4o-mini' or 'llamacpp/smollm2'"
            )
        return params

    @property
    def provider(self) -> str:
        return self.litellm_params["model"].split("/", 1)[0]

    @property
    def deployment_id(self) -> str:
        return self.model_info.id or f"{self.model_name}:{self.litellm_params['model']}"


RoutingStrategy = Literal["least-busy", "simple-shuffle", "latency-based-routing"]


class RouterSettings(StrictModel):
    """LiteLLM's `router_settings`: how a request moves among the node's own deployments before it
    goes to the network. Keys LiteLLM knows that have no effect here are accepted with a warning
    (config.litellm); see docs/litellm-config.md."""

    routing_strategy: RoutingStrategy = Field(
        "least-busy",
        description="least-busy, simple-shuffle (random, by weight) or latency-based-routing",
    )
    num_retries: int | None = Field(
        None,
        ge=0,
        description="other deployments of the group tried after a failure (default: every one once)",
    )
    timeout: float | None = Field(
        None, gt=0, description="default seconds to wait for a backend (node.request_timeout if unset)"
    )
    allowed_fails: int = Field(3, ge=0, description="failures a minute a deployment may have before cooldown")
    cooldown_time: float = Field(5.0, ge=0, description="seconds a failing deployment is left out")
    retry_after: float = Field(0.0, ge=0, description="seconds to wait before trying the next deployment")
    fallbacks: list[dict[str, list[str]]] = Field(
        default_factory=list,
        description="[{group: [other groups]}] tried in order when every deployment of group failed",
    )
    context_window_fallbacks: list[dict[str, list[str]]] = Field(
        default_factory=list,
        description="[{group: [larger groups]}] tried when a prompt is too long for group",
    )
    default_fallbacks: list[str] = Field(
        default_factory=list, description="groups tried for any group that failed and has no fallbacks"
    )
    model_group_alias: dict[str, str] = Field(
        default_factory=dict, description="{name apps ask for: model group that serves it}"
    )

    def fallbacks_for(self, model: str, *, context: bool = False) -> list[str]:
        table = self.context_window_fallbacks if context else self.fallbacks
        for entry in table:
            if model in entry:
                return list(entry[model])
        return [] if context else list(self.default_fallbacks)


class PluginSlot(StrictModel):
    """A plugin slot (policy, router, gossip, ledger, judge): which plugin, and its settings (validated
    by that plugin's own `Settings` model)."""

    plugin: str | None = Field(
        None, description="an entry-point name or 'module:Class'; unset selects the built-in"
    )
    settings: dict[str, Any] = Field(default_factory=dict, description="settings for that plugin")


class GatewayConfig(StrictModel):
    node: NodeSettings = Field(default_factory=NodeSettings)
    model_list: list[ModelEntry] = Field(default_factory=list, description="the models this node serves")
    router_settings: RouterSettings = Field(default_factory=RouterSettings)
    # Keys accepted without effect (a LiteLLM proxy config's), each with why: logged at start.
    _warnings: list[Any] = PrivateAttr(default_factory=list)

    @property
    def warnings(self) -> list[Any]:
        return self._warnings

    policy: PluginSlot = Field(default_factory=PluginSlot)
    router: PluginSlot = Field(default_factory=PluginSlot)
    gossip: PluginSlot = Field(default_factory=PluginSlot)
    ledger: PluginSlot = Field(default_factory=PluginSlot)
    judge: PluginSlot = Field(default_factory=PluginSlot)
