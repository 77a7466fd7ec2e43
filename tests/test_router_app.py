"""HTTP routes (spec 3.2-3.5, 3.8, 3.9) of the real router over fake shards speaking gRPC."""

from __future__ import annotations

import asyncio
import json

from tests.test_router_support import router_stack, run, words

LIMITS = ("--max-input-length", "10", "--max-total-tokens", "20", "--max-batch-prefill-tokens", "40")


def expected_ids(input_ids: list[int], count: int, seed: int = 0) -> list[int]:
    """What the fake shard generates (see test_router_support)."""
    return [3 + (sum(input_ids) + k + seed) % 50 for k in range(count)]


def sse_events(text: str) -> list[dict]:
    assert text.endswith("\n\n")
    chunks = text.split("\n\n")[:-1]
    assert all(chunk.startswith("data:") for chunk in chunks), chunks
    return [json.loads(chunk[len("data:"):]) for chunk in chunks]


def test_generate_with_details():
    async def scenario():
        async with router_stack(*LIMITS) as stack:
            reply = await stack.http.post(
                "/generate", json={"inputs": words(3), "parameters": {"max_new_tokens": 4, "details": True}}
            )
            assert reply.status_code == 200
            ids = expected_ids([1, 2, 3], 4)
            body = reply.json()
            assert body["generated_text"] == "".join(f"<{i}>" for i in ids)
            details = body["details"]
            assert details["finish_reason"] == "length" and details["seed"] is None
            assert (details["prompt_tokens"], details["generated_tokens"], details["skipped_tokens"]) == (3, 4, 0)
            assert details["prefill"] == [] and "best_of_sequences" not in details
            assert [t["id"] for t in details["tokens"]] == ids
            assert details["tokens"][0] == {
                "id": ids[0], "text": f"<{ids[0]}>", "logprob": details["tokens"][0]["logprob"],
                "special": False, "skipped": False,
            }
            assert reply.headers["x-generated-tokens"] == "4" and reply.headers["x-prompt-tokens"] == "3"
            assert reply.headers["x-model-id"] == "words" and "x-adapter-id" not in reply.headers
            plain = await stack.http.post("/generate", json={"inputs": words(3), "parameters": {"max_new_tokens": 2}})
            assert set(plain.json()) == {"generated_text"}

    run(scenario())


TIMING_HEADERS = ("x-compute-time", "x-total-time", "x-validation-time", "x-queue-time", "x-inference-time",
                  "x-time-per-token", "x-time-to-first-token", "x-time-per-output-token")


def test_spec_headers_on_generate_and_openai_replies():
    async def scenario():
        async with router_stack(*LIMITS) as stack:
            body = {"inputs": words(3), "parameters": {"max_new_tokens": 4}}
            replies = [await stack.http.post("/generate", json=body),
                       await stack.http.post("/v1/completions", json={"model": "", "prompt": words(3), "max_tokens": 4})]
            for reply in replies:
                assert reply.status_code == 200, reply.text
                headers = reply.headers
                assert headers["x-compute-type"] == "gpu+optimized"
                assert headers["x-compute-characters"] == str(len(words(3)))
                assert (headers["x-prompt-tokens"], headers["x-generated-tokens"], headers["x-total-tokens"]) == (
                    "3", "4", "7")
                assert headers["x-skipped-tokens"] == "0" and headers["x-model-id"] == "words"
                times = {name: int(headers[name]) for name in TIMING_HEADERS}
                assert all(value >= 0 for value in times.values())
                assert times["x-time-to-first-token"] <= times["x-total-time"]
                assert times["x-queue-time"] + times["x-inference-time"] <= times["x-total-time"] + 1

    run(scenario())


def test_adapter_ids_that_are_not_header_safe_are_percent_encoded():
    async def scenario():
        async with router_stack(*LIMITS) as stack:
            adapter = "нет/адаптер\r\nx-injected: 1"
            body = {"inputs": words(3), "parameters": {"max_new_tokens": 2, "adapter_id": adapter}}
            for route in ("/generate", "/generate_stream"):
                reply = await stack.http.post(route, json=body)
                assert reply.status_code == 200, reply.text
                assert "x-injected" not in reply.headers
                assert reply.headers["x-adapter-id"] == "%D0%BD%D0%B5%D1%82/%D0%B0%D0%B4%D0%B0%D0%BF%D1%82%D0%B5%D1%80%0D%0Ax-injected: 1"

    run(scenario())


