"""Router metrics (spec 3.8): exposition names and buckets, and what each recording point measures."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from router.errors import GenerationError
from router.metrics import Metrics, adapter_label
from router.queue import EndEvent, Entry, TokenEvent
from router.schemas import Token
from router.validation import AdapterSpec
from tests.test_router_support import make_request, router_stack, run, words

LIMITS = ("--max-input-length", "10", "--max-total-tokens", "20", "--max-batch-prefill-tokens", "40")


def samples(text: str) -> dict[str, float]:
    """`series -> value` of every sample line."""
    series = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            series[name] = float(value)
    return series


def bucket_bounds(text: str, family: str) -> list[float]:
    return [float(s.labels["le"]) for f in text_string_to_metric_families(text) if f.name == family
            for s in f.samples if s.name.endswith("_bucket")]


def test_exposition_keeps_the_reference_names():
    metrics = Metrics()
    metrics.inc("request_count", 2)
    metrics.failure("incomplete_generation")
    metrics.inc("batch_inference_count", method="decode")
    metrics.gauge("queue_length", lambda: 7)
    text = metrics.render_text()
    lines = text.splitlines()
    for line in ["# TYPE lorax_request_count counter", "lorax_request_count 2",
                 'lorax_request_failure{err="incomplete"} 1', 'lorax_batch_inference_count{method="decode"} 1',
                 "# TYPE lorax_request_duration histogram", "lorax_request_duration_count 0",
                 "# TYPE lorax_queue_length gauge", "lorax_queue_length 7"]:
        assert line in lines, line
    assert not any("_total" in line or "_created" in line for line in lines)
    families = {f.name: f.type for f in text_string_to_metric_families(text)}  # the official parser accepts it
    assert families["lorax_request_count"] == "counter" and families["lorax_request_duration"] == "histogram"
    # labelled series nobody recorded yet are not listed
    assert "lorax_batch_concat" not in text and "lorax_adapter_request_count" not in text


def test_buckets_follow_the_spec():
    text = Metrics(max_input_length=1000, max_total_tokens=2048).render_text()
    durations = bucket_bounds(text, "lorax_request_queue_duration")
    assert len(durations) == 36 and durations[-1] == float("inf")
    assert durations[0] == 0.00015
    assert all(abs(b / a - 1.5) < 1e-4 for a, b in zip(durations, durations[1:-1]))
    assert bucket_bounds(text, "lorax_request_input_length")[:-1] == [10.0 * (i + 1) for i in range(100)]
    generated = bucket_bounds(text, "lorax_request_generated_tokens")
    assert len(generated) == 101 and generated[-2] == 2048.0
    assert bucket_bounds(text, "lorax_batch_next_size")[:-1] == [float(i) for i in range(1, 1025)]


def test_adapter_labels_are_readable_and_escaped():
    assert adapter_label(AdapterSpec(ids=("__base_model__",))) == "base"
    assert adapter_label(AdapterSpec(ids=("org/lora",))) == "org/lora"
    assert adapter_label(AdapterSpec(ids=("a", "b"), weights=(0.5, 0.5), merge_strategy="ties")) == "ties:a+b"
    private = adapter_label(AdapterSpec(ids=("acme/secret-lora",), api_token="hf_x"))
    assert private.startswith("private:") and "secret" not in private
    assert private == adapter_label(AdapterSpec(ids=("acme/secret-lora",), api_token="hf_other")), "one series per adapter"
    metrics = Metrics()
    weird = 'we"ird\\id\nx'
    metrics.adapter_request(AdapterSpec(ids=(weird,)))
    text = metrics.render_text()
    assert 'lorax_adapter_request_count{adapter="we\\"ird\\\\id\\nx"} 1' in text.splitlines()
    parsed = [s for f in text_string_to_metric_families(text) for s in f.samples
              if f.name == "lorax_adapter_request_count"]
    assert parsed[0].labels == {"adapter": weird}


def test_json_shape():
    metrics = Metrics()
    metrics.observe("batch_inference_duration", 0.01, method="prefill")
    metrics.adapter_step(AdapterSpec(ids=("x",)), "download", 2.5)
    as_json = metrics.render_json()
    data = {d["key"]: d["value"] for d in as_json["lorax_batch_inference_duration"]["data"]}
    assert as_json["lorax_batch_inference_duration"]["type"] == "histogram"
    assert data['lorax_batch_inference_duration{method="prefill",le="0.0129746"}'] == 1.0
    assert data['count{method="prefill"}'] == 1.0 and data['sum{method="prefill"}'] == 0.01
    summary = as_json["lorax_adapter_load_duration"]
    assert summary["type"] == "summary"
    assert {d["key"]: d["value"] for d in summary["data"]} == {
        'count{adapter="x",phase="download"}': 1.0, 'sum{adapter="x",phase="download"}': 2.5}
    assert {d["key"] for d in as_json["lorax_request_duration"]["data"]} >= {"sum", "count"}


def test_entry_outcome_is_reported_once():
    async def scenario():
        outcomes = []

        def entry() -> Entry:
            e = Entry(id=1, request=make_request(2, 3), adapter_index=0)
            e.on_final = lambda e, event: outcomes.append((e.id, event))
            return e

        answered = entry()
        token = Token(id=5, text="x", logprob=-1.0, special=False, skipped=True)
        answered.send(TokenEvent(token))
        end = EndEvent(token=token, generated_text="xx", generated_tokens=2, finish_reason="length", seed=None)
        answered.send(end)
        answered.fail(GenerationError("late"))
        answered.cancel()
        assert outcomes == [(1, end)] and answered.skipped_tokens == 2 and answered.finished_at is not None

        outcomes.clear()
        abandoned = entry()
        abandoned.cancel()
        abandoned.fail(GenerationError("after the client left"))
        assert outcomes == [(1, None)] and abandoned.events.empty() and abandoned.dropped

        outcomes.clear()
        broken = entry()
        broken.on_final = lambda e, event: 1 / 0  # a failing recorder never reaches the batching loop
        broken.fail(GenerationError("x"))
        assert broken.finished

    run(scenario())


def test_requests_record_timings_sizes_and_adapter_series():
    async def scenario():
        async with router_stack(*LIMITS, step_delay=0.02) as stack:
            http = stack.http
            await http.post("/generate", json={"inputs": words(3), "parameters": {"max_new_tokens": 4}})
            lora = await http.post("/generate", json={"inputs": words(3), "parameters": {"max_new_tokens": 2,
                                                                                          "adapter_id": "org/a"}})
            assert lora.status_code == 200
            stream_body = {"inputs": words(2), "parameters": {"max_new_tokens": 3}}
            assert (await http.post("/generate_stream", json=stream_body)).status_code == 200
            assert (await http.post("/generate", json={"inputs": "w1", "parameters": {"top_k": -1}})).status_code == 422
            got = samples((await http.get("/metrics")).text)

        def value(series: str) -> float:
            return got[series]

        for name in ["request_duration", "request_queue_duration", "request_inference_duration",
                     "request_mean_time_per_token_duration", "request_generated_tokens", "request_skipped_tokens"]:
            assert value(f"lorax_{name}_count") == 3, name  # answered requests only
        assert value("lorax_request_validation_duration_count") == 3  # the 422 never passed validation
        assert value("lorax_request_input_length_sum") == 3 + 3 + 2
        assert value("lorax_request_max_new_tokens_sum") == 4 + 2 + 3
        assert value("lorax_request_generated_tokens_sum") == 4 + 2 + 3
        assert value("lorax_request_skipped_tokens_sum") == 0
        steps = 4 + 2 + 3  # one shard step per token, each at least step_delay
        inference = value("lorax_request_inference_duration_sum")
        assert inference >= steps * 0.02 * 0.9
        assert value("lorax_request_duration_sum") >= inference + value("lorax_request_queue_duration_sum")
        assert value('lorax_batch_inference_duration_count{method="prefill"}') == 3
        assert value('lorax_batch_inference_duration_count{method="decode"}') == 3 + 1 + 2
        assert value('lorax_batch_inference_duration_sum{method="decode"}') >= 6 * 0.02 * 0.9
        assert value("lorax_batch_next_size_count") == 3 and value("lorax_batch_next_size_sum") == 3
        assert value('lorax_adapter_request_count{adapter="base"}') == 2
        assert value('lorax_adapter_request_count{adapter="org/a"}') == 1
        assert value('lorax_adapter_generated_tokens{adapter="org/a"}') == 2
        assert value('lorax_adapter_generated_tokens{adapter="base"}') == 4 + 3
        assert value('lorax_adapter_queue_duration_count{adapter="org/a"}') == 1
        assert value('lorax_adapter_load_duration_count{adapter="org/a",phase="download"}') == 1
        assert value('lorax_adapter_load_duration_count{adapter="org/a",phase="load"}') == 1

    run(scenario())


def test_best_of_counts_as_one_request():
    async def scenario():
        async with router_stack(*LIMITS) as stack:
            params = {"max_new_tokens": 3, "best_of": 2, "do_sample": True}
            reply = await stack.http.post("/generate", json={"inputs": words(3), "parameters": params})
            assert reply.status_code == 200
            got = samples((await stack.http.get("/metrics")).text)
            assert sum(len(batch) for batch in stack.shards[0].prefill_batches) == 2  # two sequences ran
            assert got["lorax_request_generated_tokens_count"] == 1 and got["lorax_request_generated_tokens_sum"] == 3
            assert got['lorax_adapter_request_count{adapter="base"}'] == 1

    run(scenario())


def test_adapter_rpc_failures_are_counted():
    async def scenario():
        async with router_stack(*LIMITS) as stack:
            stack.shards[0].download_error["org/missing"] = "404 not found"
            body = {"inputs": words(2), "parameters": {"adapter_id": "org/missing"}}
            assert (await stack.http.post("/generate", json=body)).status_code == 424
            got = samples((await stack.http.get("/metrics")).text)
            assert got['lorax_request_failure{err="download_adapter"}'] == 1
            assert got['lorax_request_failure{err="generation"}'] == 1
            assert got['lorax_adapter_request_count{adapter="org/missing"}'] == 1
            assert 'lorax_adapter_load_duration_count{adapter="org/missing",phase="download"}' not in got

    run(scenario())
