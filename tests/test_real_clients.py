"""The clients users already have, unchanged, against a served tiny Llama with a LoRA adapter.

`lorax-client`, `text-generation` and `openai` (and schemathesis) pin `huggingface_hub<1.0`, so they run in a side
venv (tests/client_venv.py) as small scripts; each answer is compared with what `/generate` returns for the same
parameters, so a client that parses a wrong answer without complaint still fails here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.client_venv import client_venv, run_in_venv
from tests.e2e import Launcher
from tests.tiny_models import make_adapter, make_model

pytestmark = pytest.mark.e2e

PROMPT = "What is the capital of France?"


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
def served(tmp_path_factory) -> Served:
    """One launcher for the module; the side venv is built (first run only) while the shard starts."""
    work = tmp_path_factory.mktemp("clients")
    base = work / "base"
    model = make_model("llama", base)
    adapter = make_adapter(model, work / "adapter", 1, 8, 16, ["q_proj", "v_proj"])
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
    got = served.run(LORAX_ERRORS, missing=str(served.workdir / "no-such-adapter"))
    too_long = "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 128. Given: "
    for name in ("too_long", "too_long_stream"):
        kind, message = error_of(got[name])
        assert kind == "lorax.errors.ValidationError" and message.startswith(too_long), got[name]
    kind, message = error_of(got["missing_adapter"])
    assert kind == "lorax.errors.GenerationError" and "no-such-adapter" in message, got["missing_adapter"]


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
    prefill = details["prefill"]
    assert ids(prefill) == ids(expected["details"]["prefill"])
    assert len(prefill) == expected["details"]["prompt_tokens"] and prefill[0]["logprob"] is None
    assert [t["logprob"] for t in prefill[1:]] == pytest.approx([t["logprob"] for t in expected["details"]["prefill"][1:]])

    stream = got["stream"]
    assert [e["token"]["id"] for e in stream] == ids(expected["details"]["tokens"])
    assert stream[-1]["generated_text"] == expected["generated_text"]
    assert stream[-1]["details"]["generated_tokens"] == len(stream)
