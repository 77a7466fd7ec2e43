"""Prometheus metrics (spec 3.8 names, `lorax_` prefix) in a per-router `CollectorRegistry`, plus per-adapter series.

Values live in prometheus-client metrics; the exposition keeps the reference's names: counters render without the
client's `_total` suffix and without `_created` samples, so dashboards built for LoRAX keep working. Gauges are read
from their owner when scraped, so they never go stale.

Per-adapter series (label `adapter`, one value per adapter id; a merge of several adapters gets one label naming
them all) are counters and summaries (`_sum`/`_count` only) rather than histograms, so thousands of adapters cost
two or three series each, not dozens of buckets.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client.metrics import MetricWrapperBase

from router.validation import AdapterSpec

PREFIX = "lorax_"

# error_type of an InferError -> the reference's `request_failure{err=...}` label
FAILURE_LABELS = {"incomplete_generation": "incomplete", "template_error": "template"}


def duration_buckets() -> list[float]:
    """35 geometric buckets from 0.00015 s, x1.5 each (about 147 s at the top)."""
    return [float(f"{0.0001 * 1.5 ** (i + 1):.6g}") for i in range(35)]


def linear_buckets(top: int, count: int = 100) -> list[float]:
    """`count` evenly spaced buckets ending at `top` (duplicates dropped when `top` is small)."""
    return sorted({float(f"{top * (i + 1) / count:.6g}") for i in range(count)})


def adapter_label(spec: AdapterSpec) -> str:
    """One readable label per adapter: its id, `base` for the base model, `strategy:a+b` for a merge. An adapter
    requested with a credential (a private one, as far as the router knows) is named by a digest of its label
    instead, so /metrics and traces, open to scrapers, do not list which private fine-tunes exist; the digest is
    stable, so its series still add up across restarts."""
    if spec.is_base:
        return "base"
    label = spec.ids[0] if len(spec.ids) == 1 else f"{spec.merge_strategy}:{'+'.join(spec.ids)}"
    if spec.api_token:
        return "private:" + hashlib.sha256(label.encode()).hexdigest()[:16]
    return label


class Metrics:
    """Every router metric; `inc`/`gauge` address them by their name without the prefix."""

    def __init__(self, max_input_length: int = 1792, max_total_tokens: int = 2048) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, MetricWrapperBase] = {}
        durations = duration_buckets()
        counter, histogram, gauge, summary = self._counter, self._histogram, self._gauge, self._summary
        counter("request_count", "Requests received")
        counter("request_success", "Requests answered successfully")
        counter("request_failure", "Failed requests (and adapter RPCs) by reason", "err")
        counter("batch_concat", "Batches joining a running batch, by why they were allowed to", "reason")
        counter("batch_inference_count", "Batch RPCs sent to the shards", "method")
        counter("batch_inference_success", "Batch RPCs that succeeded", "method")
        counter("batch_inference_failure", "Batch RPCs that failed", "method")
        histogram("request_duration", "Arrival to last token, seconds", durations)
        histogram("request_validation_duration", "Tokenization and parameter checks, seconds", durations)
        histogram("request_queue_duration", "Queued until batched, seconds", durations)
        histogram("request_inference_duration", "Batched until the last token, seconds", durations)
        histogram("request_mean_time_per_token_duration", "Inference time per generated token, seconds", durations)
        histogram("request_generated_tokens", "Tokens generated per request", linear_buckets(max_total_tokens))
        histogram("request_input_length", "Prompt tokens per request", linear_buckets(max_input_length))
        histogram("request_max_new_tokens", "max_new_tokens per request", linear_buckets(max_total_tokens))
        histogram("request_skipped_tokens", "Speculative tokens accepted per request", linear_buckets(max_total_tokens))
        histogram("batch_next_size", "Requests per new (prefill) batch", [float(i) for i in range(1, 1025)])
        histogram("batch_inference_duration", "Prefill/Decode RPC time, seconds", durations, "method")
        gauge("queue_length", "Requests waiting in the adapter queues")
        gauge("batch_current_size", "Requests in the running batch")
        gauge("batch_current_max_tokens", "KV tokens reserved by the running batch")
        counter("adapter_request_count", "Requests per adapter", "adapter")
        counter("adapter_generated_tokens", "Tokens generated per adapter", "adapter")
        summary("adapter_queue_duration", "Queue time of the adapter's requests, seconds", "adapter")
        summary("adapter_load_duration", "Adapter download/load/offload RPC time, seconds", "adapter", "phase")
        gauge("adapter_tier_adapters", "Adapters held per tier (device, host memory, disk cache)", "tier")
        gauge("adapter_tier_bytes", "Adapter weight bytes per tier (device and host summed over shards)", "tier")

    # ---- definitions ------------------------------------------------------------------------------------------------

    def _add(self, name: str, metric: MetricWrapperBase) -> None:
        self._metrics[name] = metric

    def _counter(self, name: str, doc: str, *labels: str) -> None:
        self._add(name, Counter(PREFIX + name, doc, labels, registry=self.registry))

    def _histogram(self, name: str, doc: str, buckets: list[float], *labels: str) -> None:
        self._add(name, Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry))

    def _gauge(self, name: str, doc: str, *labels: str) -> None:
        self._add(name, Gauge(PREFIX + name, doc, labels, registry=self.registry))

    def _summary(self, name: str, doc: str, *labels: str) -> None:
        self._add(name, Summary(PREFIX + name, doc, labels, registry=self.registry))

    def _series(self, name: str, labels: dict[str, str]) -> Any:
        metric = self._metrics[name]
        return metric.labels(**labels) if labels else metric

    # ---- recording ----------------------------------------------------------------------------------------------

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self._series(name, labels).inc(amount)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._series(name, labels).observe(value)

    def failure(self, error_type: str) -> None:
        self.inc("request_failure", err=FAILURE_LABELS.get(error_type, error_type))

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """Read this gauge from `read` at every scrape."""
        self._metrics[name].set_function(read)

    def adapter_tiers(self, read: Callable[[], dict[str, tuple[int, int]]]) -> None:
        """Read the adapter tiers ({tier: (adapters, bytes)}) at every scrape."""
        for tier in read():
            self._metrics["adapter_tier_adapters"].labels(tier=tier).set_function(lambda t=tier: read()[t][0])
            self._metrics["adapter_tier_bytes"].labels(tier=tier).set_function(lambda t=tier: read()[t][1])

    def validated(self, input_length: int, max_new_tokens: int, seconds: float) -> None:
        self.observe("request_validation_duration", seconds)
        self.observe("request_input_length", input_length)
        self.observe("request_max_new_tokens", max_new_tokens)

    def adapter_request(self, adapter: AdapterSpec) -> None:
        self.inc("adapter_request_count", adapter=adapter_label(adapter))

    def adapter_step(self, adapter: AdapterSpec, phase: str, seconds: float) -> None:
        """Time of one successful adapter RPC (`phase`: download, load or offload)."""
        self.observe("adapter_load_duration", seconds, adapter=adapter_label(adapter), phase=phase)

    def succeeded(
        self,
        adapter: AdapterSpec,
        total_s: float,
        queue_s: float,
        inference_s: float,
        generated_tokens: int,
        skipped_tokens: int,
    ) -> None:
        """Timings and sizes of one answered request."""
        label = adapter_label(adapter)
        self.observe("request_duration", total_s)
        self.observe("request_queue_duration", queue_s)
        self.observe("request_inference_duration", inference_s)
        self.observe("request_mean_time_per_token_duration", inference_s / max(generated_tokens, 1))
        self.observe("request_generated_tokens", generated_tokens)
        self.observe("request_skipped_tokens", skipped_tokens)
        self.inc("adapter_generated_tokens", generated_tokens, adapter=label)
        self.observe("adapter_queue_duration", queue_s, adapter=label)

    # ---- exposition ---------------------------------------------------------------------------------------------

    def _samples(self) -> Iterator[tuple[str, str, list[tuple[str, str, dict[str, str], float]]]]:
        """(family, type, [(sample name, suffix, labels, value)]) in the reference's naming."""
        for family in self.registry.collect():
            samples = []
            for sample in family.samples:
                suffix = sample.name[len(family.name):]
                if suffix == "_created":
                    continue
                if family.type == "counter":
                    suffix = ""
                samples.append((family.name + suffix, suffix, sample.labels, sample.value))
            if samples:
                yield family.name, family.type, samples

    def render_text(self) -> str:
        lines = []
        for family, kind, samples in self._samples():
            lines.append(f"# TYPE {family} {kind}")
            lines += [f"{name}{_labels(labels)} {_number(value)}" for name, _, labels, value in samples]
        return "\n".join(lines) + "\n"

    def render_json(self) -> dict[str, Any]:
        """`{family: {"type", "data": [{"key", "value"}]}}`; keys: "" or the labelled series, "sum"/"count"."""
        rendered = {}
        for family, kind, samples in self._samples():
            data = []
            for name, suffix, labels, value in samples:
                if suffix in ("_sum", "_count"):
                    key = suffix[1:] + _labels(labels)
                elif suffix == "_bucket":
                    key = family + _labels(labels)
                else:
                    key = name + _labels(labels) if labels else ""
                data.append({"key": key, "value": value})
            rendered[family] = {"type": kind, "data": data}
        return rendered


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)
