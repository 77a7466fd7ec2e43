"""OpenTelemetry traces (`--otlp-endpoint`): router request spans, shard batch spans, OTLP export end to end."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent import futures

import grpc
import httpx
import pytest
import torch
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from lorax_server import tracing
from lorax_server.dist import Parallel
from lorax_server.pb import generate_pb2
from lorax_server.shard import build_service
from router import main as router_main
from router.tracing import RequestTracer
from tests.e2e import Launcher, free_port
from tests.test_router_metrics import samples
from tests.test_router_support import router_stack, run, words
from tests.tiny_models import make_adapter, make_model

LIMITS = ("--max-input-length", "10", "--max-total-tokens", "20", "--max-batch-prefill-tokens", "40")


@pytest.fixture
def router_spans(monkeypatch):
    """Route the router's request spans to memory; yields (exporter, provider)."""
    exporter = InMemorySpanExporter()
    provider = tracing.tracer_provider(tracing.ROUTER_SERVICE, exporter)
    monkeypatch.setattr(router_main, "request_tracer", lambda endpoint: RequestTracer(provider) if endpoint else None)
    return exporter, provider


def traces(spans) -> dict[int, dict[str, object]]:
    """trace id -> {span name: span}"""
    found: dict[int, dict[str, object]] = {}
    for span in spans:
        found.setdefault(span.context.trace_id, {})[span.name] = span
    return found


def test_router_spans_per_request(router_spans):
    exporter, provider = router_spans

    async def scenario():
        async with router_stack(*LIMITS, "--otlp-endpoint", "http://unused:4317", step_delay=0.01) as stack:
            ok = await stack.http.post("/generate", json={"inputs": words(3), "parameters": {"max_new_tokens": 3,
                                                                                            "adapter_id": "org/a"}})
            assert ok.status_code == 200
            rejected = await stack.http.post("/generate", json={"inputs": "w1", "parameters": {"top_k": -1}})
            assert rejected.status_code == 422
            assert (await stack.http.post("/generate", json={"inputs": "FAIL", "parameters": {}})).status_code == 424
            stream_body = {"inputs": words(2), "parameters": {"max_new_tokens": 2}}
            assert (await stack.http.post("/generate_stream", json=stream_body)).status_code == 200

    run(scenario())
    provider.force_flush()
    spans = exporter.get_finished_spans()
    assert {span.resource.attributes["service.name"] for span in spans} == {"lorax-router"}
    by_trace = sorted(traces(spans).values(), key=lambda t: t["generate"].start_time)
    assert [sorted(t) for t in by_trace] == [
        ["generate", "inference", "queue", "validation"],
        ["generate", "validation"],
        ["generate", "inference", "queue", "validation"],
        ["generate", "inference", "queue", "validation"],
    ]
    answered, rejected, failed, streamed = by_trace

    root = answered["generate"]
    assert root.parent is None and root.status.status_code is StatusCode.UNSET
    assert all(answered[name].parent.span_id == root.context.span_id for name in ("validation", "queue", "inference"))
    assert dict(root.attributes) == {"adapter": "org/a", "input_length": 3, "max_new_tokens": 3,
                                     "generated_tokens": 3, "finish_reason": "length"}
    validation, queue, inference = answered["validation"], answered["queue"], answered["inference"]
    assert root.start_time == validation.start_time <= validation.end_time <= queue.start_time
    assert queue.end_time == inference.start_time <= inference.end_time == root.end_time
    assert inference.end_time - inference.start_time >= 3 * 0.01 * 0.9e9  # three shard steps of 10 ms

    for span in rejected.values():
        assert span.status.status_code is StatusCode.ERROR and span.attributes["error_type"] == "validation"
    assert failed["generate"].status.status_code is StatusCode.ERROR
    assert failed["generate"].attributes["error_type"] == "generation"
    assert "boom" in failed["generate"].status.description
    assert streamed["generate"].attributes["generated_tokens"] == 2