def test_prefill_details_full_text_seed_and_alternatives():
    async def scenario():
        async with router_stack(*LIMITS) as stack:
            params = {"max_new_tokens": 2, "decoder_input_details": True, "return_full_text": True,
                      "do_sample": True, "seed": 5, "return_k_alternatives": 2}
            body = (await stack.http.post("/generate", json={"inputs": words(3), "parameters": params})).json()
            ids = expected_ids([1, 2, 3], 2, seed=5)
            assert body["generated_text"] == words(3) + "".join(f"<{i}>" for i in ids)
            details = body["details"]  # decoder_input_details alone turns details on
            assert details["seed"] == 5
            assert [p["id"] for p in details["prefill"]] == [1, 2, 3]
            assert details["prefill"][0]["logprob"] is None and details["prefill"][1]["logprob"] == -1.0
            assert [a["id"] for a in details["tokens"][0]["alternative_tokens"]] == [ids[0], ids[0] + 1]

    run(scenario())


def test_truncate_keeps_the_last_tokens():
    async def scenario():
        async with router_stack(*LIMITS) as stack:
            params = {"max_new_tokens": 1, "truncate": 2, "decoder_input_details": True}
            body = (await stack.http.post("/generate", json={"inputs": words(15), "parameters": params})).json()
            assert [p["id"] for p in body["details"]["prefill"]] == [14, 15]
            assert stack.shards[0].prefill_batches[-1][0].truncate == 2

    run(scenario())


def test_best_of_picks_the_highest_mean_logprob():
    async def scenario():
        async with router_stack(*LIMITS) as stack:
            params = {"max_new_tokens": 3, "best_of": 2, "do_sample": True, "details": True}
            body = (await stack.http.post("/generate", json={"inputs": words(3), "parameters": params})).json()
            others = body["details"]["best_of_sequences"]
            assert len(others) == 1

            def mean(tokens):
                return sum(t["logprob"] for t in tokens) / len(tokens)

            assert mean(body["details"]["tokens"]) >= mean(others[0]["tokens"])
            assert body["details"]["seed"] != others[0]["seed"]
            requests = [r for batch in stack.shards[0].prefill_batches for r in batch]
            assert len(requests) == 2

    run(scenario())


def test_generate_stream():
    async def scenario():
        async with router_stack(*LIMITS) as stack:
            reply = await stack.http.post(
                "/generate_stream", json={"inputs": words(3), "parameters": {"max_new_tokens": 3, "details": True}}
            )
            assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
            assert reply.headers["x-accel-buffering"] == "no"
            events = sse_events(reply.text)
            ids = expected_ids([1, 2, 3], 3)
            assert [e["token"]["id"] for e in events] == ids
            assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
            assert events[-1]["generated_text"] == "".join(f"<{i}>" for i in ids)
            assert events[-1]["details"] == {"finish_reason": "length", "prompt_tokens": 3, "generated_tokens": 3,
                                             "seed": None}

    run(scenario())


def test_compat_routes():
    async def scenario():
        async with router_stack(*LIMITS) as stack:
            for path in ("/", "/invocations"):
                reply = await stack.http.post(path, json={"inputs": words(2), "parameters": {"max_new_tokens": 2}})
                assert reply.status_code == 200
                assert reply.json() == [{"generated_text": "".join(f"<{i}>" for i in expected_ids([1, 2], 2))}]
                streamed = await stack.http.post(
                    path, json={"inputs": words(2), "parameters": {"max_new_tokens": 2}, "stream": True}
                )
                events = sse_events(streamed.text)
                assert len(events) == 2 and events[-1]["generated_text"] is not None

    run(scenario())


def test_eos_finish_reason():
    async def scenario():
        async with router_stack(*LIMITS) as stack:
            body = (await stack.http.post(
                "/generate", json={"inputs": "EOS " + words(2), "parameters": {"max_new_tokens": 9, "details": True}}
            )).json()
            assert body["details"]["finish_reason"] == "eos_token" and body["details"]["generated_tokens"] == 2

    run(scenario())


