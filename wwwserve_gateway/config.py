"""The provider's policy file: a LiteLLM-style `model_list` plus a `node` section.

Loading is two passes. The first validates the file's shape with pydantic (unknown keys are errors);
the second validates each model's `litellm_params` with the params model of the backend its provider
prefix selects, because only the backend knows which keys it takes. Both passes report errors as
`ConfigError` entries that name the key and what is expected there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from wwwserve_gateway.config_errors import ConfigError, ConfigProblem, problems_from_validation

ENV_PREFIX = "os.environ/"


def default_home() -> Path:
    """Where node state and pulled models live unless the config says otherwise."""
    return Path(os.environ.get("WWWSERVE_HOME", Path.home() / ".wwwserve"))


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    log_format: Literal["console", "json"] = "console"

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


class PluginSlot(StrictModel):
    """A plugin slot (policy, router, gossip, ledger, judge): which plugin and its settings."""

    plugin: str | None = Field(
        None, description="an entry-point name or 'module:Class'; unset selects the built-in"
    )
    settings: dict[str, Any] = Field(default_factory=dict, description="settings for that plugin")


class GatewayConfig(StrictModel):
    node: NodeSettings = Field(default_factory=NodeSettings)
    model_list: list[ModelEntry] = Field(default_factory=list, description="the models this node serves")
    policy: PluginSlot = Field(default_factory=PluginSlot)
    router: PluginSlot = Field(default_factory=PluginSlot)
    gossip: PluginSlot = Field(default_factory=PluginSlot)
    ledger: PluginSlot = Field(default_factory=PluginSlot)
    judge: PluginSlot = Field(default_factory=PluginSlot)


def resolve_env_refs(value: Any, loc: tuple[str | int, ...] = ()) -> tuple[Any, list[ConfigProblem]]:
    """Replace every 'os.environ/VAR' string with the variable's value, as LiteLLM does."""
    problems: list[ConfigProblem] = []
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[k], sub = resolve_env_refs(v, (*loc, k))
            problems += sub
        return out, problems
    if isinstance(value, list):
        items = []
        for i, v in enumerate(value):
            item, sub = resolve_env_refs(v, (*loc, i))
            items.append(item)
            problems += sub
        return items, problems
    if isinstance(value, str) and value.startswith(ENV_PREFIX):
        var = value[len(ENV_PREFIX) :]
        if var not in os.environ:
            problems.append(
                ConfigProblem(loc, f"environment variable {var} is not set; export it or put the value here")
            )
            return None, problems
        return os.environ[var], problems
    return value, problems


def parse_config(raw: Any, *, source: str = "config") -> GatewayConfig:
    """Validate a parsed YAML document; raises ConfigError listing every problem found."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [ConfigProblem((), "the file must be a YAML mapping of sections")])
    resolved, problems = resolve_env_refs(raw)
    if problems:
        raise ConfigError(source, problems)
    try:
        config = GatewayConfig.model_validate(resolved)
    except ValidationError as exc:
        raise ConfigError(source, problems_from_validation(exc, GatewayConfig)) from None
    # Second pass: each backend validates its own params (imported lazily: no circular import).
    from wwwserve_gateway.backend_registry import validate_backend_params

    problems = []
    names: set[str] = set()
    for i, entry in enumerate(config.model_list):
        problems += validate_backend_params(entry, ("model_list", i, "litellm_params"))
        if entry.deployment_id in names:
            problems.append(
                ConfigProblem(
                    ("model_list", i, "model_info", "id"),
                    f"deployment id {entry.deployment_id!r} is used twice; give each entry a unique id",
                )
            )
        names.add(entry.deployment_id)
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: str | Path) -> GatewayConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), [ConfigProblem((), f"cannot read the file: {exc.strerror}")]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(str(path), [ConfigProblem((), f"not valid YAML{where}: {exc}")]) from None
    config = parse_config(raw, source=str(path))

    def beside(p: Path) -> Path:
        # Relative paths are relative to the config file, so a node starts the same from any cwd.
        p = p.expanduser()
        return p if p.is_absolute() else (path.parent / p).resolve()

    paths = {"data_dir": beside(config.node.data_dir)}
    if config.node.network is not None:
        paths["network"] = beside(config.node.network)
    return config.model_copy(update={"node": config.node.model_copy(update=paths)})