def test_no_tracer_without_an_endpoint():
    assert router_main.request_tracer(None) is None
    code = ("import sys, router.main, lorax_server.server, lorax_server.cli;"
            "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"  # the SDK and the exporter are not even imported


def test_shard_spans_per_batch_rpc(tiny_model_dir):
    folder, _ = tiny_model_dir
    service = build_service(str(folder), None, "hub", None, Parallel(), torch.device("cpu"), "/unused")
    exporter = InMemorySpanExporter()
    provider = tracing.tracer_provider(tracing.SHARD_SERVICE, exporter)
    tracing.configure(provider)
    parameters = generate_pb2.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0)
    requests = [
        generate_pb2.Request(
            id=i, inputs="hello", tokenized_inputs=generate_pb2.TokenizedInputs(ids=[5, 6, 7][: i + 2]), truncate=3,
            parameters=parameters, stopping_parameters=generate_pb2.StoppingCriteriaParameters(max_new_tokens=3),
        )
        for i in range(2)
    ]

    async def scenario():
        batch = generate_pb2.Batch(id=4, requests=requests, size=2, max_tokens=64)
        prefill = await service.Prefill(generate_pb2.PrefillRequest(batch=batch), None)
        await service.Decode(generate_pb2.DecodeRequest(batches=[prefill.batch]), None)

    try:
        run(scenario())
    finally:
        tracing.configure(None)
    provider.force_flush()
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"prefill", "decode"}
    assert dict(spans["prefill"].attributes) == {"batch_id": 4, "size": 2, "tokens": 5, "rank": 0}
    assert dict(spans["decode"].attributes) == {"batch_ids": (4,), "size": 2, "rank": 0}
    assert spans["prefill"].resource.attributes["service.name"] == "lorax-shard"
    assert spans["prefill"].end_time <= spans["decode"].start_time


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A local OTLP/gRPC trace receiver: remembers (service name, span name) of everything exported to it."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(a.value.string_value for a in resource_spans.resource.attributes
                               if a.key == "service.name")
                self.spans += [(service, span.name) for scope in resource_spans.scope_spans for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.mark.e2e
def test_real_launcher_serves_metrics_and_exports_traces(tmp_path):
    """One real launcher: spec metric names on /metrics after real requests, spans from router and shard via OTLP."""
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    base = tmp_path / "base"
    adapter = make_adapter(make_model("llama", base), tmp_path / "adapter", 1, 8, 16, ["q_proj", "v_proj"])
    launcher = Launcher(str(base), tmp_path, "--max-input-length", "32", "--max-total-tokens", "64",
                        "--max-batch-prefill-tokens", "64", "--otlp-endpoint", f"http://127.0.0.1:{port}")
    try:
        launcher.wait_ready()
        for params in ({}, {"adapter_id": str(adapter), "adapter_source": "local"}):
            body = {"inputs": "Hello there", "parameters": {"max_new_tokens": 3, **params}}
            assert httpx.post(launcher.url + "/generate", json=body, timeout=60).status_code == 200
        text = httpx.get(launcher.url + "/metrics", timeout=10).text
        as_json = httpx.get(launcher.url + "/metrics", headers={"accept": "application/json"}, timeout=10).json()
    finally:
        assert launcher.stop() == 0, launcher.output()  # a clean stop flushes the buffered spans
        server.stop(None)
    got = samples(text)
    for name in ["request_duration", "request_validation_duration", "request_queue_duration",
                 "request_inference_duration", "request_mean_time_per_token_duration", "request_generated_tokens",
                 "request_input_length", "request_max_new_tokens", "request_skipped_tokens"]:
        assert got[f"lorax_{name}_count"] == 2, name
    assert got["lorax_request_count"] == 2 and got["lorax_request_success"] == 2
    assert got["lorax_request_generated_tokens_sum"] == 6
    assert got['lorax_batch_inference_success{method="prefill"}'] == 2
    assert got['lorax_adapter_request_count{adapter="base"}'] == 1
    assert got[f'lorax_adapter_request_count{{adapter="{adapter}"}}'] == 1
    assert got[f'lorax_adapter_load_duration_count{{adapter="{adapter}",phase="load"}}'] == 1
    for gauge in ["queue_length", "batch_current_size", "batch_current_max_tokens"]:
        assert as_json[f"lorax_{gauge}"] == {"type": "gauge", "data": [{"key": "", "value": 0.0}]}
    spans = set(collector.spans)
    assert {("lorax-router", name) for name in ("generate", "validation", "queue", "inference")} <= spans
    assert {("lorax-shard", "prefill"), ("lorax-shard", "decode")} <= spans
