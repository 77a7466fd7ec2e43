"""The clients users already have, unchanged, against a served tiny Llama with a LoRA adapter.

`lorax-client`, `text-generation` and `openai` (and schemathesis) pin `huggingface_hub<1.0`, so they run in a side
venv (tests/client_venv.py) as small scripts; each answer is compared with what `/generate` returns for the same
parameters, so a client that parses a wrong answer without complaint still fails here.
"""
from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.client_venv import client_venv, run_in_venv, venv_bin
from tests.e2e import Launcher
from tests.tiny_models import make_adapter, make_model

pytestmark = pytest.mark.e2e

PROMPT = "What is the capital of France?"
MESSAGES = [{"role": "user", "content": "What is the capital"}]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
OPENAI_FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}
CHECKS = Path(__file__).with_name("schemathesis_checks.py")
FUZZED = ("/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class Served:
    url: str
    model_id: str
    adapter: str
    base: Path
    venv: Path
    workdir: Path

    def run(self, code: str, **args: Any) -> Any:
        """Run a client script in the side venv with `url`, `model`, `adapter`, `prompt` and `args` in ARGS."""
        common = {"url": self.url, "model": self.model_id, "adapter": self.adapter, "prompt": PROMPT}
        return run_in_venv(self.venv, code, {**common, **args})


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    """One launcher for the module; the side venv is built (first run only) while the shard starts."""
    work = tmp_path_factory.mktemp("clients")
    base = work / "base"
    model = make_model("llama", base)
    adapter = make_adapter(model, work / "adapter", 1, 8, 16, ["q_proj", "v_proj"])
    config_path = base / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": CHAT_TEMPLATE}))
    launcher = Launcher(str(base), work, "--max-input-length", "64", "--max-total-tokens", "128",
                        "--max-batch-prefill-tokens", "256", "--adapter-source", "local")
    try:
        venv = client_venv()
        launcher.wait_ready()
        yield Served(launcher.url, str(base), str(adapter), base, venv, work)
    finally:
        launcher.stop()


def generate(served: Served, prompt: str = PROMPT, **params: Any) -> dict:
    """The reference answer: `/generate` with details, over plain HTTP."""
    body = {"inputs": prompt, "parameters": {"details": True, **params}}
    response = httpx.post(served.url + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def ids(tokens: list[dict]) -> list[int]:
    return [t["id"] for t in tokens]


def mean_logprob(tokens: list[dict]) -> float:
    return sum(t["logprob"] for t in tokens) / len(tokens)


def check_streamed_text(pieces: list[str], final: str) -> None:
    """Streamed texts add up to the final text, but for a trailing incomplete UTF-8 sequence (its "\ufffd")."""
    joined = "".join(pieces)
    assert final.startswith(joined) and set(final[len(joined):]) <= {"\ufffd"}, (joined, final)


def error_of(outcome: dict) -> tuple[str, str]:
    return outcome["type"], outcome["message"]


# ---------------------------------------------------------------- lorax-client (posts to `/`, expects a JSON list)

LORAX_GENERATE = """
from lorax import Client
client = Client(ARGS["url"], timeout=120)
def call(**params):
    return client.generate(ARGS["prompt"], max_new_tokens=8, ignore_eos_token=True, **params).model_dump(mode="json")
emit({
    "adapter": call(adapter_id=ARGS["adapter"]),
    "base": call(),
    "seeded": [call(do_sample=True, temperature=0.9, seed=1234) for _ in range(2)],
    "best_of": call(do_sample=True, best_of=2),
})
"""


def test_lorax_client_generate(served):
    got = served.run(LORAX_GENERATE)
    greedy = {"max_new_tokens": 8, "ignore_eos_token": True}
    for name, params in (("adapter", {"adapter_id": served.adapter}), ("base", {})):
        expected = generate(served, **greedy, **params)
        assert got[name]["generated_text"] == expected["generated_text"]
        assert ids(got[name]["details"]["tokens"]) == ids(expected["details"]["tokens"])
        details = got[name]["details"]
        assert (details["finish_reason"], details["generated_tokens"]) == ("length", 8)
        assert details["prompt_tokens"] == expected["details"]["prompt_tokens"] > 0
    assert ids(got["adapter"]["details"]["tokens"]) != ids(got["base"]["details"]["tokens"])  # adapter_id applied

    first, second = got["seeded"]
    assert first["generated_text"] == second["generated_text"]
    assert first["details"]["seed"] == 1234
    sampled = generate(served, **greedy, do_sample=True, temperature=0.9, seed=1234)
    assert ids(first["details"]["tokens"]) == ids(sampled["details"]["tokens"])

    winner = got["best_of"]["details"]
    (other,) = winner["best_of_sequences"]
    assert winner["generated_tokens"] == other["generated_tokens"] == 8
    assert mean_logprob(winner["tokens"]) >= mean_logprob(other["tokens"])


LORAX_STREAM = """
from lorax import Client
client = Client(ARGS["url"], timeout=120)
events = client.generate_stream(ARGS["prompt"], adapter_id=ARGS["adapter"], max_new_tokens=8, ignore_eos_token=True)
emit([event.model_dump(mode="json") for event in events])
"""


def test_lorax_client_generate_stream(served):
    events = served.run(LORAX_STREAM)
    expected = generate(served, adapter_id=served.adapter, max_new_tokens=8, ignore_eos_token=True)
    assert [e["token"]["id"] for e in events] == ids(expected["details"]["tokens"])
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == expected["generated_text"]
    check_streamed_text([e["token"]["text"] for e in events], expected["generated_text"])
    details = events[-1]["details"]
    assert (details["finish_reason"], details["generated_tokens"]) == ("length", 8)
    assert details["prompt_tokens"] == expected["details"]["prompt_tokens"]


LORAX_ERRORS = """
from lorax import Client
client = Client(ARGS["url"], timeout=120)
calls = {
    "too_long": lambda: client.generate(ARGS["prompt"], max_new_tokens=500),
    "too_long_stream": lambda: list(client.generate_stream(ARGS["prompt"], max_new_tokens=500)),
    "missing_adapter": lambda: client.generate(ARGS["prompt"], adapter_id=ARGS["missing"], max_new_tokens=2),
    "missing_adapter_stream": lambda: list(client.generate_stream(ARGS["prompt"], adapter_id=ARGS["unicode"])),
}
outcomes = {}
for name, call in calls.items():
    try:
        call()
        outcomes[name] = {"type": None, "message": ""}
    except Exception as error:
        outcomes[name] = {"type": f"{type(error).__module__}.{type(error).__name__}", "message": str(error)}
emit(outcomes)
"""


def test_lorax_client_errors(served):
    """Server errors (a 422 body, a 200 stream's error event, a 424) become the client's typed exceptions."""
    missing, unicode = served.workdir / "no-such-adapter", served.workdir / "нет-адаптера"  # ids need not be latin-1
    got = served.run(LORAX_ERRORS, missing=str(missing), unicode=str(unicode))
    too_long = "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 128. Given: "
    for name in ("too_long", "too_long_stream"):
        kind, message = error_of(got[name])
        assert kind == "lorax.errors.ValidationError" and message.startswith(too_long), got[name]
    for name, adapter in (("missing_adapter", missing), ("missing_adapter_stream", unicode)):
        kind, message = error_of(got[name])
        assert kind == "lorax.errors.GenerationError" and adapter.name in message, got[name]


# ------------------------------------------------ text-generation (Hugging Face; also posts to the root route `/`)

TGI = """
from text_generation import Client
client = Client(ARGS["url"], timeout=120)
emit({
    "sync": client.generate(ARGS["prompt"], max_new_tokens=8, decoder_input_details=True).model_dump(mode="json"),
    "stream": [e.model_dump(mode="json") for e in client.generate_stream(ARGS["prompt"], max_new_tokens=8)],
})
"""


def test_text_generation_client(served):
    got = served.run(TGI)
    expected = generate(served, max_new_tokens=8, decoder_input_details=True)
    sync, details = got["sync"], got["sync"]["details"]
    assert sync["generated_text"] == expected["generated_text"]
    assert ids(details["tokens"]) == ids(expected["details"]["tokens"])
    assert details["generated_tokens"] == expected["details"]["generated_tokens"] == len(details["tokens"])
    prefill, expected_prefill = details["prefill"], expected["details"]["prefill"]
    assert ids(prefill) == ids(expected_prefill)
    assert len(prefill) == expected["details"]["prompt_tokens"] and prefill[0]["logprob"] is None
    assert [t["logprob"] for t in prefill[1:]] == pytest.approx([t["logprob"] for t in expected_prefill[1:]])

    stream = got["stream"]
    assert [e["token"]["id"] for e in stream] == ids(expected["details"]["tokens"])
    assert stream[-1]["generated_text"] == expected["generated_text"]
    check_streamed_text([e["token"]["text"] for e in stream], expected["generated_text"])
    assert stream[-1]["details"]["generated_tokens"] == len(stream)


# ------------------------------------------------------------------------------------------------------------ openai

OPENAI_COMPLETIONS = """
from openai import OpenAI
client = OpenAI(base_url=ARGS["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
out = {}
for name in ("model", "adapter"):
    request = dict(model=ARGS[name], prompt=ARGS["prompt"], max_tokens=8, temperature=0)
    out[name] = client.completions.create(**request).model_dump(mode="json")
    out[name + "_stream"] = [c.model_dump(mode="json") for c in client.completions.create(stream=True, **request)]
emit(out)
"""


def check_usage(usage: dict, expected: dict) -> None:
    assert usage["prompt_tokens"] == expected["details"]["prompt_tokens"]
    assert usage["completion_tokens"] == expected["details"]["generated_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_openai_completions(served):
    """`model` is the base model id or an adapter id; text, usage and finish reason agree with `/generate`."""
    got = served.run(OPENAI_COMPLETIONS)
    for name, params in (("model", {}), ("adapter", {"adapter_id": served.adapter})):
        expected = generate(served, max_new_tokens=8, **params)
        finish = OPENAI_FINISH[expected["details"]["finish_reason"]]
        completion = got[name]
        assert completion["object"] == "text_completion" and completion["id"] not in ("", "null")
        (choice,) = completion["choices"]
        assert (choice["text"], choice["finish_reason"]) == (expected["generated_text"], finish)
        check_usage(completion["usage"], expected)

        chunks = got[name + "_stream"]
        check_streamed_text([c["choices"][0]["text"] for c in chunks], expected["generated_text"])
        assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1]["choices"][0]["finish_reason"] == finish
        check_usage(chunks[-1]["usage"], expected)
    assert got["model"]["choices"][0]["text"] != got["adapter"]["choices"][0]["text"]


OPENAI_CHAT = """
from openai import OpenAI
client = OpenAI(base_url=ARGS["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
def chat(**params):
    return client.chat.completions.create(messages=ARGS["messages"], max_tokens=8, **params)
out = {}
for name in ("model", "adapter"):
    out[name] = chat(model=ARGS[name], temperature=0).model_dump(mode="json")
    out[name + "_stream"] = [c.model_dump(mode="json") for c in chat(model=ARGS[name], temperature=0, stream=True)]
out["seeded"] = [chat(model=ARGS["model"], temperature=0.8, seed=7).model_dump(mode="json") for _ in range(2)]
out["n2"] = chat(model=ARGS["model"], temperature=0.8, n=2).model_dump(mode="json")
emit(out)
"""


def chat_prompt(served: Served) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served.base)
    return tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def test_openai_chat_completions(served):
    """Chat answers equal `/generate` on the prompt rendered by the model's chat template, sync and streamed."""
    got = served.run(OPENAI_CHAT, messages=MESSAGES)
    prompt = chat_prompt(served)
    for name, params in (("model", {}), ("adapter", {"adapter_id": served.adapter})):
        expected = generate(served, prompt, max_new_tokens=8, **params)
        finish = OPENAI_FINISH[expected["details"]["finish_reason"]]
        completion = got[name]
        assert completion["object"] == "chat.completion" and completion["id"] not in ("", "null")
        (choice,) = completion["choices"]
        assert choice["message"]["role"] == "assistant"
        assert (choice["message"]["content"], choice["finish_reason"]) == (expected["generated_text"], finish)
        check_usage(completion["usage"], expected)

        chunks = got[name + "_stream"]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        check_streamed_text([c["choices"][0]["delta"].get("content") or "" for c in chunks], expected["generated_text"])
        assert chunks[-1]["choices"][0]["finish_reason"] == finish
        check_usage(chunks[-1]["usage"], expected)

    first, second = (c["choices"][0]["message"]["content"] for c in got["seeded"])
    sampled = generate(served, prompt, max_new_tokens=8, do_sample=True, temperature=0.8, seed=7)
    assert first == second == sampled["generated_text"]
    assert [c["index"] for c in got["n2"]["choices"]] == [0, 1]


OPENAI_ERRORS = """
import openai
client = openai.OpenAI(base_url=ARGS["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
calls = {
    "completions": lambda: client.completions.create(model=ARGS["model"], prompt=ARGS["prompt"], max_tokens=500),
    "chat": lambda: client.chat.completions.create(model=ARGS["model"], messages=ARGS["messages"], max_tokens=500),
}
outcomes = {}
for name, call in calls.items():
    try:
        call()
        outcomes[name] = {"type": None, "status": 200, "body": None}
    except openai.APIStatusError as error:  # `body` is the payload's "error" member: LoRAX's message string
        outcomes[name] = {"type": type(error).__name__, "status": error.status_code, "body": error.body}
emit(outcomes)
"""


def test_openai_validation_errors(served):
    got = served.run(OPENAI_ERRORS, messages=MESSAGES)
    for name in ("completions", "chat"):
        assert (got[name]["type"], got[name]["status"]) == ("UnprocessableEntityError", 422), got[name]
        assert got[name]["body"].startswith("Input validation error: `inputs` tokens + `max_new_tokens` must be <= 128")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_openai_streams_end_with_done(served, path):
    body = {"model": served.model_id, "max_tokens": 4, "stream": True}
    body.update({"prompt": PROMPT} if path == "/v1/completions" else {"messages": MESSAGES})
    with httpx.stream("POST", served.url + path, json=body, timeout=120) as response:
        assert response.status_code == 200
        data = [line[len("data:"):].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]" and len(data) >= 2
    assert all(isinstance(json.loads(chunk), dict) for chunk in data[:-1])


# ------------------------------------------------------------------------------------------------------ schemathesis

def test_schemathesis_generate_and_openai_routes(served, tmp_path):
    """Fuzz the documented generate and OpenAI routes: no 5xx, and every error (body or SSE event) has LoRAX's shape."""
    spec = httpx.get(served.url + "/openapi.json", timeout=30).json()
    assert all("post" in spec["paths"].get(path, {}) for path in FUZZED), sorted(spec["paths"])
    command = [
        venv_bin(served.venv, "schemathesis"), "run", served.url + "/openapi.json",
        "--include-path-regex", "^/(generate|generate_stream|v1/completions|v1/chat/completions)?$",
        "--exclude-method", "GET", "--checks", "not_a_server_error,lorax_error_shape",
        "--max-examples", "50", "--seed", "1", "--workers", "1", "--request-timeout", "60", "--continue-on-failure",
        "--report", "har", "--report-har-path", str(tmp_path / "run.har"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=150, cwd=tmp_path,
                            env={**os.environ, "SCHEMATHESIS_HOOKS": str(CHECKS), "NO_COLOR": "1"})
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-2000:]
    entries = json.loads((tmp_path / "run.har").read_text())["log"]["entries"]
    answered = {httpx.URL(e["request"]["url"]).path for e in entries
                if e["request"]["method"] == "POST" and e["response"]["status"] == 200}
    assert answered == set(FUZZED)  # every route really generated for some fuzzed input
