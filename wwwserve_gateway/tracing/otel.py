"""OpenTelemetry behind `tracing.Tracing` (the `wwwserve[otel]` extra): one TracerProvider per node,
parent-based ratio sampling (a peer's request follows its entry's choice), W3C trace context on the
overlay, and the exporter `node.otel` names:

    otlp     OTLP over http/protobuf (default) or grpc, batched: to a collector, Jaeger, Tempo...
    file     every span as one JSON line appended to `path` as it ends (debugging; the tests)
    console  every span printed to stdout as it ends
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind as OtelKind
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from wwwserve_gateway.config.schema import OtelSettings
from wwwserve_gateway.tracing import Attribute, Span, SpanKind, Tracing

KINDS = {"internal": OtelKind.INTERNAL, "server": OtelKind.SERVER, "client": OtelKind.CLIENT}
_PROPAGATOR = TraceContextTextMapPropagator()


class OtelSpan(Span):
    __slots__ = ("otel",)

    def __init__(self, span: trace.Span) -> None:
        self.otel = span

    @property
    def traceparent(self) -> str | None:
        ctx = self.otel.get_span_context()
        if not ctx.is_valid:
            return None
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def set(self, key: str, value: Attribute) -> None:
        self.otel.set_attribute(key, value)

    def fail(self, message: str) -> None:
        self.otel.set_status(Status(StatusCode.ERROR, message))

    def end(self) -> None:
        self.otel.end()


class OtelTracing(Tracing):
    enabled = True

    def __init__(self, settings: OtelSettings, node_id: str) -> None:
        resource = Resource.create(
            {
                "service.name": settings.service_name,
                "service.instance.id": node_id,
                "wwwserve.node_id": node_id,
            }
        )
        self.provider = TracerProvider(
            resource=resource,
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
            shutdown_on_exit=False,
        )
        exporter = _exporter(settings)
        batched = settings.exporter == "otlp"
        self.provider.add_span_processor(
            BatchSpanProcessor(exporter) if batched else SimpleSpanProcessor(exporter)
        )
        self.tracer = self.provider.get_tracer("wwwserve")

    def start(
        self,
        name: str,
        *,
        kind: SpanKind = "internal",
        parent: Span | None = None,
        traceparent: str | None = None,
        attributes: Mapping[str, Attribute] | None = None,
    ) -> Span:
        if isinstance(parent, OtelSpan):
            ctx: otel_context.Context | None = trace.set_span_in_context(parent.otel)
        elif traceparent is not None:
            ctx = _PROPAGATOR.extract({"traceparent": traceparent})
        else:
            ctx = None  # the current context
        return OtelSpan(self.tracer.start_span(name, context=ctx, kind=KINDS[kind], attributes=attributes))

    @contextlib.contextmanager
    def use(self, span: Span) -> Iterator[None]:
        if not isinstance(span, OtelSpan):
            yield
            return
        token = otel_context.attach(trace.set_span_in_context(span.otel))
        try:
            yield
        finally:
            otel_context.detach(token)

    def close(self) -> None:
        self.provider.shutdown()


class JsonLinesExporter(SpanExporter):
    """Appends each span as one JSON line (the SDK's own JSON form of a span) to a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        text = "".join(span.to_json(indent=None) + "\n" for span in spans)
        with self._lock, self.path.open("a", encoding="utf-8") as out:
            out.write(text)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _exporter(settings: OtelSettings) -> SpanExporter:
    if settings.exporter == "file":
        assert settings.path is not None  # the schema requires it
        return JsonLinesExporter(settings.path)
    if settings.exporter == "console":
        return ConsoleSpanExporter()
    headers = dict(settings.headers) or None
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=settings.endpoint, headers=headers)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    endpoint = settings.endpoint
    if endpoint is not None and not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return HttpExporter(endpoint=endpoint, headers=headers)
