"""Loading the policy file: YAML, `os.environ/VAR` references, the schema, paths beside the file.

The schema pass knows the node's own sections only. Plugins' settings (each backend's
`litellm_params`, each slot's `settings`) are validated by the plugins' own models, which this
module does not know: callers pass those checks in (`plugin_api.loading.check_plugins`), and every
problem of both passes is reported at once, each naming its key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from wwwserve_gateway.config.litellm import adopt_litellm
from wwwserve_gateway.config.problems import ConfigError, ConfigProblem, problems_from_validation
from wwwserve_gateway.config.schema import GatewayConfig

ENV_PREFIX = "os.environ/"

Check = Callable[[GatewayConfig], list[ConfigProblem]]


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


def parse_config(raw: Any, *, source: str = "config", checks: Iterable[Check] = ()) -> GatewayConfig:
    """Validate a parsed YAML document; raises ConfigError listing every problem found."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [ConfigProblem((), "the file must be a YAML mapping of sections")])
    adopted, warnings = adopt_litellm(raw)  # LiteLLM's sections: honoured, or dropped with a warning
    resolved, problems = resolve_env_refs(adopted)
    if problems:
        raise ConfigError(source, problems)
    try:
        config = GatewayConfig.model_validate(resolved)
    except ValidationError as exc:
        raise ConfigError(source, problems_from_validation(exc, GatewayConfig)) from None
    config.warnings.extend(warnings)
    problems = []
    names: set[str] = set()
    for i, entry in enumerate(config.model_list):
        if entry.deployment_id in names:
            problems.append(
                ConfigProblem(
                    ("model_list", i, "model_info", "id"),
                    f"deployment id {entry.deployment_id!r} is used twice; give each entry a unique id",
                )
            )
        names.add(entry.deployment_id)
    for check in checks:
        problems += check(config)
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: str | Path, checks: Iterable[Check] = ()) -> GatewayConfig:
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
    config = parse_config(raw, source=str(path), checks=checks)

    def beside(p: Path) -> Path:
        # Relative paths are relative to the config file, so a node starts the same from any cwd.
        p = p.expanduser()
        return p if p.is_absolute() else (path.parent / p).resolve()

    paths = {"data_dir": beside(config.node.data_dir)}
    if config.node.network is not None:
        paths["network"] = beside(config.node.network)
    located = config.model_copy(update={"node": config.node.model_copy(update=paths)})
    located.warnings[:] = config.warnings
    return located
