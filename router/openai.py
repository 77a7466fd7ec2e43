"""OpenAI-compatible requests mapped onto the native pipeline, and its results mapped back (spec 3.6).

Decisions beyond the reference (LORAX_SPEC header): real `cmpl-`/`chatcmpl-` ids, `created` timestamps and `model`
values; `stop_sequence` finishes as "stop"; logprobs are returned when asked for. Sampling follows OpenAI: it is on
unless `temperature` is 0. `n` choices come from `max(n, best_of)` sequences, best (highest mean logprob) first.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from router.infer import GenerationResult
from router.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessage,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    DeltaToolCall,
    OpenAIFinishReason,
    OpenAIResponseFormat,
    SamplingRequest,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from router.queue import EndEvent
from router.schemas import GenerateParameters, PrefillToken, ResponseFormat, Token
from router.tools import ToolPlan, parse_tool_call
from router.validation import ValidRequest

FINISH_REASONS: dict[str, OpenAIFinishReason] = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


def adapter_id(model: str, base_model: str) -> str | None:
    """`model` names the base model ("" or its id) or else an adapter."""
    return None if model in ("", base_model) else model


def _response_format(response_format: OpenAIResponseFormat | None) -> ResponseFormat | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_schema":
        schema = response_format.json_schema.schema_ if response_format.json_schema else None
    else:
        schema = response_format.schema_
    return ResponseFormat.model_validate({"type": response_format.type, "schema": schema})


def _parameters(body: SamplingRequest, base_model: str, sequences: int, **extra: Any) -> GenerateParameters:
    greedy = body.temperature == 0
    return GenerateParameters(
        adapter_id=adapter_id(body.model, base_model),
        adapter_source=body.adapter_source,
        api_token=body.api_token,
        best_of=sequences if sequences > 1 else None,
        temperature=body.temperature,
        do_sample=not greedy,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        stop=body.stop_sequences,
        seed=body.seed,
        ignore_eos_token=body.ignore_eos_token,
        details=True,
        **extra,
    )


def completion_parameters(body: CompletionRequest, base_model: str) -> GenerateParameters:
    """`logprobs` asks for that many alternatives per token; with `echo`, the prompt's logprobs too (not streamed)."""
    return _parameters(
        body,
        base_model,
        sequences=max(body.n, body.best_of or 1),
        max_new_tokens=body.max_tokens,
        return_k_alternatives=body.logprobs or None,
        decoder_input_details=body.echo and body.logprobs is not None and not body.stream,
        response_format=_response_format(body.response_format),
    )


def chat_parameters(body: ChatCompletionRequest, base_model: str, tools: ToolPlan | None) -> GenerateParameters:
    """A tool plan's grammar takes the place of `response_format` (the two are mutually exclusive)."""
    if tools is not None:
        response_format = ResponseFormat.model_validate({"type": "json_schema", "schema": tools.schema})
    else:
        response_format = _response_format(body.response_format)
    return _parameters(
        body,
        base_model,
        sequences=body.n,
        max_new_tokens=body.max_tokens if body.max_tokens is not None else body.max_completion_tokens,
        return_k_alternatives=(body.top_logprobs or None) if body.logprobs else None,
        response_format=response_format,
    )


