"""OpenAI-compatible routes (spec 3.6): `/v1/completions`, `/v1/chat/completions` and `/v1/models`.

Streams are validated (and take their permits) before answering, so their 422/429 are real statuses, as the `openai`
client expects; only failures during generation become SSE events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from router import openai, openapi_doc, responses
from router.chat_template import TemplateError
from router.errors import InferError, ValidationError
from router.infer import stream
from router.openai import ChatStream, CompletionStream, Envelope
from router.openai_schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
)
from router.queue import EndEvent, Entry, ErrorEvent, Event, TokenEvent
from router.routes.generation import CLIENT_CLOSED_REQUEST, KEEPALIVE_S, complete, json_response, recorded
from router.schemas import GenerateParameters, Token
from router.state import RouterState, State
from router.tools import plan_tools
from router.validation import ValidRequest

router = APIRouter()


class ChunkRenderer(Protocol):
    """Turns one OpenAI stream's events into chunks (see router.openai)."""

    def start(self, request: ValidRequest) -> list[BaseModel]: ...
    def token(self, index: int, token: Token) -> BaseModel: ...
    def end(self, index: int, end: EndEvent, total: Usage | None) -> BaseModel: ...


class _PermitStream(StreamingResponse):
    """A stream that gives its concurrency permits back when the response ends, however (and whether) it ran."""

    def __init__(self, content: AsyncIterator[bytes], release: Callable[[], None], headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _sse(model: BaseModel | dict[str, str]) -> bytes:
    """OpenAI's own framing: `data: ` with a space."""
    payload = model.model_dump_json() if isinstance(model, BaseModel) else json.dumps(model)
    return f"data: {payload}\n\n".encode()


async def _merged(entries: list[Entry], keepalive_s: float) -> AsyncIterator[tuple[int, Event] | None]:
    """The events of several entries as (entry index, event), up to every final one; None after `keepalive_s`
    without any. Leaving early cancels every entry."""
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(index: int, entry: Entry) -> None:
        async with contextlib.aclosing(stream(entry, keepalive_s)) as events:
            async for event in events:
                if event is not None:
                    queue.put_nowait((index, event))

    tasks = [asyncio.ensure_future(pump(index, entry)) for index, entry in enumerate(entries)]
    try:
        remaining = len(entries)
        while remaining:
            try:
                item = await asyncio.wait_for(queue.get(), keepalive_s)
            except TimeoutError:
                yield None
                continue
            if isinstance(item[1], (EndEvent, ErrorEvent)):
                remaining -= 1
            yield item
    finally:
        for task in tasks:
            task.cancel()


async def _events(state: RouterState, valid: ValidRequest, n: int, renderer: ChunkRenderer) -> AsyncIterator[bytes]:
    """`n` sequences (each with its own seed when n > 1) streamed as choices, then `[DONE]`."""
    copies = [valid] if n == 1 else [valid.with_seed(random.getrandbits(64)) for _ in range(n)]
    try:
        for chunk in renderer.start(valid):
            yield _sse(chunk)
        generated, remaining = 0, n
        async with contextlib.aclosing(_merged([state.infer.submit(c) for c in copies], KEEPALIVE_S)) as events:
            async for item in events:
                if item is None:
                    yield b":\n\n"
                    continue
                index, event = item
                if isinstance(event, TokenEvent):
                    yield _sse(renderer.token(index, event.token))
                elif isinstance(event, EndEvent):
                    generated += event.generated_tokens
                    remaining -= 1
                    total = openai.usage(valid, generated) if remaining == 0 else None
                    yield _sse(renderer.end(index, event, total))
                elif isinstance(event, ErrorEvent):
                    raise event.error
        state.metrics.inc("request_success")
        state.served(valid.adapter)
        yield b"data: [DONE]\n\n"
    except InferError as error:
        state.metrics.failure(error.error_type)
        yield _sse(error.body())


async def _stream(
    state: RouterState, inputs: str, params: GenerateParameters, n: int, request: Request, renderer: ChunkRenderer
) -> Response:
    """Validate and take a permit per choice before answering, so refusals keep their status codes."""
    infer = state.infer
    infer.limit.acquire()
    try:
        valid = await infer.validate(inputs, params, state.hub_token(request))
        infer.limit.acquire(n - 1)  # `n` is validated (<= max_best_of) by now
    except BaseException:
        infer.limit.release()
        raise
    headers = responses.stream_headers(state.model_id, inputs, params, state.config.default_adapter_source)
    return _PermitStream(_events(state, valid, n, renderer), lambda: infer.limit.release(n), headers)


async def _chat_chunks(answer: ChatCompletion) -> AsyncIterator[bytes]:
    for chunk in openai.chunks_of(answer):
        yield _sse(chunk)
    yield b"data: [DONE]\n\n"


@router.post("/v1/completions", responses=openapi_doc.generation(Completion, Completion, "Completion (or chunks)"))
async def completions(body: CompletionRequest, request: Request, state: State) -> Response:
    """OpenAI text completion; `model` is the base model id (or "") or an adapter id."""
    with recorded(state.metrics):
        params = openai.completion_parameters(body, state.model_id)
        envelope = Envelope.new("cmpl", body.model or state.model_id, state.config.info.version)
        if body.stream:
            if (body.best_of or body.n) != body.n:
                raise ValidationError("`best_of` != `n` is not supported when streaming tokens")
            return await _stream(state, body.prompt, params, body.n, request, CompletionStream(envelope, body))
        outcome = await complete(state, body.prompt, params, request)
        if outcome is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        answer = openai.completion(envelope, body, outcome.request, outcome.results)
    state.metrics.inc("request_success")
    return json_response(answer, headers=outcome.headers)


@router.post(
    "/v1/chat/completions",
    responses=openapi_doc.generation(ChatCompletion, ChatCompletionChunk, "Chat completion (or chunks)"),
)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State) -> Response:
    """OpenAI chat: the prompt is the model's chat template over `messages` (and `tools`)."""
    tokenizer, model_id = state.config.tokenizer, state.model_id
    with recorded(state.metrics):
        if tokenizer is None:
            raise TemplateError("the router has no tokenizer for this model")
        constrained = body.response_format is not None and body.response_format.type != "text"
        plan = plan_tools(body.tools, body.tool_choice, constrained)
        suffix = "" if plan is None else plan.prompt_suffix(tokenizer.template_uses_tools, body.tool_prompt)
        messages = openai.template_messages(body.messages, suffix)
        prompt = tokenizer.chat_prompt(messages, None if plan is None else plan.tools)
        params = openai.chat_parameters(body, model_id, plan)
        envelope = Envelope.new("chatcmpl", body.model or model_id, state.config.info.version)
        if body.stream and plan is None:
            return await _stream(state, prompt, params, body.n, request, ChatStream(envelope, body))
        outcome = await complete(state, prompt, params, request)
        if outcome is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        answer = openai.chat_completion(envelope, body, outcome.request, outcome.results, plan)
    state.metrics.inc("request_success")
    if body.stream:  # tool calls are streamed once the whole output parsed
        headers = responses.stream_headers(model_id, prompt, params, state.config.default_adapter_source)
        return StreamingResponse(_chat_chunks(answer), media_type="text/event-stream", headers=headers)
    return json_response(answer, headers=outcome.headers)


@router.get("/v1/models", response_model=ModelList)
async def models(state: State) -> ModelList:
    """The base model, then every adapter that has answered a request."""
    cards = [ModelCard(id=state.model_id, created=state.started, owned_by="lorax")]
    cards += [ModelCard(id=adapter, created=at, owned_by="lorax") for adapter, at in state.adapters_seen.items()]
    return ModelList(data=cards)
