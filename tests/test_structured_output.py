"""Structured output (`response_format`): JSON-schema constrained decoding on the shard, in mixed batches with LoRA
rows, the router's 422 for a bad schema, and one request through the real launcher."""
from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import pytest
import torch

from lorax_server.adapters.registry import AdapterKey
from lorax_server.dist import Parallel
from lorax_server.pb import generate_pb2 as pb
from lorax_server.shard import build_service
from lorax_server.structured import Grammars
from router.errors import ValidationError
from router.schemas import GenerateParameters
from router.validation import ARBITRARY_JSON_SCHEMA, TokenizerPool, ValidationLimits, Validator
from tests.e2e import Launcher
from tests.test_router_support import word_tokenizer
from tests.test_shard_exactness import make_request, run_staggered
from tests.tiny_models import make_adapter

# Producible with the tiny models' ~320-token byte-level vocabulary (any byte is a token).
SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer"}},
    "required": ["color", "count"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    folder, _ = tiny_model_dir
    gen = build_service(str(folder), None, "hub", None, Parallel(), torch.device("cpu"), "/unused").generator
    gen.allocate_cache(8192)
    return gen


def request(generator, rid: int, seed: int, schema: dict | None = SCHEMA, max_new: int = 96, **params) -> pb.Request:
    """A sampled request (temperature 1) that may stop at EOS, constrained by `schema` unless it is None."""
    if schema is not None:
        params["schema"] = json.dumps(schema)
    req = make_request(generator.tokenizer, rid, "Hello world", max_new, do_sample=True, seed=seed, **params)
    req.stopping_parameters.ignore_eos_token = False
    return req


def run(generator, requests: list[pb.Request]) -> list[pb.Generation]:
    """Every Generation of one batch run to the end."""
    gens, batch = generator.prefill(generator.new_batch(pb.Batch(id=3, requests=requests)))
    out = list(gens)
    while batch is not None:
        gens, batch = generator.decode([batch])
        out += gens
    return out


def finish(generator, requests: list[pb.Request]) -> dict[int, pb.GeneratedText]:
    """The final text of each request."""
    return {g.request_id: g.generated_text for g in run(generator, requests) if g.HasField("generated_text")}


def valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def test_sampled_output_validates_against_the_schema_for_20_seeds(generator):
    finals = finish(generator, [request(generator, seed, seed) for seed in range(20)])
    for seed, final in finals.items():
        assert valid(final.text, SCHEMA), f"seed {seed}: {final.text!r}"
        assert final.finish_reason == pb.FINISH_REASON_EOS_TOKEN, "a complete object allows only EOS"
    assert len({f.text for f in finals.values()}) > 10, "sampling still varies the output"
    free = finish(generator, [request(generator, seed, seed, schema=None, max_new=24) for seed in range(20)])
    assert not any(valid(f.text, SCHEMA) for f in free.values()), "the same model unconstrained writes no such JSON"
    assert generator.cache.free_blocks == generator.cache.num_blocks


def test_default_json_object_schema_yields_objects(generator):
    """The reference's default schema nests "any object" in objects: it must compile at once and constrain."""
    finals = finish(generator, [request(generator, seed, seed, ARBITRARY_JSON_SCHEMA, max_new=32) for seed in range(8)])
    assert all(f.text.startswith("{") for f in finals.values())
    ended = [f.text for f in finals.values() if f.finish_reason == pb.FINISH_REASON_EOS_TOKEN]
    assert ended and all(isinstance(json.loads(text), dict) for text in ended)


def test_mixed_batch_rows_equal_their_solo_runs(generator, tiny_model_dir, tmp_path, monkeypatch):
    """Constrained, unconstrained and LoRA rows decode together (joining mid-decode, filtered as they finish)
    and each produces exactly what it produces alone."""
    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(tmp_path))
    _, model = tiny_model_dir
    adapter = make_adapter(model, tmp_path / "adapter", 3, 8, 16, ["q_proj", "v_proj"])
    generator.adapters.load(AdapterKey((str(adapter),), "local"), 1)
    rows = [
        request(generator, 0, 11),  # constrained, base model
        make_request(generator.tokenizer, 1, "The quick brown fox", 12),  # unconstrained greedy, base model
        request(generator, 2, 12, schema=None, max_new=10),  # unconstrained sampled, adapter
        request(generator, 3, 13),  # constrained, adapter
    ]
    rows[2].adapter_index = rows[3].adapter_index = 1
    together = run_staggered(generator, rows, join_after=2)
    for row in rows:
        alone = [g.next_tokens.ids[0] for g in run(generator, [row])]
        assert together[row.id] == alone, f"row {row.id}"
    text = generator.tokenizer.decode(together[3], skip_special_tokens=True)
    assert valid(text, SCHEMA), text
    assert together[0] != together[3], "the adapter changes the constrained row too"


