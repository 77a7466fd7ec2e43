"""Router traces (`--otlp-endpoint`): a `generate` span per request with `validation`, `queue`, `inference` children.

Spans are written once a request ends, from the timings its queue entry kept, so tracing adds nothing to a request
while it runs; without `--otlp-endpoint` there is no tracer at all.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from router.errors import InferError
from router.metrics import adapter_label
from router.queue import EndEvent, Entry, ErrorEvent, Event
from router.validation import ValidRequest

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider


def _to_ns(monotonic_s: float, offset_ns: int) -> int:
    return int(monotonic_s * 1e9) + offset_ns


class RequestTracer:
    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("router")

    def request(self, entry: Entry, event: Event | None) -> None:
        """Spans of a request that reached the queue: answered (End), failed (Error) or abandoned (None)."""
        offset = time.time_ns() - time.monotonic_ns()
        finished = entry.finished_at or time.monotonic()
        started = entry.started_at or entry.queued_at
        root = self._start("generate", started, offset, None)
        _describe(root, entry.request)
        self._child("validation", started, entry.queued_at, offset, root)
        self._child("queue", entry.queued_at, entry.batched_at or finished, offset, root)
        if entry.batched_at is not None:
            self._child("inference", entry.batched_at, finished, offset, root)
        if isinstance(event, EndEvent):
            root.set_attribute("generated_tokens", event.generated_tokens)
            root.set_attribute("finish_reason", event.finish_reason)
        elif isinstance(event, ErrorEvent):
            _failed(root, event.error)
        else:
            root.set_attribute("cancelled", True)
        root.end(_to_ns(finished, offset))

    def rejected(self, started: float, error: InferError) -> None:
        """Spans of a request refused by validation."""
        offset = time.time_ns() - time.monotonic_ns()
        now = time.monotonic()
        root = self._start("generate", started, offset, None)
        _failed(root, error)
        self._child("validation", started, now, offset, root, error)
        root.end(_to_ns(now, offset))

    def shutdown(self) -> None:
        """Send what is buffered; called when the router stops."""
        self.provider.shutdown()

    def _start(self, name: str, start: float, offset: int, parent: trace.Span | None) -> trace.Span:
        context = trace.set_span_in_context(parent) if parent is not None else None
        return self._tracer.start_span(name, context=context, start_time=_to_ns(start, offset))

    def _child(
        self, name: str, start: float, end: float, offset: int, parent: trace.Span, error: InferError | None = None
    ) -> None:
        span = self._start(name, start, offset, parent)
        if error is not None:
            _failed(span, error)
        span.end(_to_ns(max(end, start), offset))


def _describe(span: trace.Span, request: ValidRequest) -> None:
    span.set_attribute("adapter", adapter_label(request.adapter))
    span.set_attribute("input_length", request.input_length)
    span.set_attribute("max_new_tokens", request.max_new_tokens)


def _failed(span: trace.Span, error: InferError) -> None:
    span.set_attribute("error_type", error.error_type)
    span.set_status(Status(StatusCode.ERROR, str(error)))
