"""OpenTelemetry traces for `--otlp-endpoint`, shared by the shards and the router.

Nothing from OpenTelemetry is imported unless an endpoint is configured, and `span()` is then an empty context, so
a server without `--otlp-endpoint` pays nothing. Spans leave in batches over OTLP/gRPC (`http://host:4317`: plain
gRPC; `https://`: TLS).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

SHARD_SERVICE = "lorax-shard"
ROUTER_SERVICE = "lorax-router"

_tracer: Tracer | None = None  # this process's shard tracer, once configured


def tracer_provider(service_name: str, exporter: SpanExporter) -> TracerProvider:
    """A provider naming `service_name` that hands finished spans to `exporter` in batches."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def otlp_provider(endpoint: str, service_name: str) -> TracerProvider:
    """A provider exporting to an OTLP/gRPC collector at `endpoint`."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return tracer_provider(service_name, OTLPSpanExporter(endpoint=endpoint))


def configure(provider: TracerProvider | None) -> None:
    """Trace this shard's batch RPCs through `provider` (None: stop tracing)."""
    global _tracer
    _tracer = provider.get_tracer("lorax_server") if provider is not None else None


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[None]:
    """A span around the block when tracing is configured; errors mark it failed (and still propagate)."""
    if _tracer is None:
        yield
        return
    with _tracer.start_as_current_span(name, attributes=attributes):
        yield
