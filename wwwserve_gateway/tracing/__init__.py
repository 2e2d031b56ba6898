"""Tracing of the request path, behind a small interface of its own.

`NO_TRACING` is what a node runs without `node.otel`: every call is a no-op on shared objects, and
nothing of OpenTelemetry is imported. `build()` returns the OpenTelemetry implementation
(`tracing.otel`, the `wwwserve[otel]` extra) when the config enables it.

Spans are never made current inside an async generator except for the whole life of one overlay
stream (its own task): a context attached there is detached in the same task.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Literal

from wwwserve_gateway.config.problems import ConfigError, ConfigProblem

if TYPE_CHECKING:
    from wwwserve_gateway.config.schema import OtelSettings

SpanKind = Literal["internal", "server", "client"]
Attribute = str | int | float | bool
EXTRA = "pip install 'wwwserve[otel]'"
# What the otel extra brings; checked without importing anything.
REQUIRED_MODULES = ("opentelemetry.sdk", "opentelemetry.exporter.otlp")


class Span:
    """A span that records nothing (the base of the real one). Ends on leaving a `with` block."""

    __slots__ = ()

    @property
    def traceparent(self) -> str | None:
        """The W3C `traceparent` naming this span as a remote child's parent; None when not tracing."""
        return None

    def set(self, key: str, value: Attribute) -> None:
        pass

    def fail(self, message: str) -> None:
        pass

    def end(self) -> None:
        pass

    def __enter__(self) -> Span:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None and not isinstance(exc, GeneratorExit):  # GeneratorExit: closed early
            self.fail(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        self.end()


NO_SPAN = Span()
_NOTHING = contextlib.nullcontext()


class Tracing:
    """No tracing: every call returns a shared no-op."""

    enabled = False

    def start(
        self,
        name: str,
        *,
        kind: SpanKind = "internal",
        parent: Span | None = None,
        traceparent: str | None = None,
        attributes: Mapping[str, Attribute] | None = None,
    ) -> Span:
        """Start a span (not made current): a child of `parent`, else of the remote span
        `traceparent` names, else of the current one."""
        return NO_SPAN

    def use(self, span: Span) -> contextlib.AbstractContextManager[None]:
        """Make `span` the current one (the parent of spans started without one) for a block."""
        return _NOTHING

    def close(self) -> None:
        """Export what is left (a node's stop)."""


NO_TRACING = Tracing()


def missing_extra() -> list[str]:
    return [m for m in REQUIRED_MODULES if not _importable(m)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def check(settings: OtelSettings | None) -> list[ConfigProblem]:
    """Problems with `node.otel`: the extra it needs is not installed."""
    if settings is None:
        return []
    missing = missing_extra()
    if not missing:
        return []
    return [
        ConfigProblem(
            ("node", "otel"),
            f"tracing needs the otel extra ({', '.join(missing)} not installed): {EXTRA}",
        )
    ]


def build(settings: OtelSettings | None, node_id: str) -> Tracing:
    """The node's tracing: NO_TRACING without `node.otel`, else OpenTelemetry."""
    if settings is None:
        return NO_TRACING
    problems = check(settings)
    if problems:
        raise ConfigError("config", problems)
    from wwwserve_gateway.tracing.otel import OtelTracing

    return OtelTracing(settings, node_id)


@contextlib.contextmanager
def using(tracing: Tracing, span: Span) -> Iterator[Span]:
    """`with using(tracing, span):` the span is current and ends with the block."""
    with span, tracing.use(span):
        yield span
