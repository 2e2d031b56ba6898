"""Finding plugin classes (by entry-point name or 'module:Class') and validating their settings.

`check-config`, the node and the admin API's reload all go through `check_plugins`, so a typo in any
plugin's settings is reported the same way everywhere: the key, what is wrong, the allowed keys.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from importlib.util import find_spec
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from wwwserve_gateway import tracing
from wwwserve_gateway.config.problems import ConfigError, ConfigProblem, problems_from_validation
from wwwserve_gateway.config.schema import GatewayConfig, ModelEntry, PluginSlot
from wwwserve_gateway.plugin_api.backend import Backend
from wwwserve_gateway.plugin_api.base import Plugin
from wwwserve_gateway.plugin_api.node import NodeAPI
from wwwserve_gateway.plugin_api.slots import BACKEND, NODE_SLOTS, Slot

M = TypeVar("M", bound=BaseModel)


class PluginLoadError(Exception):
    pass


def load_object(spec: str) -> Any:
    """Import 'package.module:Name'."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise PluginLoadError(f"{spec!r} is not of the form 'module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginLoadError(f"cannot import {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise PluginLoadError(f"module {module_name!r} has no attribute {attr!r}") from None


def installed(group: str) -> list[str]:
    return sorted(ep.name for ep in entry_points(group=group))


def load_entry_point(group: str, name: str) -> Any:
    """The object registered as `name` in entry-point `group`, or named directly as 'module:Class'."""
    if ":" in name:
        return load_object(name)
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    if not found:
        known = ", ".join(installed(group)) or "none"
        raise PluginLoadError(f"no {group} plugin named {name!r}; installed: {known}")
    try:
        return found[0].load()
    except Exception as exc:
        raise PluginLoadError(f"{group} plugin {name!r} failed to load: {exc}") from exc


def plugin_class(slot: Slot, name: str | None) -> type:
    """The class a config section names (the slot's built-in when unset), checked against the slot."""
    cls = load_entry_point(slot.group, name or slot.default)
    if not (isinstance(cls, type) and issubclass(cls, slot.interface)):
        raise PluginLoadError(
            f"{name!r} is not a {slot.name} plugin: it must subclass "
            f"{slot.interface.__module__}.{slot.interface.__qualname__}"
        )
    return cls


def backend_class(provider: str) -> type[Backend]:
    """The backend registered for a provider prefix; other prefixes go to the LiteLLM SDK adapter."""
    if provider in installed(BACKEND.group):
        return plugin_class(BACKEND, provider)
    if find_spec("litellm") is None:
        raise PluginLoadError(
            f"provider prefix '{provider}/' needs the LiteLLM SDK (pip install 'wwwserve[litellm]'), "
            f"or use one of the built-in prefixes: {', '.join(installed(BACKEND.group))}"
        )
    return plugin_class(BACKEND, BACKEND.default)


def validate_settings(
    model: type[M], raw: Mapping[str, Any], loc: tuple[str | int, ...]
) -> tuple[M | None, list[ConfigProblem]]:
    """`raw` validated by a plugin's settings model, or the problems, each naming its key."""
    try:
        return model.model_validate(dict(raw)), []
    except ValidationError as exc:
        return None, problems_from_validation(exc, model, loc)


def check_backend(entry: ModelEntry, loc: tuple[str | int, ...]) -> list[ConfigProblem]:
    try:
        cls = backend_class(entry.provider)
    except PluginLoadError as exc:
        return [ConfigProblem((*loc, "model"), str(exc))]
    return validate_settings(cls.Settings, entry.litellm_params, loc)[1]


def check_plugins(config: GatewayConfig) -> list[ConfigProblem]:
    """Every plugin the config names can be loaded, and its settings are valid."""
    problems: list[ConfigProblem] = []
    for i, entry in enumerate(config.model_list):
        problems += check_backend(entry, ("model_list", i, "litellm_params"))
    for slot in NODE_SLOTS:
        section = getattr(config, slot.name)
        try:
            cls = plugin_class(slot, section.plugin)
        except PluginLoadError as exc:
            problems.append(ConfigProblem((slot.name, "plugin"), str(exc)))
            continue
        problems += validate_settings(cls.Settings, section.settings, (slot.name, "settings"))[1]
    return problems + tracing.check(config.node.otel)  # and the extra node.otel needs


def require_valid(config: GatewayConfig, source: str) -> None:
    problems = check_plugins(config)
    if problems:
        raise ConfigError(source, problems)


def build_plugin(slot: Slot, section: PluginSlot, node: NodeAPI) -> Plugin:
    """The plugin a config section names, built with its validated settings."""
    cls = plugin_class(slot, section.plugin)
    settings, problems = validate_settings(cls.Settings, section.settings, (slot.name, "settings"))
    if settings is None:
        raise ConfigError(slot.name, problems)
    return cls(node, settings)