def _content(message: ChatMessage) -> str:
    """A message's content as one string; image parts become markdown images."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text if part.type == "text" else f"![]({part.image_url.url})" for part in message.content)


def template_messages(messages: list[ChatMessage], suffix: str = "") -> list[dict[str, Any]]:
    """Messages as the chat template reads them; `suffix` (the tool instructions) ends the last one."""
    rendered = []
    for message in messages:
        item = message.model_dump(exclude_none=True)
        item["content"] = _content(message)
        rendered.append(item)
    rendered[-1]["content"] += suffix
    return rendered


def usage(request: ValidRequest, generated_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=request.input_length,
        completion_tokens=generated_tokens,
        total_tokens=request.input_length + generated_tokens,
    )


def _visible(token: Token) -> str:
    return "" if token.special else token.text


def _completion_logprobs(prefill: list[PrefillToken], tokens: list[Token], top: bool) -> CompletionLogprobs:
    """OpenAI's legacy shape: parallel lists over the (echoed prompt and) generated tokens."""
    texts, logprobs, tops, offsets, offset = [], [], [], [], 0
    for token in prefill:
        texts.append(token.text)
        logprobs.append(token.logprob)
        tops.append(None)
        offsets.append(offset)
        offset += len(token.text)
    for token in tokens:
        texts.append(token.text)
        logprobs.append(token.logprob)
        tops.append({alt.text: alt.logprob for alt in token.alternative_tokens or [] if alt.logprob is not None})
        offsets.append(offset)
        offset += len(_visible(token))
    return CompletionLogprobs(
        tokens=texts, token_logprobs=logprobs, top_logprobs=tops if top else None, text_offset=offsets
    )


def _chat_logprobs(tokens: list[Token]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=token.text,
                logprob=token.logprob,
                bytes=list(token.text.encode()),
                top_logprobs=[
                    TopLogprob(token=alt.text, logprob=alt.logprob, bytes=list(alt.text.encode()))
                    for alt in token.alternative_tokens or []
                ],
            )
            for token in tokens
            if not token.special
        ]
    )


@dataclass(frozen=True)
class Envelope:
    """What every answer of one request shares: its id, creation time, model name and fingerprint."""

    id: str
    model: str
    system_fingerprint: str
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def new(cls, prefix: str, model: str, version: str) -> Envelope:
        return cls(id=f"{prefix}-{uuid.uuid4().hex}", model=model, system_fingerprint=f"{version}-native")

    def fields(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.model, "system_fingerprint": self.system_fingerprint}


def completion(
    envelope: Envelope, body: CompletionRequest, request: ValidRequest, results: list[GenerationResult]
) -> Completion:
    """The `n` best of `results` (best first) as choices; usage counts every generated sequence."""
    prefix = request.inputs if body.echo else ""
    choices = [
        CompletionChoice(
            index=index,
            text=prefix + result.end.generated_text,
            logprobs=None
            if body.logprobs is None
            else _completion_logprobs(result.prefill if body.echo else [], result.tokens, body.logprobs > 0),
            finish_reason=FINISH_REASONS[result.end.finish_reason],
        )
        for index, result in enumerate(results[: body.n])
    ]
    generated = sum(result.end.generated_tokens for result in results)
    return Completion(**envelope.fields(), choices=choices, usage=usage(request, generated))


def _chat_choice(index: int, result: GenerationResult, tools: ToolPlan | None, logprobs: bool) -> ChatChoice:
    finish_reason = FINISH_REASONS[result.end.finish_reason]
    text = result.end.generated_text
    message = AssistantMessage(content=text)
    if tools is not None:
        content, call = parse_tool_call(text)
        message = AssistantMessage(content=content, tool_calls=None if call is None else [call])
        if call is not None:
            finish_reason = "tool_calls"
    return ChatChoice(
        index=index,
        message=message,
        logprobs=_chat_logprobs(result.tokens) if logprobs else None,
        finish_reason=finish_reason,
    )


def chat_completion(
    envelope: Envelope,
    body: ChatCompletionRequest,
    request: ValidRequest,
    results: list[GenerationResult],
    tools: ToolPlan | None,
) -> ChatCompletion:
    choices = [_chat_choice(index, result, tools, body.logprobs) for index, result in enumerate(results[: body.n])]
    generated = sum(result.end.generated_tokens for result in results)
    return ChatCompletion(**envelope.fields(), choices=choices, usage=usage(request, generated))


