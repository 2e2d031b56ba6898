"""Turn validation failures into messages that name the key and say what belongs there."""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

# Keys that LiteLLM proxy configs carry but that mean nothing to a wwwserve node.
LITELLM_ONLY_SECTIONS = {
    "litellm_settings": "LiteLLM proxy callback settings",
    "router_settings": "LiteLLM router settings (use the 'router' section)",
    "general_settings": "LiteLLM proxy settings (use the 'node' section: api_keys, admin_key)",
    "environment_variables": "LiteLLM proxy environment settings (export the variables instead)",
}


@dataclass(frozen=True)
class ConfigProblem:
    loc: tuple[str | int, ...]
    message: str

    @property
    def key(self) -> str:
        out = ""
        for part in self.loc:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
        return out or "(top level)"

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ConfigError(Exception):
    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} problem(s)"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out += _model_classes(arg)
    return out


def _model_at(root: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The pydantic model class that validates the mapping found at `loc`, if any."""
    cls: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        found = _model_classes(field.annotation)
        cls = found[0] if found else None
    return cls


def _field_description(root: type[BaseModel], loc: tuple[str | int, ...]) -> str | None:
    parent = _model_at(root, loc[:-1])
    if parent is None or not loc or isinstance(loc[-1], int):
        return None
    field = parent.model_fields.get(str(loc[-1]))
    return field.description if field else None


def unknown_key_message(key: str, allowed: list[str]) -> str:
    if key in LITELLM_ONLY_SECTIONS:
        return f"unknown key: this is {LITELLM_ONLY_SECTIONS[key]}, which wwwserve does not use; remove it"
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown key; {hint}allowed keys here: {', '.join(sorted(allowed))}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def problems_from_validation(
    exc: ValidationError, root: type[BaseModel], prefix: tuple[str | int, ...] = ()
) -> list[ConfigProblem]:
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        kind = err["type"]
        if kind == "extra_forbidden":
            parent = _model_at(root, loc[:-1])
            allowed = list(parent.model_fields) if parent else []
            message = unknown_key_message(str(loc[-1]), allowed)
        else:
            message = err["msg"].removeprefix("Value error, ")
            description = _field_description(root, loc)
            if kind == "missing":
                message = "required key is missing" + (f": {description}" if description else "")
            else:
                if description:
                    message += f" (expected {description})"
                if "input" in err and kind not in ("value_error",):
                    message += f"; got {_short(err['input'])}"
        problems.append(ConfigProblem((*prefix, *loc), message))
    return problems
