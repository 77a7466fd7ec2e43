"""Validation (spec 3.3): every message verbatim, the reference's check order, truncation before the length checks."""

from __future__ import annotations

import asyncio

import pytest

from router.errors import ValidationError
from router.schemas import GenerateParameters
from router.validation import BASE_MODEL_ID, TokenizerPool, ValidationLimits, Validator
from tests.test_router_support import word_tokenizer, words

LIMITS = ValidationLimits(max_best_of=2, max_stop_sequences=3, max_input_length=10, max_total_tokens=16)


@pytest.fixture(scope="module")
def pool():
    pool = TokenizerPool(word_tokenizer(), workers=2)
    yield pool
    pool.close()


def validate(pool, inputs: str, limits: ValidationLimits = LIMITS, header_token: str | None = None, **params):
    validator = Validator(pool, limits, default_adapter_source="hub")
    return asyncio.run(validator.validate(inputs, GenerateParameters(**params), api_token=header_token))


def message_of(pool, inputs: str, limits: ValidationLimits = LIMITS, **params) -> str:
    with pytest.raises(ValidationError) as caught:
        validate(pool, inputs, limits, **params)
    assert caught.value.status_code == 422
    assert caught.value.error_type == "validation"
    prefix = "Input validation error: "
    assert caught.value.message.startswith(prefix)
    return caught.value.message[len(prefix) :]


CASES = [
    (
        {"adapter_id": "a", "merged_adapters": {"ids": ["b"], "weights": [1.0]}},
        "at most one of `adapter_id` or `adapters` may be provided",
    ),
    ({"merged_adapters": {"ids": [], "weights": []}}, "at least one adapter ID must be provided when setting `adapters`"),
    (
        {"merged_adapters": {"ids": ["a", "b"], "weights": [1.0]}},
        "number of adapter IDs must match number of adapter weights",
    ),
    ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ({"temperature": -0.5}, "`temperature` must be non-negative"),
    ({"repetition_penalty": 0.0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"presence_penalty": -2.1}, "`presence_penalty` must be >= -2.0 and <= 2.0"),
    ({"top_p": 0.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 1.5}, "`top_p` must be > 0.0 and < 1.0"),
    ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"return_k_alternatives": 0}, "`return_k_alternatives` must be strictly positive"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a", "b", "c", "d"]}, "`stop` supports up to 3 stop sequences. Given: 4"),
    ({"best_of": 2, "do_sample": True, "seed": 7}, "`seed` must not be set when `best_of` > 1"),
    ({"truncate": 0}, "`truncate` must be strictly positive and less than 10. Given: 0"),
    ({"truncate": 11}, "`truncate` must be strictly positive and less than 10. Given: 11"),
    ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
]


@pytest.mark.parametrize(("params", "expected"), CASES, ids=[expected[:40] for _, expected in CASES])
def test_each_message_verbatim(pool, params, expected):
    assert message_of(pool, words(3), **params) == expected


def test_empty_inputs(pool):
    assert message_of(pool, "") == "`inputs` cannot be empty"


def test_total_tokens(pool):
    assert message_of(pool, words(8), max_new_tokens=9) == (
        "`inputs` tokens + `max_new_tokens` must be <= 16. Given: 8 `inputs` tokens and 9 `max_new_tokens`"
    )


def test_input_length(pool):
    assert message_of(pool, words(11)) == "`inputs` must have less than 10 tokens. Given: 11"


def test_best_of_disabled(pool):
    limits = ValidationLimits(max_best_of=1, max_stop_sequences=3, max_input_length=10, max_total_tokens=16)
    assert message_of(pool, words(3), limits, best_of=2, do_sample=True) == (
        "`best_of` != 1 is not allowed for this endpoint"
    )


