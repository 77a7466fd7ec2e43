"""Request and response models of the OpenAI-compatible routes (spec 3.6), shaped as the `openai` client parses them.

Requests are lenient like the native ones (nulls mean defaults, unknown keys such as `user` or `logit_bias` are
ignored); the LoRAX extras (`top_k`, `repetition_penalty`, `adapter_source`, ...) sit beside OpenAI's parameters.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from router.schemas import U32, U64, LenientModel, OmitWhenNone

OpenAIFinishReason = Literal["stop", "length", "tool_calls"]


class SamplingRequest(LenientModel):
    """What both routes share: the model (base model id, "" or an adapter id) and the sampling parameters."""

    model: str = Field(description="The served base model id (or \"\") for the base model, else an adapter id.")
    max_tokens: int | None = Field(default=None, ge=0, lt=U32)
    temperature: float | None = Field(default=None, description="0 means greedy; otherwise sampling (default 1).")
    top_p: float | None = None
    n: int = Field(default=1, ge=1, description="Number of choices; more than one needs sampling.")
    stream: bool = False
    stop: str | list[str] = Field(default_factory=list)
    seed: int | None = Field(default=None, ge=0, lt=U64)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    top_k: int | None = Field(default=None, lt=U32)
    ignore_eos_token: bool = False
    adapter_source: str | None = None
    api_token: str | None = None

    @property
    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else self.stop


class JsonSchemaFormat(LenientModel):
    name: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias.
    schema_: Any = Field(default=None, alias="schema")
    strict: bool | None = None


class OpenAIResponseFormat(LenientModel):
    """OpenAI's `response_format`; `json_object` may carry a (non-standard) `schema` as in LoRAX."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: Any = Field(default=None, alias="schema")


class CompletionRequest(SamplingRequest):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model": "", "prompt": "What is deep learning?", "max_tokens": 16}]}
    )

    prompt: str
    best_of: int | None = Field(default=None, ge=1, description="Sequences generated; the `n` best are returned.")
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20, description="Top alternatives per token to return.")
    suffix: str | None = Field(default=None, description="Accepted and ignored.")
    response_format: OpenAIResponseFormat | None = None


class TextPart(LenientModel):
    type: Literal["text"]
    text: str


class ImageUrl(LenientModel):
    url: str


class ImagePart(LenientModel):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(LenientModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # any other role is a 422, never rendered
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(LenientModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class Tool(LenientModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(LenientModel):
    name: str


class NamedToolChoice(LenientModel):
    """OpenAI's `{"type": "function", "function": {"name": ...}}`."""

    type: Literal["function"] = "function"
    function: FunctionName


class LoraxToolChoice(LenientModel):
    """LoRAX's `{"Function": {"name": ...}}`."""

    Function: FunctionName


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice | LoraxToolChoice | str


class ChatCompletionRequest(SamplingRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}]
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0, lt=U32, description="Same as `max_tokens`.")
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: OpenAIResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    tool_prompt: str | None = Field(default=None, description="Instruction appended to the prompt when tools are on.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: OpenAIFinishReason | None = None


class Completion(BaseModel):
    """A `/v1/completions` answer, and (with `finish_reason` null until the end) each of its stream chunks."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ToolCallFunction(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(OmitWhenNone):
    _omit_when_none: ClassVar[frozenset[str]] = frozenset({"tool_calls"})

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: OpenAIFinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaToolCall(ToolCall):
    index: int


class ChatDelta(OmitWhenNone):
    """The new part of a choice: unset keys are left out (`{}` on a final chunk that adds nothing)."""

    _omit_when_none: ClassVar[frozenset[str]] = frozenset({"role", "content", "tool_calls"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: OpenAIFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One stream event; the last chunk of the last choice to finish also carries `usage`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
