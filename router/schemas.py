"""HTTP request/response models, wire-compatible with the reference router (spec 3.3-3.5, 3.8).

Requests are lenient the way real clients need: an explicit JSON `null` means "use the default" (lorax-client sends
every key) and unknown keys are ignored. Responses keep the reference's quirks: some keys are always present (and
may be null), others are omitted when unused.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

U32 = 2**32
U64 = 2**64


class LenientModel(BaseModel):
    """Base for request bodies: nulls fall back to defaults, unknown keys are ignored."""

    # NaN/Infinity (which Python's JSON parser accepts) would slip past every bounds check.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class MergedAdapters(LenientModel):
    ids: list[str] = Field(default_factory=list)
    weights: list[float] = Field(default_factory=list)
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] = "linear"
    density: float = 0.0
    majority_sign_method: Literal["total", "frequency"] = "total"


class ResponseFormat(LenientModel):
    type: Literal["text", "json_object", "json_schema"] = "json_object"
    # `schema` shadows a BaseModel attribute, hence the alias.
    json_schema_: Any = Field(default=None, alias="schema")


class GenerateParameters(LenientModel):
    adapter_id: str | None = None
    adapter_source: str | None = None
    merged_adapters: MergedAdapters | None = None
    api_token: str | None = None
    best_of: int | None = Field(default=None, ge=0)
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    top_k: int | None = Field(default=None, lt=U32)
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = Field(default=None, ge=0, lt=U32)
    ignore_eos_token: bool = False
    return_full_text: bool = False
    stop: list[str] = Field(default_factory=list)
    truncate: int | None = Field(default=None, ge=0)
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: int | None = Field(default=None, lt=U32)
    seed: int | None = Field(default=None, ge=0, lt=U64)
    response_format: ResponseFormat | None = None


class GenerateRequest(LenientModel):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class CompatGenerateRequest(GenerateRequest):
    stream: bool = False


class OmitWhenNone(BaseModel):
    """Response base: keys listed in `_omit_when_none` are left out instead of being serialized as null."""

    _omit_when_none: ClassVar[frozenset[str]] = frozenset()

    # No return annotation: with one, pydantic would document every response as a bare object.
    @model_serializer(mode="wrap")
    def _omit(self, handler: Any):
        data = handler(self)
        for key in self._omit_when_none:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class AlternativeToken(BaseModel):
    id: int
    text: str
    logprob: float | None


class Token(OmitWhenNone):
    _omit_when_none = frozenset({"alternative_tokens"})

    id: int
    text: str
    logprob: float | None
    special: bool
    alternative_tokens: list[AlternativeToken] | None = None
    skipped: bool = False


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]


class Details(OmitWhenNone):
    _omit_when_none = frozenset({"best_of_sequences"})

    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    skipped_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(OmitWhenNone):
    _omit_when_none = frozenset({"details"})

    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int | None


class StreamResponse(BaseModel):
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


class ErrorResponse(BaseModel):
    error: str
    error_type: str


class AdapterTier(BaseModel):
    """Adapters in one tier of the shards and the bytes they hold (`device_pool`: the slot pools, used or free)."""

    adapters: int
    bytes: int


class Info(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_implementation: str | None = None  # "native" or "transformers": which path the shards serve the model on
    model_pipeline_tag: str | None = None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_length: int
    max_total_tokens: int
    waiting_served_ratio: float
    max_batch_total_tokens: int
    max_waiting_tokens: int
    validation_workers: int
    eager_prefill: bool = False
    version: str = "0.1.0"
    sha: str | None = None
    docker_label: str | None = None
    request_logger_url: str | None = None
    adapter_tiers: dict[str, AdapterTier] | None = None


class TokenizeRequest(LenientModel):
    inputs: str
    add_special_tokens: bool = True


class SimpleToken(BaseModel):
    """One token of `/tokenize`: its id, its vocabulary string and its character offsets in the input."""

    id: int
    text: str
    start: int
    stop: int