@pytest.mark.parametrize(
    ("inputs", "params", "expected"),
    [
        # adapters are checked before anything else
        ("", {"merged_adapters": {"ids": []}, "temperature": -1.0}, "at least one adapter ID"),
        # sampling rule before parameter bounds
        (words(3), {"best_of": 2, "temperature": None, "top_k": None, "repetition_penalty": 0.0}, "you must use sampling"),
        (words(3), {"temperature": -1.0, "max_new_tokens": 0}, "`temperature`"),
        (words(3), {"top_k": -1, "max_new_tokens": 0}, "`top_k`"),
        (words(3), {"max_new_tokens": 0, "stop": ["a"] * 9}, "`max_new_tokens`"),
        (words(3), {"stop": ["a"] * 9, "best_of": 2, "do_sample": True, "seed": 1}, "`stop`"),
        ("", {"best_of": 2, "do_sample": True, "seed": 1}, "`seed`"),
        ("", {"truncate": 0}, "`inputs` cannot be empty"),
        (words(30), {"truncate": 0}, "`truncate`"),
        # total-tokens check before the input-length check
        (words(12), {"max_new_tokens": 8}, "`inputs` tokens + `max_new_tokens`"),
    ],
)
def test_order(pool, inputs, params, expected):
    assert message_of(pool, inputs, **params).startswith(expected)


def test_truncation_happens_before_length_checks(pool):
    request = validate(pool, words(30), truncate=6, max_new_tokens=10)
    assert request.input_ids == tuple(range(25, 31))  # the last 6 words w24..w29
    assert request.input_length == 6
    assert request.max_new_tokens == 10


def test_truncated_length_is_what_counts(pool):
    assert message_of(pool, words(30), truncate=8, max_new_tokens=9) == (
        "`inputs` tokens + `max_new_tokens` must be <= 16. Given: 8 `inputs` tokens and 9 `max_new_tokens`"
    )


def test_defaults(pool):
    request = validate(pool, words(4))
    assert request.max_new_tokens == 12  # max_total_tokens - input tokens
    assert request.adapter.ids == (BASE_MODEL_ID,)
    assert request.adapter.is_base and request.adapter.source == "hub"
    params = request.parameters
    assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty) == (1.0, 0, 1.0, 1.0)
    assert not params.do_sample and not params.HasField("schema")
    assert request.best_of == 1 and not request.details and not request.return_full_text
    assert validate(pool, words(4)).parameters.seed != params.seed  # a fresh random seed per request


def test_temperature_zero_is_greedy(pool):
    params = validate(pool, words(2), temperature=0.0, top_k=5, do_sample=True).parameters
    assert (params.temperature, params.top_k, params.do_sample) == (1.0, 0, False)


def test_empty_adapter_id_is_base_model(pool):
    assert validate(pool, words(2), adapter_id="").adapter.is_base


def test_adapter_source_and_token(pool):
    request = validate(pool, words(2), header_token="header", adapter_id="me/lora", adapter_source="s3")
    assert (request.adapter.ids, request.adapter.source, request.adapter.api_token) == (("me/lora",), "s3", "header")
    assert validate(pool, words(2), header_token="header", api_token="param").adapter.api_token == "param"


def test_density_that_prunes_everything_is_refused(pool):
    merged = {"ids": ["a", "b"], "weights": [0.5, 0.5], "merge_strategy": "ties"}
    assert message_of(pool, words(2), merged_adapters=merged) == (
        "`density` must be > 0.0 when `merge_strategy` is `ties`. Given: 0.0"
    )
    assert validate(pool, words(2), merged_adapters={**merged, "density": 0.5}).adapter.ids == ("a", "b")


def test_response_format(pool):
    text = validate(pool, words(2), response_format={"type": "text"}).parameters
    assert not text.HasField("schema")
    default = validate(pool, words(2), response_format={"type": "json_object"}).parameters
    assert "ArbitraryJsonModel" in default.schema
    given = validate(pool, words(2), response_format={"type": "json_object", "schema": {"type": "object"}}).parameters
    assert given.schema == '{"type": "object"}'