def test_validation_errors_are_422_json():
    async def scenario():
        async with router_stack(*LIMITS) as stack:
            reply = await stack.http.post("/generate", json={"inputs": words(2), "parameters": {"temperature": -1}})
            assert reply.status_code == 422
            assert reply.json() == {"error": "Input validation error: `temperature` must be non-negative",
                                    "error_type": "validation"}
            reply = await stack.http.post("/generate", json={"inputs": words(11)})
            assert reply.json()["error"] == "Input validation error: `inputs` must have less than 10 tokens. Given: 11"

    run(scenario())


def test_malformed_bodies_are_4xx_json():
    async def scenario():
        async with router_stack(*LIMITS) as stack:
            for path in ("/generate", "/generate_stream", "/"):
                untyped = await stack.http.post(path, content=b'{"inputs": "w1"}')
                assert untyped.status_code == 415 and untyped.json()["error_type"] == "unsupported_media_type"
                broken = await stack.http.post(path, content=b"{not json", headers={"content-type": "application/json"})
                assert broken.status_code == 400 and broken.json()["error_type"] == "bad_request"
                for body in ({}, {"inputs": 3}, {"inputs": "x", "parameters": {"max_new_tokens": "lots"}},
                             {"inputs": "x", "parameters": []}):
                    reply = await stack.http.post(path, json=body)
                    assert reply.status_code == 422, (path, body, reply.text)
                    assert set(reply.json()) == {"error", "error_type"}

    run(scenario())


def test_stream_errors_are_events():
    async def scenario():
        async with router_stack(*LIMITS) as stack:
            cases = [
                ({"best_of": 2, "do_sample": True}, "`best_of` != 1 is not supported when streaming tokens"),
                ({"decoder_input_details": True},
                 "`decoder_input_details` == true is not supported when streaming tokens"),
                ({"top_k": 0}, "`top_k` must be strictly positive"),
            ]
            for params, message in cases:
                reply = await stack.http.post("/generate_stream", json={"inputs": words(2), "parameters": params})
                assert reply.status_code == 200
                assert sse_events(reply.text) == [
                    {"error": f"Input validation error: {message}", "error_type": "validation"}
                ]
            failed = await stack.http.post("/generate_stream", json={"inputs": "FAIL " + words(2)})
            assert sse_events(failed.text) == [{"error": "Request failed during generation: Server error: "
                                                         "boom on request 0", "error_type": "generation"}]

    run(scenario())


def test_failed_batch_fails_every_request_in_it_and_serving_goes_on():
    async def scenario():
        async with router_stack(*LIMITS, step_delay=0.1) as stack:
            running = asyncio.create_task(
                stack.http.post("/generate", json={"inputs": words(2), "parameters": {"max_new_tokens": 4}})
            )
            await asyncio.sleep(0.05)
            # Both queue up during the running batch's step, so they join it as one new batch.
            bodies = [{"inputs": "FAIL " + words(2), "parameters": {"max_new_tokens": 2}},
                      {"inputs": words(2), "parameters": {"max_new_tokens": 2}}]
            replies = await asyncio.gather(*(stack.http.post("/generate", json=b) for b in bodies))
            shard = stack.shards[0]
            assert [len(batch) for batch in shard.prefill_batches] == [1, 2]
            # the failing request is 1 or 2, whichever of the two reached the router first
            errors = [reply.json() for reply in replies]
            assert [reply.status_code for reply in replies] == [424, 424]
            assert errors[0] == errors[1] and errors[0]["error_type"] == "generation"
            assert errors[0]["error"] in {f"Request failed during generation: Server error: boom on request {i}"
                                          for i in (1, 2)}
            assert (await running).status_code == 200
            assert 1 in shard.cleared
            later = await stack.http.post("/generate", json={"inputs": words(2), "parameters": {"max_new_tokens": 2}})
            assert later.status_code == 200

    run(scenario())


def test_failed_decode_is_424():
    async def scenario():
        async with router_stack(*LIMITS) as stack:
            reply = await stack.http.post("/generate", json={"inputs": "DECODEFAIL", "parameters": {"max_new_tokens": 4}})
            assert reply.status_code == 424
            assert reply.json()["error"] == "Request failed during generation: Server error: decode exploded"

    run(scenario())