def test_a_schema_that_fails_on_the_shard_fails_only_its_request(generator):
    good, bad = request(generator, 0, 0, max_new=4), request(generator, 1, 0, {"type": "no-such-type"})
    generations, batch = generator.prefill(generator.new_batch(pb.Batch(id=4, requests=[good, bad])))
    by_id = {g.request_id: g for g in generations}
    assert "invalid JSON schema" in by_id[1].error and "no-such-type" in by_id[1].error
    assert not by_id[1].next_tokens.ids and len(by_id[0].next_tokens.ids) == 1 and not by_id[0].HasField("error")
    while batch is not None:  # the good request runs to its end beside the failed one
        generations, batch = generator.decode([batch])
        assert [g.request_id for g in generations] == [0]
    assert generations[0].HasField("generated_text")


def test_compiled_schemas_are_cached_least_recently_used_first(generator):
    grammars = Grammars(generator.tokenizer, generator.vocab, [generator.tokenizer.eos_token_id], cache_size=2)
    schemas = [json.dumps({"type": kind}) for kind in ("integer", "boolean", "string")]
    grammars.constraint(schemas[0])
    compiled = grammars.compiled(schemas[0])
    grammars.constraint(schemas[1])
    grammars.constraint(schemas[0])
    assert grammars.compiled(schemas[0]) is compiled, "a repeated schema is not compiled again"
    grammars.constraint(schemas[2])
    assert grammars.compiled(schemas[1]) is None and grammars.compiled(schemas[0]) is compiled


def validate(**params):
    pool = TokenizerPool(word_tokenizer(), workers=1)
    try:
        validator = Validator(pool, ValidationLimits(max_input_length=10, max_total_tokens=16))
        return asyncio.run(validator.validate("w1 w2", GenerateParameters(max_new_tokens=4, **params)))
    finally:
        pool.close()


def test_router_sends_the_schema_and_refuses_an_invalid_one_with_422():
    valid_request = validate(response_format={"type": "json_schema", "schema": SCHEMA})
    assert json.loads(valid_request.parameters.schema) == SCHEMA
    assert json.loads(validate(response_format={"type": "json_object"}).parameters.schema) == ARBITRARY_JSON_SCHEMA
    assert not validate(response_format={"type": "text"}).parameters.HasField("schema")
    with pytest.raises(ValidationError) as caught:
        validate(response_format={"type": "json_schema", "schema": {"type": "object", "required": 3}})
    assert caught.value.status_code == 422 and caught.value.error_type == "validation"
    assert caught.value.message.startswith("Input validation error: `response_format` has an invalid JSON schema")


@pytest.mark.e2e
def test_generate_with_response_format_end_to_end(tiny_model_dir, tmp_path):
    folder, _ = tiny_model_dir
    launcher = Launcher(str(folder), tmp_path, "--max-input-length", "32", "--max-total-tokens", "160").wait_ready()
    try:
        body = {"inputs": "Hello world", "parameters": {
            "max_new_tokens": 96, "do_sample": True, "temperature": 1.0, "seed": 5, "details": True,
            "response_format": {"type": "json_object", "schema": SCHEMA},
        }}
        answer = httpx.post(launcher.url + "/generate", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        assert valid(answer.json()["generated_text"], SCHEMA), answer.json()
        assert answer.json()["details"]["finish_reason"] == "eos_token"
        body["parameters"]["response_format"] = {"type": "json_object", "schema": {"type": "no-such-type"}}
        refused = httpx.post(launcher.url + "/generate", json=body, timeout=120)
        assert refused.status_code == 422 and refused.json()["error_type"] == "validation", refused.text
    finally:
        assert launcher.stop() == 0
