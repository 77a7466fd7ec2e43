"""OpenAI-compatible routes, chat templates, /v1/models and the OpenAPI document (spec 3.6, 3.9-3.11).

Most tests run the real router over fake gRPC shards (see test_router_support: token k of a request is
`<3 + (sum(input ids) + k [+ seed]) % 50>`), so every answer can be compared with `/generate` on the same prompt.
One end-to-end test serves a tiny Llama with a chat template and a LoRA adapter through the real launcher.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from router.chat_template import ChatTemplate, TemplateError, load_chat_template
from router.openai_schemas import NamedToolChoice, Tool
from router.tools import NO_TOOL, ToolError, parse_tool_call, plan_tools
from tests.test_router_support import router_stack, run, words

LIMITS = ("--max-input-length", "10", "--max-total-tokens", "20", "--max-batch-prefill-tokens", "40")
# "w1"/"w2" open user/assistant turns, "w3" asks for the answer: [user: w5 w6] renders as "w1 w5 w6 w3".
TEMPLATE = (
    "{% for m in messages %}{{ 'w1' if m['role'] == 'user' else 'w2' }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}w3{% endif %}"
)
USER = [{"role": "user", "content": "w5 w6"}]
PROMPT = "w1 w5 w6 w3"


def tokenizer_folder(tmp_path: Path, **config: object) -> Path:
    folder = tmp_path / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def openai_stack(tmp_path: Path, *flags: str, template: str | None = TEMPLATE, **options):
    """The router over fake shards, serving model "words" with `template` as its chat template."""
    folder = tokenizer_folder(tmp_path, **({} if template is None else {"chat_template": template}))
    return router_stack("--tokenizer-name", str(folder), "--model-id", "words", *(flags or LIMITS), **options)


def sse_data(text: str) -> list[str]:
    """The `data: ` payloads of an OpenAI stream (OpenAI frames them with a space)."""
    chunks = text.split("\n\n")
    assert chunks[-1] == "" and all(chunk.startswith("data: ") for chunk in chunks[:-1]), text
    return [chunk[len("data: "):] for chunk in chunks[:-1]]


def stream_chunks(text: str) -> list[dict]:
    data = sse_data(text)
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]


async def generate(stack, inputs: str, **parameters) -> dict:
    reply = await stack.http.post("/generate", json={"inputs": inputs, "parameters": {"details": True, **parameters}})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_completion_matches_generate(tmp_path):
    async def scenario():
        async with openai_stack(tmp_path) as stack:
            before = int(time.time())
            reply = await stack.http.post(
                "/v1/completions", json={"model": "words", "prompt": words(3), "max_tokens": 4, "temperature": 0}
            )
            assert reply.status_code == 200, reply.text
            body = reply.json()
            expected = await generate(stack, words(3), max_new_tokens=4)
            assert body["id"].startswith("cmpl-") and len(body["id"]) > 20
            assert body["object"] == "text_completion" and body["model"] == "words"
            assert before <= body["created"] <= time.time()
            assert body["choices"] == [
                {"index": 0, "text": expected["generated_text"], "logprobs": None, "finish_reason": "length"}
            ]
            assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
            assert reply.headers["x-prompt-tokens"] == "3" and reply.headers["x-generated-tokens"] == "4"
            assert reply.headers["x-model-id"] == "words" and "x-adapter-id" not in reply.headers
            # "" also names the base model; EOS finishes as "stop"; echo prepends the prompt.
            eos = await stack.http.post(
                "/v1/completions", json={"model": "", "prompt": "EOS " + words(2), "temperature": 0, "echo": True}
            )
            choice = eos.json()["choices"][0]
            assert choice["finish_reason"] == "stop" and choice["text"].startswith("EOS " + words(2) + "<")
            assert eos.json()["model"] == "words"

    run(scenario())


def test_completion_with_an_adapter_and_models_list(tmp_path):
    async def scenario():
        async with openai_stack(tmp_path) as stack:
            listed = (await stack.http.get("/v1/models")).json()
            assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["words"]
            assert listed["data"][0]["object"] == "model"
            reply = await stack.http.post(
                "/v1/completions",
                json={"model": "org/lora", "prompt": words(2), "max_tokens": 2, "temperature": 0,
                      "adapter_source": "s3"},
            )
            assert reply.status_code == 200 and reply.json()["model"] == "org/lora"
            assert reply.headers["x-adapter-id"] == "org/lora" and reply.headers["x-adapter-source"] == "s3"
            assert ("download", "org/lora") in stack.shards[0].adapter_calls
            assert stack.shards[0].prefill_batches[-1][0].adapter_index != 0
            listed = (await stack.http.get("/v1/models")).json()
            assert [m["id"] for m in listed["data"]] == ["words", "org/lora"]

    run(scenario())


def test_completion_stream_adds_up_to_the_text(tmp_path):
    async def scenario():
        async with openai_stack(tmp_path) as stack:
            request = {"model": "words", "prompt": words(3), "max_tokens": 4, "temperature": 0, "stream": True}
            reply = await stack.http.post("/v1/completions", json=request)
            assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
            assert reply.headers["x-model-id"] == "words"
            chunks = stream_chunks(reply.text)
            expected = await generate(stack, words(3), max_new_tokens=4)
            assert "".join(c["choices"][0]["text"] for c in chunks) == expected["generated_text"]
            assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
            assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
            assert [c["usage"] for c in chunks[:-1]] == [None] * 3
            assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
            # echo streams the prompt first; logprobs come with each generated token
            echoed = await stack.http.post("/v1/completions", json={**request, "echo": True, "logprobs": 1})
            chunks = stream_chunks(echoed.text)
            assert chunks[0]["choices"][0]["text"] == words(3) and chunks[0]["choices"][0]["logprobs"] is None
            assert "".join(c["choices"][0]["text"] for c in chunks) == words(3) + expected["generated_text"]
            assert [c["choices"][0]["logprobs"]["tokens"] for c in chunks[1:]] == [
                [t["text"]] for t in expected["details"]["tokens"]
            ]

    run(scenario())


def test_n_choices_sync_and_streamed(tmp_path):
    async def scenario():
        async with openai_stack(tmp_path) as stack:
            request = {"model": "words", "prompt": words(3), "max_tokens": 3, "temperature": 0.7, "n": 2}
            bodies = [(await stack.http.post("/v1/completions", json=request)).json() for _ in range(3)]
            body = bodies[0]
            assert [c["index"] for c in body["choices"]] == [0, 1]
            # each choice has its own random seed; the fake shard's text depends on it mod 50, so two seeds collide
            # with probability 1/50: one differing pair in three requests shows the seeds differ
            assert any(b["choices"][0]["text"] != b["choices"][1]["text"] for b in bodies)
            assert body["usage"]["completion_tokens"] == 6
            reply = await stack.http.post("/v1/completions", json={**request, "stream": True})
            chunks = stream_chunks(reply.text)
            texts = {0: "", 1: ""}
            for chunk in chunks:
                (choice,) = chunk["choices"]
                texts[choice["index"]] += choice["text"]
            assert all(text.count("<") == 3 for text in texts.values())
            assert sum(1 for c in chunks if c["choices"][0]["finish_reason"] == "length") == 2
            assert chunks[-1]["usage"]["completion_tokens"] == 6
            # greedy choices are all the same; more choices than --max-best-of are refused, with a status code
            greedy = (await stack.http.post("/v1/completions", json={**request, "temperature": 0})).json()
            assert greedy["choices"][0]["text"] == greedy["choices"][1]["text"]
            many = await stack.http.post("/v1/chat/completions", json={"model": "", "messages": USER, "n": 3})
            assert many.status_code == 422 and many.json()["error_type"] == "validation"

    run(scenario())


def test_completion_logprobs(tmp_path):
    async def scenario():
        async with openai_stack(tmp_path) as stack:
            request = {"model": "words", "prompt": words(3), "max_tokens": 2, "temperature": 0, "logprobs": 2,
                       "echo": True}
            body = (await stack.http.post("/v1/completions", json=request)).json()
            expected = await generate(stack, words(3), max_new_tokens=2, decoder_input_details=True,
                                      return_k_alternatives=2)
            logprobs = body["choices"][0]["logprobs"]
            tokens = expected["details"]["prefill"] + expected["details"]["tokens"]
            assert logprobs["tokens"] == [t["text"] for t in tokens]
            assert logprobs["token_logprobs"] == [t["logprob"] for t in tokens]
            assert logprobs["token_logprobs"][0] is None  # the first prompt token has no logprob
            generated = expected["details"]["tokens"]
            assert logprobs["top_logprobs"][3:] == [
                {a["text"]: a["logprob"] for a in t["alternative_tokens"]} for t in generated
            ]
            assert logprobs["text_offset"] == [0, 3, 6, 9, 9 + len(generated[0]["text"])]
            plain = (await stack.http.post("/v1/completions", json={**request, "logprobs": 0, "echo": False})).json()
            assert plain["choices"][0]["logprobs"]["top_logprobs"] is None
            assert len(plain["choices"][0]["logprobs"]["tokens"]) == 2

    run(scenario())


def test_chat_renders_the_template(tmp_path):
    async def scenario():
        async with openai_stack(tmp_path) as stack:
            request = {"model": "words", "messages": USER, "max_tokens": 3, "temperature": 0}
            body = (await stack.http.post("/v1/chat/completions", json=request)).json()
            assert stack.shards[0].prefill_batches[-1][0].inputs == PROMPT
            expected = await generate(stack, PROMPT, max_new_tokens=3)
            assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
            assert body["choices"] == [{
                "index": 0, "message": {"role": "assistant", "content": expected["generated_text"]},
                "logprobs": None, "finish_reason": "length",
            }]
            assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
            # the same seed samples the same text; content parts are flattened
            seeded = {**request, "temperature": 0.5, "seed": 11,
                      "messages": [{"role": "user", "content": [{"type": "text", "text": "w5 w6"}]}]}
            first, second = [(await stack.http.post("/v1/chat/completions", json=seeded)).json() for _ in range(2)]
            sampled = await generate(stack, PROMPT, max_new_tokens=3, do_sample=True, temperature=0.5, seed=11)
            assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
            assert first["choices"][0]["message"]["content"] == sampled["generated_text"]

    run(scenario())


def test_chat_stream_and_logprobs(tmp_path):
    async def scenario():
        async with openai_stack(tmp_path) as stack:
            request = {"model": "words", "messages": USER, "max_tokens": 3, "temperature": 0, "stream": True,
                       "logprobs": True, "top_logprobs": 2}
            chunks = stream_chunks((await stack.http.post("/v1/chat/completions", json=request)).text)
            expected = await generate(stack, PROMPT, max_new_tokens=3, return_k_alternatives=2)
            assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
            deltas = [c["choices"][0]["delta"] for c in chunks]
            assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
            assert "".join(d["content"] for d in deltas) == expected["generated_text"]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert chunks[-1]["usage"]["completion_tokens"] == 3
            token = expected["details"]["tokens"][0]
            assert chunks[0]["choices"][0]["logprobs"]["content"] == [{
                "token": token["text"], "logprob": token["logprob"], "bytes": list(token["text"].encode()),
                "top_logprobs": [{"token": a["text"], "logprob": a["logprob"], "bytes": list(a["text"].encode())}
                                 for a in token["alternative_tokens"]],
            }]
            sync = (await stack.http.post("/v1/chat/completions", json={**request, "stream": False})).json()
            assert len(sync["choices"][0]["logprobs"]["content"]) == 3

    run(scenario())


def test_chat_template_errors(tmp_path):
    async def scenario():
        async with openai_stack(tmp_path, template=None) as stack:
            reply = await stack.http.post("/v1/chat/completions", json={"model": "", "messages": USER})
            assert reply.status_code == 422 and reply.json()["error_type"] == "template_error"
            assert reply.json()["error"].startswith("Failed applying chat template to inputs: ")
        raising = "{{ raise_exception('only user messages please') }}"
        async with openai_stack(tmp_path, template=raising) as stack:
            reply = await stack.http.post("/v1/chat/completions", json={"model": "", "messages": USER})
            assert reply.status_code == 422 and reply.json() == {
                "error": "Failed applying chat template to inputs: only user messages please",
                "error_type": "template_error",
            }

    run(scenario())


WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}


def test_chat_tools_send_a_grammar_and_instructions(tmp_path):
    async def scenario():
        flags = ("--max-input-length", "300", "--max-total-tokens", "310", "--max-batch-prefill-tokens", "400")
        async with openai_stack(tmp_path, *flags) as stack:
            request = {"model": "", "messages": USER, "max_tokens": 2, "tools": [WEATHER]}
            reply = await stack.http.post("/v1/chat/completions", json=request)
            sent = stack.shards[0].prefill_batches[-1][0]
            schema = json.loads(sent.parameters.schema)
            assert set(schema["$defs"]) == {"weather", NO_TOOL}
            assert schema["$defs"]["weather"]["required"] == ["_name", "city"]
            assert sent.inputs.startswith("w1 w5 w6\n---\n[{") and sent.inputs.endswith(" w3")
            # the fake shard's output is no function call
            assert reply.status_code == 422 and reply.json()["error_type"] == "tool_error"
            both = await stack.http.post(
                "/v1/chat/completions", json={**request, "response_format": {"type": "json_object"}}
            )
            assert both.json() == {"error": "Tool error: Response format and tools are mutually exclusive",
                                   "error_type": "tool_error"}
            unknown = await stack.http.post("/v1/chat/completions", json={**request, "tool_choice": "nope"})
            assert unknown.json()["error"] == "Tool error: Tool with name nope not found"
            none = await stack.http.post("/v1/chat/completions", json={**request, "tool_choice": "none"})
            assert none.status_code == 200 and not stack.shards[0].prefill_batches[-1][0].parameters.HasField("schema")

    run(scenario())


def test_response_format_is_passed_as_a_schema(tmp_path):
    async def scenario():
        async with openai_stack(tmp_path) as stack:
            schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
            formats = [
                ({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, schema),
                ({"type": "json_object", "schema": schema}, schema),
                ({"type": "text"}, None),
            ]
            for response_format, expected in formats:
                request = {"model": "", "messages": USER, "max_tokens": 1, "response_format": response_format}
                assert (await stack.http.post("/v1/chat/completions", json=request)).status_code == 200
                sent = stack.shards[0].prefill_batches[-1][0].parameters
                assert (json.loads(sent.schema) if sent.HasField("schema") else None) == expected

    run(scenario())


def test_bad_requests_are_4xx_json(tmp_path):
    async def scenario():
        async with openai_stack(tmp_path) as stack:
            for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
                untyped = await stack.http.post(path, content=b'{"model": ""}')
                assert untyped.status_code == 415 and untyped.json()["error_type"] == "unsupported_media_type"
                broken = await stack.http.post(path, content=b"{nope", headers={"content-type": "application/json"})
                assert broken.status_code == 400 and broken.json()["error_type"] == "bad_request"
            bodies = {
                "/v1/completions": [{}, {"model": "", "prompt": 3}, {"model": "", "prompt": "w1", "n": 0},
                                    {"model": "", "prompt": "w1", "logprobs": "yes"}],
                "/v1/chat/completions": [{"model": ""}, {"model": "", "messages": []},
                                         {"model": "", "messages": [{"content": "w1"}]},
                                         {"model": "", "messages": [{"role": "wizard", "content": "w1"}]},
                                         {"model": "", "messages": USER, "tools": [{"function": {}}]}],
                "/tokenize": [{}, {"inputs": ["w1"]}],
            }
            for path, cases in bodies.items():
                for body in cases:
                    reply = await stack.http.post(path, json=body)
                    assert reply.status_code == 422, (path, body, reply.text)
                    assert set(reply.json()) == {"error", "error_type"}
            missing = await stack.http.get("/v1/nothing-here")
            assert missing.status_code == 404 and missing.json() == {"error": "Not Found", "error_type": "not_found"}
            wrong = await stack.http.request("TRACE", "/v1/completions")
            assert wrong.status_code == 405 and wrong.json()["error_type"] == "method_not_allowed"
            assert wrong.headers["allow"] == "POST"
            nan = await stack.http.post("/v1/completions", content=b'{"model": "", "prompt": "w1", "temperature": NaN}',
                                        headers={"content-type": "application/json"})
            assert nan.status_code == 422
            huge_top_k = await stack.http.post("/generate", json={"inputs": "w1", "parameters": {"top_k": 2**40}})
            assert huge_top_k.status_code == 422
            for stream in (False, True):  # validation precedes the stream: a real 422, not an event
                reply = await stack.http.post(
                    "/v1/completions", json={"model": "", "prompt": words(11), "stream": stream}
                )
                assert reply.status_code == 422, reply.text
                assert reply.json()["error"] == "Input validation error: `inputs` must have less than 10 tokens. Given: 11"

    run(scenario())


def test_openai_stream_reports_generation_errors_as_events(tmp_path):
    async def scenario():
        async with openai_stack(tmp_path) as stack:
            reply = await stack.http.post(
                "/v1/completions", json={"model": "", "prompt": "FAIL", "stream": True, "max_tokens": 2}
            )
            assert reply.status_code == 200
            (event,) = [json.loads(item) for item in sse_data(reply.text)]
            assert event["error_type"] == "generation" and "boom" in event["error"]
            ok = await stack.http.post("/v1/completions", json={"model": "", "prompt": "w1", "max_tokens": 1})
            assert ok.status_code == 200

    run(scenario())


def test_overloaded_openai_stream_is_429(tmp_path):
    async def scenario():
        async with openai_stack(tmp_path, *LIMITS, "--max-concurrent-requests", "1") as stack:
            request = {"model": "", "prompt": "w1", "max_tokens": 2, "stream": True, "n": 2, "temperature": 1}
            reply = await stack.http.post("/v1/completions", json=request)
            assert reply.status_code == 429 and reply.json()["error_type"] == "overloaded"
            single = await stack.http.post("/v1/completions", json={**request, "n": 1})
            assert single.status_code == 200 and sse_data(single.text)[-1] == "[DONE]"

    run(scenario())


def test_openapi_document(tmp_path):
    async def scenario():
        async with openai_stack(tmp_path) as stack:
            document = (await stack.http.get("/openapi.json")).json()
            assert document["info"]["title"] == "LoRAX"
            assert (await stack.http.get("/api-doc/openapi.json")).json() == document
            paths = document["paths"]
            for path in ("/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions", "/tokenize"):
                responses = paths[path]["post"]["responses"]
                assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
            for path in ("/", "/generate", "/v1/completions", "/v1/chat/completions"):
                assert {"200", "422", "424", "429", "500"} <= set(paths[path]["post"]["responses"])

            def ok(path: str, media: str) -> str:
                return paths[path]["post"]["responses"]["200"]["content"][media]["schema"]["$ref"].split("/")[-1]

            assert ok("/generate", "application/json") == "GenerateResponse"
            compat = paths["/"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
            assert compat["type"] == "array" and compat["items"]["$ref"].endswith("/GenerateResponse")
            assert ok("/generate_stream", "text/event-stream") == "StreamResponse"
            assert ok("/v1/completions", "application/json") == "Completion"
            assert ok("/v1/chat/completions", "application/json") == "ChatCompletion"
            assert ok("/v1/chat/completions", "text/event-stream") == "ChatCompletionChunk"
            schemas = document["components"]["schemas"]
            assert {"ChatCompletionChunk", "StreamResponse", "ChatDelta", "Token"} <= set(schemas)
            assert set(schemas["GenerateResponse"]["properties"]) == {"generated_text", "details"}
            assert "messages" in schemas["ChatCompletionRequest"]["required"]
            assert paths["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]

    run(scenario())


# ------------------------------------------------------------------------------------------------ chat templates

def test_load_chat_template_sources(tmp_path):
    folder = tokenizer_folder(tmp_path, chat_template=[{"name": "tool_use", "template": "T"},
                                                       {"name": "default", "template": "D"}],
                              bos_token={"content": "<s>", "lstrip": False}, eos_token="</s>")
    assert load_chat_template(str(folder)) == ChatTemplate("D", bos_token="<s>", eos_token="</s>")
    (folder / "chat_template.jinja").write_text("J")
    assert load_chat_template(str(folder)).source == "J"  # the .jinja file wins, as in transformers
    empty = tokenizer_folder(tmp_path / "other")
    assert load_chat_template(str(empty)) is None
    assert load_chat_template("no-such/model-anywhere") is None  # cache only: no download


def test_template_renders_like_transformers(tmp_path):
    from tests.tiny_models import make_tokenizer

    source = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYS] {{ m['content'] | trim }}"
        "{% else %}[{{ m['role'] | upper }}] {{ m['content'] }}{% endif %}\n{% endfor %}"
        "{% if tools %}{{ tools | tojson }}{% endif %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
    )
    tokenizer = make_tokenizer(tmp_path)
    messages = [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "Ünïcode?"}]
    expected = tokenizer.apply_chat_template(messages, chat_template=source, tools=[WEATHER], tokenize=False,
                                             add_generation_prompt=True)
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    assert template.render(messages, [WEATHER]) == expected
    with pytest.raises(TemplateError):
        ChatTemplate("{% for %}").render(messages)
    with pytest.raises(TemplateError):  # the sandbox refuses attribute tricks
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(messages)


def test_tool_plans_and_parsing():
    tools = [Tool.model_validate(WEATHER)]
    assert plan_tools(None, None, False) is None and plan_tools(tools, "none", True) is None
    auto = plan_tools(tools, "auto", False)
    assert [t["function"]["name"] for t in auto.tools] == ["weather", NO_TOOL]
    assert auto.schema["properties"]["function"]["anyOf"] == [
        {"$ref": "#/$defs/weather"}, {"$ref": f"#/$defs/{NO_TOOL}"}
    ]
    assert [t["function"]["name"] for t in plan_tools(tools, "required", False).tools] == ["weather"]
    named = plan_tools(tools, NamedToolChoice.model_validate({"function": {"name": "weather"}}), False)
    assert list(named.schema["$defs"]) == ["weather"]
    assert auto.prompt_suffix(True, "Call one.") == "\n---\nCall one."
    with pytest.raises(ToolError):
        plan_tools(tools, "auto", True)

    content, call = parse_tool_call('{"function": {"_name": "weather", "city": "Paris"}}')
    assert content is None and call.function.name == "weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert parse_tool_call(json.dumps({"function": {"_name": NO_TOOL, "content": "Hi"}})) == ("Hi", None)
    for bad in ("not json", "[]", '{"function": {"city": "Paris"}}'):
        with pytest.raises(ToolError):
            parse_tool_call(bad)


# ------------------------------------------------------------------------------------------------ end to end

@pytest.mark.e2e
def test_served_tiny_model(tmp_path):
    """A real launcher: chat equals /generate on the rendered prompt (greedy), streamed or not; completions with an
    adapter id use the adapter."""
    from transformers import AutoTokenizer

    from tests.e2e import Launcher
    from tests.tiny_models import make_adapter, make_model

    base = tmp_path / "base"
    model = make_model("llama", base)
    adapter = make_adapter(model, tmp_path / "adapter", 1, 8, 16, ["q_proj", "v_proj"])
    (base / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    messages = [{"role": "user", "content": "What is the capital"}]
    prompt = AutoTokenizer.from_pretrained(base).apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=True)
    launcher = Launcher(str(base), tmp_path, "--max-input-length", "64", "--max-total-tokens", "96",
                        "--max-batch-prefill-tokens", "128", "--adapter-source", "local")
    try:
        url = launcher.wait_ready().url

        def post(path: str, body: dict) -> httpx.Response:
            reply = httpx.post(url + path, json=body, timeout=120)
            assert reply.status_code == 200, reply.text
            return reply

        expected = post("/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 6}}).json()
        chat = {"model": str(base), "messages": messages, "max_tokens": 6, "temperature": 0}
        answer = post("/v1/chat/completions", chat).json()
        assert answer["choices"][0]["message"]["content"] == expected["generated_text"]
        chunks = stream_chunks(post("/v1/chat/completions", {**chat, "stream": True}).text)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected["generated_text"]

        with_adapter = {"inputs": "The quick brown", "parameters": {"max_new_tokens": 6, "adapter_id": str(adapter)}}
        lora = post("/generate", with_adapter).json()["generated_text"]
        plain = post("/generate", {"inputs": "The quick brown", "parameters": {"max_new_tokens": 6}}).json()
        assert lora != plain["generated_text"]
        completion = post("/v1/completions", {"model": str(adapter), "prompt": "The quick brown", "max_tokens": 6,
                                              "temperature": 0}).json()
        assert completion["choices"][0]["text"] == lora and completion["model"] == str(adapter)
        tokens = post("/tokenize", {"inputs": "The quick brown"}).json()
        assert [t["id"] for t in tokens] == AutoTokenizer.from_pretrained(base)("The quick brown")["input_ids"]
    finally:
        launcher.stop()