def test_overloaded_is_429_at_once():
    async def scenario():
        async with router_stack(*LIMITS, "--max-concurrent-requests", "1", step_delay=0.05) as stack:
            slow = asyncio.create_task(
                stack.http.post("/generate", json={"inputs": words(2), "parameters": {"max_new_tokens": 5}})
            )
            await asyncio.sleep(0.05)
            refused = await stack.http.post("/generate", json={"inputs": words(2)})
            assert refused.status_code == 429
            assert refused.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
            streamed = await stack.http.post("/generate_stream", json={"inputs": words(2)})
            assert sse_events(streamed.text) == [{"error": "Model is overloaded", "error_type": "overloaded"}]
            assert (await slow).status_code == 200
            again = await stack.http.post("/generate", json={"inputs": words(2), "parameters": {"max_new_tokens": 1}})
            assert again.status_code == 200  # the permit came back

    run(scenario())


def test_health_and_info():
    async def scenario():
        async with router_stack(*LIMITS, "--model-id", "org/model", "--max-batch-total-tokens", "1000",
                                capacity=800) as stack:
            for path in ("/health", "/ping"):
                reply = await stack.http.get(path)
                assert reply.status_code == 200 and reply.content == b""
            stack.shards[0].healthy = False
            reply = await stack.http.get("/health")
            assert reply.status_code == 503
            assert reply.json() == {"error": "unhealthy", "error_type": "healthcheck"}
            info = (await stack.http.get("/info")).json()
            assert info["model_id"] == "org/model" and info["model_dtype"] == "torch.float32"
            assert info["model_device_type"] == "cpu" and info["max_batch_total_tokens"] == 800
            assert (info["max_input_length"], info["max_total_tokens"], info["max_best_of"]) == (10, 20, 2)
            assert info["max_concurrent_requests"] == 1024 and info["waiting_served_ratio"] == 0.3
            assert info["version"] == "0.1.0" and info["validation_workers"] == 2
            cors = await stack.http.get("/info", headers={"origin": "http://elsewhere.example"})
            assert cors.headers["access-control-allow-origin"] == "*"

    run(scenario())


def test_two_shards_fan_out_and_rank_zero_answers():
    async def scenario():
        async with router_stack(*LIMITS, world_size=2) as stack:
            reply = await stack.http.post("/generate", json={"inputs": words(3), "parameters": {"max_new_tokens": 3}})
            assert reply.json()["generated_text"] == "".join(f"<{i}>" for i in expected_ids([1, 2, 3], 3))
            rank0, rank1 = stack.shards
            assert len(rank1.prefill_batches) == len(rank0.prefill_batches) == 1
            assert rank1.decode_calls == rank0.decode_calls
            assert rank1.warmup_requests and rank0.warmup_requests
            lora = await stack.http.post("/generate", json={"inputs": words(3), "parameters": {"adapter_id": "a/b"}})
            assert lora.status_code == 200
            assert [call for call, _ in rank0.adapter_calls] == ["download", "load"]
            assert [call for call, _ in rank1.adapter_calls] == ["load"]  # downloads happen once, on shard 0

    run(scenario())


def test_metrics():
    async def scenario():
        async with router_stack(*LIMITS) as stack:
            await stack.http.post("/generate", json={"inputs": words(2), "parameters": {"max_new_tokens": 3}})
            await stack.http.post("/generate", json={"inputs": words(2), "parameters": {"top_k": -1}})
            await stack.http.post("/generate", json={"inputs": "FAIL", "parameters": {"max_new_tokens": 3}})
            text = (await stack.http.get("/metrics")).text
            for line in ["# TYPE lorax_request_count counter", "lorax_request_count 3", "lorax_request_success 1",
                         'lorax_request_failure{err="validation"} 1', 'lorax_request_failure{err="generation"} 1',
                         'lorax_batch_inference_count{method="prefill"} 2',
                         'lorax_batch_inference_failure{method="prefill"} 1',
                         'lorax_batch_inference_success{method="decode"} 2',
                         "# TYPE lorax_queue_length gauge", "lorax_queue_length 0", "lorax_batch_current_size 0"]:
                assert line in text.splitlines(), line
            as_json = (await stack.http.get("/metrics", headers={"accept": "application/json"})).json()
            assert as_json["lorax_request_count"] == {"type": "counter", "data": [{"key": "", "value": 3.0}]}
            assert as_json["lorax_request_failure"]["data"][0]["key"] == 'lorax_request_failure{err="validation"}'

    run(scenario())
