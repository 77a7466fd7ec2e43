"""Wire compatibility of the request/response models (spec 3.3-3.5, 6)."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from router.schemas import (
    AlternativeToken,
    BestOfSequence,
    CompatGenerateRequest,
    Details,
    GenerateRequest,
    GenerateResponse,
    PrefillToken,
    StreamResponse,
    Token,
)

# What lorax-client's Client.generate posts: every key present, unset ones as explicit nulls.
LORAX_CLIENT_PAYLOAD = {
    "inputs": "What is deep learning?",
    "parameters": {
        "adapter_id": None,
        "adapter_source": None,
        "merged_adapters": None,
        "api_token": None,
        "do_sample": False,
        "max_new_tokens": 20,
        "ignore_eos_token": False,
        "repetition_penalty": None,
        "return_full_text": False,
        "stop": [],
        "seed": None,
        "temperature": None,
        "top_k": None,
        "top_p": None,
        "truncate": None,
        "typical_p": None,
        "best_of": None,
        "watermark": False,
        "details": True,
        "decoder_input_details": False,
        "return_k_alternatives": None,
        "response_format": None,
    },
    "stream": False,
}


def test_lorax_client_payload():
    request = CompatGenerateRequest.model_validate(LORAX_CLIENT_PAYLOAD)
    p = request.parameters
    assert request.inputs == "What is deep learning?" and request.stream is False
    assert p.max_new_tokens == 20 and p.details is True
    assert p.adapter_id is None and p.temperature is None and p.best_of is None and p.stop == []


def test_explicit_nulls_mean_defaults():
    nulls = {key: None for key in LORAX_CLIENT_PAYLOAD["parameters"]}
    p = GenerateRequest.model_validate({"inputs": "x", "parameters": nulls}).parameters
    assert p.do_sample is False and p.stop == [] and p.details is False and p.watermark is False
    assert p.return_full_text is False and p.decoder_input_details is False
    assert GenerateRequest.model_validate({"inputs": "x", "parameters": None}).parameters.stop == []
    merged = GenerateRequest.model_validate(
        {"inputs": "x", "parameters": {"merged_adapters": {"ids": ["a"], "weights": [1], "density": None}}}
    ).parameters.merged_adapters
    assert merged.density == 0.0 and merged.merge_strategy == "linear" and merged.majority_sign_method == "total"


def test_unknown_keys_are_ignored():
    request = CompatGenerateRequest.model_validate(
        {"inputs": "x", "extra": 1, "parameters": {"apply_chat_template": True, "whatever": [1, 2]}}
    )
    assert request.inputs == "x"


def test_full_merged_adapters_and_response_format():
    p = GenerateRequest.model_validate(
        {
            "inputs": "x",
            "parameters": {
                "merged_adapters": {
                    "ids": ["a", "b"],
                    "weights": [0.3, 0.7],
                    "merge_strategy": "dare_ties",
                    "density": 0.5,
                    "majority_sign_method": "frequency",
                },
                "response_format": {"type": "json_object", "schema": {"type": "object"}},
            },
        }
    ).parameters
    assert p.merged_adapters.merge_strategy == "dare_ties" and p.merged_adapters.weights == [0.3, 0.7]
    assert p.response_format.json_schema_ == {"type": "object"}


@pytest.mark.parametrize(
    "body",
    [
        {},  # inputs missing
        {"inputs": None},
        {"inputs": "x", "parameters": {"max_new_tokens": "many"}},
        {"inputs": "x", "parameters": {"seed": -1}},
        {"inputs": "x", "parameters": {"stop": "not a list"}},
        {"inputs": "x", "parameters": {"merged_adapters": {"ids": ["a"], "merge_strategy": "magic"}}},
        {"inputs": "x", "parameters": {"response_format": {"type": "yaml"}}},
    ],
)
def test_wrong_shapes_are_refused(body):
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate(body)


def token(**overrides) -> Token:
    return Token(**{"id": 5, "text": "a", "logprob": -0.5, "special": False, **overrides})


def test_token_shape():
    assert json.loads(token().model_dump_json()) == {
        "id": 5, "text": "a", "logprob": -0.5, "special": False, "skipped": False
    }
    with_alternatives = token(alternative_tokens=[AlternativeToken(id=6, text="b", logprob=-1.0)])
    assert json.loads(with_alternatives.model_dump_json())["alternative_tokens"] == [
        {"id": 6, "text": "b", "logprob": -1.0}
    ]


def test_generate_response_shape():
    assert json.loads(GenerateResponse(generated_text="hi").model_dump_json()) == {"generated_text": "hi"}
    details = Details(
        finish_reason="eos_token",
        prompt_tokens=2,
        generated_tokens=1,
        skipped_tokens=0,
        seed=None,
        prefill=[PrefillToken(id=1, text="x", logprob=math.nan)],
        tokens=[token()],
    )
    body = json.loads(GenerateResponse(generated_text="hi", details=details).model_dump_json())
    assert set(body["details"]) == {
        "finish_reason", "prompt_tokens", "generated_tokens", "skipped_tokens", "seed", "prefill", "tokens"
    }
    assert body["details"]["seed"] is None  # present, null
    assert body["details"]["prefill"][0]["logprob"] is None  # NaN => null
    sequence = BestOfSequence(
        generated_text="ho", finish_reason="length", generated_tokens=1, seed=3, prefill=[], tokens=[token()]
    )
    details.best_of_sequences = [sequence]
    body = json.loads(GenerateResponse(generated_text="hi", details=details).model_dump_json())
    assert body["details"]["best_of_sequences"][0]["seed"] == 3


def test_stream_response_keeps_nulls():
    assert json.loads(StreamResponse(token=token()).model_dump_json()) == {
        "token": {"id": 5, "text": "a", "logprob": -0.5, "special": False, "skipped": False},
        "generated_text": None,
        "details": None,
    }
