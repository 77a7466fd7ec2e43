"""FastAPI routes (spec 3.2-3.11): native and OpenAI-compatible generation, tokenize, models, health, info, metrics.

Every error body has the reference shape `{"error": ..., "error_type": ...}`, including a missing JSON content type
(415), malformed bodies (400), bodies of the wrong shape (422) and unexpected failures (500). Native streams always
answer 200 and report errors as an SSE event of that shape; OpenAI streams are validated first, so their 422/429 are
real statuses (as the `openai` client expects), and only failures during generation become SSE events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from router import openai, openapi_doc, responses
from router.auth import bearer_token, require_api_key
from router.chat_template import TemplateError
from router.errors import InferError, UnhealthyError, ValidationError
from router.infer import GenerationResult, Infer, stream
from router.metrics import Metrics
from router.model_tokenizer import ModelTokenizer
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
from router.schemas import (
    AdapterTier,
    CompatGenerateRequest,
    ErrorResponse,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    Info,
    SimpleToken,
    StreamResponse,
    Token,
    TokenizeRequest,
)
from router.tools import plan_tools
from router.validation import AdapterSpec, ValidRequest

T = TypeVar("T")

logger = logging.getLogger(__name__)

KEEPALIVE_S = 15.0
CLIENT_CLOSED_REQUEST = 499
NO_TOKENIZER = {"error": "No fast tokenizer or tokenizer.json for this model", "error_type": "no fast tokenizer"}


@dataclass(frozen=True)
class AppConfig:
    info: Info
    default_adapter_source: str = "hub"
    cors_allow_origins: tuple[str, ...] = ()
    tokenizer: ModelTokenizer | None = None  # for /tokenize and chat templates
    adapter_tiers: Callable[[], dict[str, tuple[int, int]]] | None = None  # live tier report for /info
    api_keys: tuple[str, ...] = ()  # LORAX_API_KEY: when set, generating routes need one of them (router/auth.py)


@dataclass(frozen=True)
class Outcome:
    """A finished non-streamed generation: results best first, and the `x-*` headers describing it."""

    request: ValidRequest
    results: list[GenerationResult]
    headers: dict[str, str]


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


def _json(model: BaseModel | list[BaseModel], headers: dict[str, str] | None = None) -> Response:
    if isinstance(model, list):
        body = b"[" + b",".join(m.model_dump_json().encode() for m in model) + b"]"
    else:
        body = model.model_dump_json().encode()
    return Response(body, media_type="application/json", headers=headers)


def _sse(model: BaseModel | dict[str, str]) -> bytes:
    payload = model.model_dump_json() if isinstance(model, BaseModel) else json.dumps(model, separators=(",", ":"))
    return f"data:{payload}\n\n".encode()


def _openai_sse(model: BaseModel | dict[str, str]) -> bytes:
    """OpenAI's own framing: `data: ` with a space."""
    payload = model.model_dump_json() if isinstance(model, BaseModel) else json.dumps(model)
    return f"data: {payload}\n\n".encode()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`; cancel it (so its queue entries are dropped) and return None if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # the client left, or this handler is being cancelled
            task.cancel()
    # A task cancelled just now is not done yet: done means it finished before the client left.
    return task.result() if task.done() else None


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


def create_app(
    infer: Infer, health_check: Callable[[], Awaitable[None]], config: AppConfig, metrics: Metrics
) -> FastAPI:
    app = FastAPI(title="LoRAX", version="0.5.0", description="Multi-LoRA inference server")
    model_id = config.info.model_id
    source = config.default_adapter_source
    started = int(time.time())
    adapters_seen: dict[str, int] = {}  # adapter id -> when it first answered a request
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(config.cors_allow_origins) or ["*"],
        allow_methods=["GET", "POST"],
        allow_headers=["content-type"],
    )
    openapi_doc.install(app, [StreamResponse, ChatCompletionChunk])
    guarded = [Depends(require_api_key(config.api_keys))]  # on every route that generates, tokenizes or lists adapters

    def hub_token(request: Request) -> str | None:
        """`Authorization: Bearer <token>` stands in for a missing `api_token`, unless the bearer is our API key."""
        return None if config.api_keys else bearer_token(request)

    @app.exception_handler(InferError)
    async def infer_error(_: Request, error: InferError) -> Response:
        return JSONResponse(error.body(), status_code=error.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> Response:
        """Unknown paths (404) and methods (405) answer in the same shape as every other error."""
        error_type = HTTPStatus(error.status_code).phrase.lower().replace(" ", "_")
        body = {"error": str(error.detail), "error_type": error_type}
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, error: Exception) -> Response:
        logger.exception("unexpected error", exc_info=error)
        return JSONResponse({"error": "Internal server error", "error_type": "internal"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def body_error(request: Request, error: RequestValidationError) -> Response:
        if "json" not in request.headers.get("content-type", ""):
            message = "Expected request with `Content-Type: application/json`"
            return JSONResponse({"error": message, "error_type": "unsupported_media_type"}, status_code=415)
        problems = error.errors()
        if any(problem.get("type") == "json_invalid" for problem in problems):
            message = "Failed to parse the request body as JSON"
            return JSONResponse({"error": message, "error_type": "bad_request"}, status_code=400)
        details = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc'][1:]) or 'body'}: {problem['msg']}" for problem in problems
        )
        message = f"Failed to deserialize the JSON body into the target type: {details}"
        return JSONResponse({"error": message, "error_type": "validation"}, status_code=422)

    @contextlib.contextmanager
    def recorded() -> Iterator[None]:
        """Count a request, and its failure by error type."""
        metrics.inc("request_count")
        try:
            yield
        except InferError as error:
            metrics.failure(error.error_type)
            raise

    def served(adapter: AdapterSpec) -> None:
        """Remember a single adapter that answered, for /v1/models."""
        if len(adapter.ids) == 1 and not adapter.is_base:
            adapters_seen.setdefault(adapter.ids[0], int(time.time()))

    async def complete(inputs: str, params: GenerateParameters, request: Request) -> Outcome | None:
        """Validate and generate under one permit; None if the client left first (the request is dropped)."""
        started_at = time.monotonic()
        infer.limit.acquire()
        try:
            valid = await infer.validate(inputs, params, hub_token(request))
            validated_at = time.monotonic()
            results = await _unless_disconnected(request, infer.generate(valid))
        finally:
            infer.limit.release()
        if results is None:
            metrics.inc("request_failure", err="dropped")
            return None
        served(valid.adapter)
        headers = responses.generate_headers(model_id, params, source, valid, results, started_at, validated_at)
        return Outcome(valid, results, headers)

    async def generate(body: GenerateRequest, request: Request, as_list: bool) -> Response:
        with recorded():
            outcome = await complete(body.inputs, body.parameters, request)
        if outcome is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        metrics.inc("request_success")
        response = responses.generate_response(outcome.request, outcome.results)
        return _json([response] if as_list else response, headers=outcome.headers)

    async def stream_events(body: GenerateRequest, request: Request) -> AsyncIterator[bytes]:
        metrics.inc("request_count")
        try:
            infer.limit.acquire()
        except InferError as error:
            metrics.failure(error.error_type)
            yield _sse(error.body())
            return
        try:
            params = body.parameters
            if (1 if params.best_of is None else params.best_of) != 1:
                raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
            if params.decoder_input_details:
                raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")
            valid = await infer.validate(body.inputs, params, hub_token(request))
            async with contextlib.aclosing(stream(infer.submit(valid), KEEPALIVE_S)) as events:
                async for event in events:
                    if event is None:
                        yield b":\n\n"
                    elif isinstance(event, TokenEvent):
                        yield _sse(responses.stream_token(event.token))
                    elif isinstance(event, EndEvent):
                        metrics.inc("request_success")
                        served(valid.adapter)
                        yield _sse(responses.stream_end(valid, event))
                    elif isinstance(event, ErrorEvent):
                        raise event.error
        except InferError as error:
            metrics.failure(error.error_type)
            yield _sse(error.body())
        finally:
            infer.limit.release()

    def generate_stream(body: GenerateRequest, request: Request) -> Response:
        headers = responses.stream_headers(model_id, body.inputs, body.parameters, source)
        return StreamingResponse(stream_events(body, request), media_type="text/event-stream", headers=headers)

    async def openai_events(valid: ValidRequest, n: int, renderer: ChunkRenderer) -> AsyncIterator[bytes]:
        """`n` sequences (each with its own seed when n > 1) streamed as choices, then `[DONE]`."""
        copies = [valid] if n == 1 else [valid.with_seed(random.getrandbits(64)) for _ in range(n)]
        try:
            for chunk in renderer.start(valid):
                yield _openai_sse(chunk)
            generated, remaining = 0, n
            async with contextlib.aclosing(_merged([infer.submit(c) for c in copies], KEEPALIVE_S)) as events:
                async for item in events:
                    if item is None:
                        yield b":\n\n"
                        continue
                    index, event = item
                    if isinstance(event, TokenEvent):
                        yield _openai_sse(renderer.token(index, event.token))
                    elif isinstance(event, EndEvent):
                        generated += event.generated_tokens
                        remaining -= 1
                        total = openai.usage(valid, generated) if remaining == 0 else None
                        yield _openai_sse(renderer.end(index, event, total))
                    elif isinstance(event, ErrorEvent):
                        raise event.error
            metrics.inc("request_success")
            served(valid.adapter)
            yield b"data: [DONE]\n\n"
        except InferError as error:
            metrics.failure(error.error_type)
            yield _openai_sse(error.body())

    async def openai_stream(
        inputs: str, params: GenerateParameters, n: int, request: Request, renderer: ChunkRenderer
    ) -> Response:
        """Validate and take a permit per choice before answering, so refusals keep their status codes."""
        infer.limit.acquire()
        try:
            valid = await infer.validate(inputs, params, hub_token(request))
            infer.limit.acquire(n - 1)  # `n` is validated (<= max_best_of) by now
        except BaseException:
            infer.limit.release()
            raise
        headers = responses.stream_headers(model_id, inputs, params, source)
        return _PermitStream(openai_events(valid, n, renderer), lambda: infer.limit.release(n), headers)

    async def chat_chunks(answer: ChatCompletion) -> AsyncIterator[bytes]:
        for chunk in openai.chunks_of(answer):
            yield _openai_sse(chunk)
        yield b"data: [DONE]\n\n"

    @app.post("/generate", responses=openapi_doc.generation(GenerateResponse), dependencies=guarded)
    async def generate_route(body: GenerateRequest, request: Request) -> Response:
        return await generate(body, request, as_list=False)

    @app.post("/generate_stream", responses=openapi_doc.generation(None, StreamResponse, "Server-sent events"),
              dependencies=guarded)
    async def generate_stream_route(body: GenerateRequest, request: Request) -> Response:
        return generate_stream(body, request)

    compat_responses = openapi_doc.generation(list[GenerateResponse], StreamResponse, "A list of one response, or events")

    @app.post("/", responses=compat_responses, dependencies=guarded)
    @app.post("/invocations", responses=compat_responses, dependencies=guarded)
    async def compat_generate(body: CompatGenerateRequest, request: Request) -> Response:
        """lorax-client posts here: a JSON list of one response, or SSE with `stream: true`."""
        if body.stream:
            return generate_stream(body, request)
        return await generate(body, request, as_list=True)

    @app.post("/v1/completions", responses=openapi_doc.generation(Completion, Completion, "Completion (or chunks)"),
              dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """OpenAI text completion; `model` is the base model id (or "") or an adapter id."""
        with recorded():
            params = openai.completion_parameters(body, model_id)
            envelope = Envelope.new("cmpl", body.model or model_id, config.info.version)
            if body.stream:
                if (body.best_of or body.n) != body.n:
                    raise ValidationError("`best_of` != `n` is not supported when streaming tokens")
                return await openai_stream(body.prompt, params, body.n, request, CompletionStream(envelope, body))
            outcome = await complete(body.prompt, params, request)
            if outcome is None:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            answer = openai.completion(envelope, body, outcome.request, outcome.results)
        metrics.inc("request_success")
        return _json(answer, headers=outcome.headers)

    @app.post(
        "/v1/chat/completions",
        responses=openapi_doc.generation(ChatCompletion, ChatCompletionChunk, "Chat completion (or chunks)"),
        dependencies=guarded,
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """OpenAI chat: the prompt is the model's chat template over `messages` (and `tools`)."""
        with recorded():
            if config.tokenizer is None:
                raise TemplateError("the router has no tokenizer for this model")
            constrained = body.response_format is not None and body.response_format.type != "text"
            plan = plan_tools(body.tools, body.tool_choice, constrained)
            suffix = "" if plan is None else plan.prompt_suffix(config.tokenizer.template_uses_tools, body.tool_prompt)
            messages = openai.template_messages(body.messages, suffix)
            prompt = config.tokenizer.chat_prompt(messages, None if plan is None else plan.tools)
            params = openai.chat_parameters(body, model_id, plan)
            envelope = Envelope.new("chatcmpl", body.model or model_id, config.info.version)
            if body.stream and plan is None:
                return await openai_stream(prompt, params, body.n, request, ChatStream(envelope, body))
            outcome = await complete(prompt, params, request)
            if outcome is None:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            answer = openai.chat_completion(envelope, body, outcome.request, outcome.results, plan)
        metrics.inc("request_success")
        if body.stream:  # tool calls are streamed once the whole output parsed
            headers = responses.stream_headers(model_id, prompt, params, source)
            return StreamingResponse(chat_chunks(answer), media_type="text/event-stream", headers=headers)
        return _json(answer, headers=outcome.headers)

    @app.get("/v1/models", response_model=ModelList, dependencies=guarded)
    async def models() -> ModelList:
        """The base model, then every adapter that has answered a request."""
        cards = [ModelCard(id=model_id, created=started, owned_by="lorax")]
        cards += [ModelCard(id=adapter, created=at, owned_by="lorax") for adapter, at in adapters_seen.items()]
        return ModelList(data=cards)

    @app.post(
        "/tokenize",
        response_model=list[SimpleToken],
        responses={404: {"model": ErrorResponse, "description": "No fast tokenizer"}, **openapi_doc.BODY_ERRORS},
        dependencies=guarded,
    )
    async def tokenize(body: TokenizeRequest) -> Response:
        """The tokens of `inputs`: id, vocabulary string and character offsets."""
        if config.tokenizer is None:
            return JSONResponse(NO_TOKENIZER, status_code=404)
        return _json(await config.tokenizer.tokenize(body.inputs, body.add_special_tokens))

    @app.get("/health", responses={503: {"model": ErrorResponse, "description": "Unhealthy"}})
    @app.get("/ping", include_in_schema=False)
    @app.get("/", include_in_schema=False)
    async def health() -> Response:
        try:
            await health_check()
        except Exception as error:
            raise UnhealthyError() from error
        return Response(status_code=200)

    @app.get("/info", response_model=Info)
    async def info() -> Response:
        info = config.info
        if config.adapter_tiers is not None:
            tiers = {name: AdapterTier(adapters=n, bytes=b) for name, (n, b) in config.adapter_tiers().items()}
            info = info.model_copy(update={"adapter_tiers": tiers})
        return _json(info)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_route(request: Request) -> Response:
        """Prometheus text, or the reference's JSON shape when the client accepts JSON."""
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse(metrics.render_json())
        return PlainTextResponse(metrics.render_text())

    @app.get("/api-doc/openapi.json", include_in_schema=False)
    async def reference_openapi() -> JSONResponse:
        """The reference's address for the same document as /openapi.json."""
        return JSONResponse(app.openapi())

    return app
