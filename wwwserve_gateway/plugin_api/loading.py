"""Load plugins and backends by entry-point name or by 'module:Class', as a config names them."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any


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


def load_entry_point(group: str, name: str) -> Any:
    """The object registered as `name` in entry-point `group`, or named directly as 'module:Class'."""
    if ":" in name:
        return load_object(name)
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    if not found:
        known = sorted(ep.name for ep in entry_points(group=group))
        raise PluginLoadError(f"no {group} plugin named {name!r}; installed: {', '.join(known) or 'none'}")
    try:
        return found[0].load()
    except Exception as exc:
        raise PluginLoadError(f"{group} plugin {name!r} failed to load: {exc}") from exc