def chunks_of(completion: ChatCompletion) -> list[ChatCompletionChunk]:
    """A finished answer as stream chunks (tool calls are only known once the whole output parsed)."""
    chunks = []
    envelope = completion.model_dump(include={"id", "created", "model", "system_fingerprint"})
    for choice in completion.choices:
        message = choice.message
        calls = [DeltaToolCall(index=i, **call.model_dump()) for i, call in enumerate(message.tool_calls or [])]
        delta = ChatDelta(role="assistant", content=message.content, tool_calls=calls or None)
        chunks.append(ChatCompletionChunk(**envelope, choices=[ChatChunkChoice(index=choice.index, delta=delta)]))
    for choice in completion.choices:
        final = ChatChunkChoice(index=choice.index, delta=ChatDelta(), finish_reason=choice.finish_reason)
        chunks.append(ChatCompletionChunk(**envelope, choices=[final]))
    chunks[-1].usage = completion.usage
    return chunks


class StreamText:
    """Per-choice text sent so far, so that the chunks of a choice always add up to its final text."""

    def __init__(self) -> None:
        self._sent: dict[int, str] = {}

    def token(self, index: int, token: Token) -> str:
        text = _visible(token)
        self._sent[index] = self._sent.get(index, "") + text
        return text

    def end(self, index: int, end: EndEvent) -> str:
        sent = self._sent.get(index, "")
        if end.generated_text.startswith(sent):
            return end.generated_text[len(sent):]
        return _visible(end.token)


class CompletionStream:
    """Stream chunks of `/v1/completions`: with `echo`, the prompt comes first as its own chunk."""

    def __init__(self, envelope: Envelope, body: CompletionRequest) -> None:
        self._envelope = envelope
        self._body = body
        self._text = StreamText()

    def _chunk(self, choice: CompletionChoice, usage: Usage | None = None) -> Completion:
        return Completion(**self._envelope.fields(), choices=[choice], usage=usage)

    def _logprobs(self, token: Token) -> CompletionLogprobs | None:
        if self._body.logprobs is None:
            return None
        return _completion_logprobs([], [token], self._body.logprobs > 0)

    def start(self, request: ValidRequest) -> list[Completion]:
        if not self._body.echo:
            return []
        return [self._chunk(CompletionChoice(index=i, text=request.inputs)) for i in range(self._body.n)]

    def token(self, index: int, token: Token) -> Completion:
        text = self._text.token(index, token)
        return self._chunk(CompletionChoice(index=index, text=text, logprobs=self._logprobs(token)))

    def end(self, index: int, end: EndEvent, total: Usage | None) -> Completion:
        choice = CompletionChoice(
            index=index,
            text=self._text.end(index, end),
            logprobs=self._logprobs(end.token),
            finish_reason=FINISH_REASONS[end.finish_reason],
        )
        return self._chunk(choice, total)


class ChatStream:
    """Stream chunks of `/v1/chat/completions`: the first chunk of a choice names the assistant role."""

    def __init__(self, envelope: Envelope, body: ChatCompletionRequest) -> None:
        self._envelope = envelope
        self._body = body
        self._text = StreamText()
        self._started: set[int] = set()

    def _chunk(self, choice: ChatChunkChoice, usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self._envelope.fields(), choices=[choice], usage=usage)

    def _role(self, index: int) -> str | None:
        if index in self._started:
            return None
        self._started.add(index)
        return "assistant"

    def _logprobs(self, token: Token) -> ChoiceLogprobs | None:
        return _chat_logprobs([token]) if self._body.logprobs else None

    def start(self, request: ValidRequest) -> list[ChatCompletionChunk]:
        return []

    def token(self, index: int, token: Token) -> ChatCompletionChunk:
        delta = ChatDelta(role=self._role(index), content=self._text.token(index, token))
        return self._chunk(ChatChunkChoice(index=index, delta=delta, logprobs=self._logprobs(token)))

    def end(self, index: int, end: EndEvent, total: Usage | None) -> ChatCompletionChunk:
        text = self._text.end(index, end)
        delta = ChatDelta(role=self._role(index), content=text or None)
        choice = ChatChunkChoice(
            index=index, delta=delta, logprobs=self._logprobs(end.token), finish_reason=FINISH_REASONS[end.finish_reason]
        )
        return self._chunk(choice, total)
