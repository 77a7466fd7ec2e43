"""Turn a parsed HTTP request into a `ValidRequest` the scheduler can queue (spec 3.3).

The checks run in the reference's order with its exact messages, because clients match on them. Tokenization runs in
a pool of worker threads, each with its own copy of the tokenizer (`tokenizers` releases the GIL, and one Rust
tokenizer shared between threads can raise "Already borrowed").
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from tokenizers import Tokenizer

from lorax_server.grammar import json_schema_grammar
from lorax_server.pb import generate_pb2
from router.errors import ValidationError
from router.schemas import GenerateParameters, MergedAdapters

BASE_MODEL_ID = "__base_model__"

ARBITRARY_JSON_SCHEMA: dict[str, Any] = {
    "title": "ArbitraryJsonModel",
    "type": "object",
    "additionalProperties": {"type": ["object", "string", "integer", "number", "boolean", "null"]},
}


@dataclass(frozen=True)
class AdapterSpec:
    """Which weights a request runs with; `key` is the identity the adapter index map uses (spec 4.1)."""

    ids: tuple[str, ...]
    weights: tuple[float, ...] = ()
    merge_strategy: str = "linear"
    density: float = 0.0
    majority_sign_method: str = "total"
    source: str = "hub"
    api_token: str | None = None

    @property
    def key(self) -> tuple:
        if len(self.ids) == 1:
            return self.ids
        return (self.ids, self.weights, self.merge_strategy, self.density, self.majority_sign_method)

    @property
    def is_base(self) -> bool:
        return self.ids == (BASE_MODEL_ID,)


@dataclass(frozen=True)
class ValidRequest:
    """A request that passed validation; `input_ids` are already truncated."""

    inputs: str
    input_ids: tuple[int, ...]
    parameters: generate_pb2.NextTokenChooserParameters
    stopping: generate_pb2.StoppingCriteriaParameters
    adapter: AdapterSpec
    details: bool
    decoder_input_details: bool
    return_full_text: bool
    best_of: int

    @property
    def input_length(self) -> int:
        return len(self.input_ids)

    @property
    def max_new_tokens(self) -> int:
        return self.stopping.max_new_tokens

    def with_seed(self, seed: int) -> ValidRequest:
        """A copy with another sampling seed (best_of copies must differ)."""
        parameters = generate_pb2.NextTokenChooserParameters()
        parameters.CopyFrom(self.parameters)
        parameters.seed = seed
        return replace(self, parameters=parameters)


@dataclass(frozen=True)
class ValidationLimits:
    max_best_of: int = 2
    max_stop_sequences: int = 10
    max_input_length: int = 1792
    max_total_tokens: int = 2048


class TokenizerPool:
    """Encodes text in worker threads, one tokenizer copy per thread."""

    def __init__(self, tokenizer: Tokenizer, workers: int) -> None:
        if workers < 1:
            raise ValueError("validation_workers must be > 0")
        serialized = tokenizer.to_str()
        self._local = threading.local()

        def load() -> None:
            self._local.tokenizer = Tokenizer.from_str(serialized)

        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenizer", initializer=load)

    def _encode(self, text: str) -> list[int]:
        return self._local.tokenizer.encode(text, add_special_tokens=True).ids

    async def encode(self, text: str) -> list[int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._encode, text)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Validator:
    """Checks parameters and lengths and fills the defaults the shards expect."""

    def __init__(self, tokenizers: TokenizerPool, limits: ValidationLimits, default_adapter_source: str = "hub") -> None:
        self.tokenizers = tokenizers
        self.limits = limits
        self.default_adapter_source = default_adapter_source

    async def validate(
        self,
        inputs: str,
        params: GenerateParameters,
        *,
        api_token: str | None = None,
    ) -> ValidRequest:
        """Raises `ValidationError` with the first failing check, in the reference's order."""
        limits = self.limits
        adapter = self._adapter(params, api_token)

        best_of = 1 if params.best_of is None else params.best_of
        sampling = params.do_sample or any(
            value is not None for value in (params.temperature, params.top_k, params.top_p, params.typical_p)
        )
        if best_of > 1 and not sampling:
            raise ValidationError("you must use sampling when `best_of` is > 1")

        temperature = 1.0 if params.temperature is None else params.temperature
        if temperature < 0:
            raise ValidationError("`temperature` must be non-negative")
        repetition_penalty = 1.0 if params.repetition_penalty is None else params.repetition_penalty
        if repetition_penalty <= 0:
            raise ValidationError("`repetition_penalty` must be strictly positive")
        frequency_penalty = 0.0 if params.frequency_penalty is None else params.frequency_penalty
        if not -2.0 <= frequency_penalty <= 2.0:
            raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
        presence_penalty = 0.0 if params.presence_penalty is None else params.presence_penalty
        if not -2.0 <= presence_penalty <= 2.0:
            raise ValidationError("`presence_penalty` must be >= -2.0 and <= 2.0")
        top_p = 1.0 if params.top_p is None else params.top_p
        if not 0.0 < top_p <= 1.0:
            raise ValidationError("`top_p` must be > 0.0 and < 1.0")
        typical_p = 1.0 if params.typical_p is None else params.typical_p
        if params.typical_p is not None and not 0.0 < typical_p < 1.0:
            raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
        top_k = 0 if params.top_k is None else params.top_k
        if params.top_k is not None and top_k <= 0:
            raise ValidationError("`top_k` must be strictly positive")
        alternatives = 0 if params.return_k_alternatives is None else params.return_k_alternatives
        if params.return_k_alternatives is not None and alternatives <= 0:
            raise ValidationError("`return_k_alternatives` must be strictly positive")

        if params.max_new_tokens == 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        if len(params.stop) > limits.max_stop_sequences:
            raise ValidationError(
                f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(params.stop)}"
            )
        if params.seed is not None and best_of > 1:
            raise ValidationError("`seed` must not be set when `best_of` > 1")
        if not inputs:
            raise ValidationError("`inputs` cannot be empty")
        truncate = params.truncate
        if truncate is not None and not 0 < truncate <= limits.max_input_length:
            raise ValidationError(
                f"`truncate` must be strictly positive and less than {limits.max_input_length}. Given: {truncate}"
            )

        try:
            ids = await self.tokenizers.encode(inputs)
        except Exception as error:  # the tokenizers library raises plain Exceptions
            raise ValidationError(f"tokenizer error {error}") from error
        if truncate is not None:
            ids = ids[-truncate:]
        input_length = len(ids)
        max_new_tokens = params.max_new_tokens
        if max_new_tokens is not None and input_length + max_new_tokens > limits.max_total_tokens:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
            )
        if input_length > limits.max_input_length:
            raise ValidationError(
                f"`inputs` must have less than {limits.max_input_length} tokens. Given: {input_length}"
            )
        if max_new_tokens is None:
            max_new_tokens = limits.max_total_tokens - input_length

        if best_of != 1:
            self._check_best_of(best_of)

        # temperature 0 means greedy: send a plain argmax chooser so no warper ever divides by zero.
        greedy = temperature == 0.0
        parameters = generate_pb2.NextTokenChooserParameters(
            temperature=1.0 if greedy else temperature,
            top_k=0 if greedy else top_k,
            top_p=1.0 if greedy else top_p,
            typical_p=1.0 if greedy else typical_p,
            do_sample=params.do_sample and not greedy,
            seed=random.getrandbits(64) if params.seed is None else params.seed,
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            watermark=params.watermark,
            adapter_id=params.adapter_id or "",
            return_k_alternatives=alternatives,
        )
        schema = _schema(params)
        if schema is not None:
            parameters.schema = schema
        stopping = generate_pb2.StoppingCriteriaParameters(
            max_new_tokens=max_new_tokens, stop_sequences=params.stop, ignore_eos_token=params.ignore_eos_token
        )
        return ValidRequest(
            inputs=inputs,
            input_ids=tuple(ids),
            parameters=parameters,
            stopping=stopping,
            adapter=adapter,
            details=params.details,
            decoder_input_details=params.decoder_input_details,
            return_full_text=params.return_full_text,
            best_of=best_of,
        )

    def _check_best_of(self, best_of: int) -> None:
        max_best_of = self.limits.max_best_of
        if max_best_of == 1:
            raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
        if not 0 < best_of <= max_best_of:
            raise ValidationError(f"`best_of` must be > 0 and <= {max_best_of}. Given: {best_of}")

    def _adapter(self, params: GenerateParameters, header_token: str | None) -> AdapterSpec:
        source = params.adapter_source or self.default_adapter_source
        token = params.api_token or header_token
        merged = params.merged_adapters
        if merged is None:
            return AdapterSpec(ids=(params.adapter_id or BASE_MODEL_ID,), source=source, api_token=token)
        if params.adapter_id:
            raise ValidationError("at most one of `adapter_id` or `adapters` may be provided")
        if not merged.ids:
            raise ValidationError("at least one adapter ID must be provided when setting `adapters`")
        if len(merged.ids) != len(merged.weights):
            raise ValidationError("number of adapter IDs must match number of adapter weights")
        _check_density(merged)
        return AdapterSpec(
            ids=tuple(merged.ids),
            weights=tuple(merged.weights),
            merge_strategy=merged.merge_strategy,
            density=merged.density,
            majority_sign_method=merged.majority_sign_method,
            source=source,
            api_token=token,
        )


def _check_density(merged: MergedAdapters) -> None:
    """A density outside (0, 1] would prune every weight for TIES/DARE: refuse it instead of serving noise."""
    if not 0.0 <= merged.density <= 1.0:
        raise ValidationError(f"`density` must be >= 0.0 and <= 1.0. Given: {merged.density}")
    if merged.merge_strategy != "linear" and merged.density == 0.0:
        raise ValidationError(
            f"`density` must be > 0.0 when `merge_strategy` is `{merged.merge_strategy}`. Given: {merged.density}"
        )


def _schema(params: GenerateParameters) -> str | None:
    """The JSON schema for constrained decoding; `{"type": "text"}` means no constraint. A schema the shards could
    not compile is refused here (422), before it can fail the batch it would join."""
    response_format = params.response_format
    if response_format is None or response_format.type == "text":
        return None
    schema = response_format.json_schema_
    text = json.dumps(ARBITRARY_JSON_SCHEMA if schema is None else schema)
    try:
        json_schema_grammar(text)
    except ValueError as error:
        raise ValidationError(f"`response_format` has an {error}") from error
    return text
