"""FastAPI routes (spec 3.2-3.5, 3.8, 3.9): generate, streaming, the lorax-client compat route, health, info, metrics.

Every error body has the reference shape `{"error": ..., "error_type": ...}`, including a missing JSON content type
(415), malformed bodies (400), bodies of the wrong shape (422) and unexpected failures (500). Streams always answer
200 and report errors as an SSE event of that shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel

from router import responses
from router.errors import InferError, UnhealthyError, ValidationError
from router.infer import Infer, stream
from router.metrics import Metrics
from router.queue import EndEvent, ErrorEvent, TokenEvent
from router.schemas import CompatGenerateRequest, GenerateRequest, Info

T = TypeVar("T")

logger = logging.getLogger(__name__)

KEEPALIVE_S = 15.0
CLIENT_CLOSED_REQUEST = 499


@dataclass(frozen=True)
class AppConfig:
    info: Info
    default_adapter_source: str = "hub"
    cors_allow_origins: tuple[str, ...] = ()


def _json(model: BaseModel | list[BaseModel], headers: dict[str, str] | None = None) -> Response:
    if isinstance(model, list):
        body = b"[" + b",".join(m.model_dump_json().encode() for m in model) + b"]"
    else:
        body = model.model_dump_json().encode()
    return Response(body, media_type="application/json", headers=headers)


def _sse(model: BaseModel | dict[str, str]) -> bytes:
    payload = model.model_dump_json() if isinstance(model, BaseModel) else json.dumps(model, separators=(",", ":"))
    return f"data:{payload}\n\n".encode()


def _bearer_token(request: Request) -> str | None:
    """`Authorization: Bearer <token>` stands in for a missing `api_token` parameter."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


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


def create_app(
    infer: Infer, health_check: Callable[[], Awaitable[None]], config: AppConfig, metrics: Metrics
) -> FastAPI:
    app = FastAPI(title="LoRAX", version="0.5.0")
    model_id = config.info.model_id
    source = config.default_adapter_source
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(config.cors_allow_origins) or ["*"],
        allow_methods=["GET", "POST"],
        allow_headers=["content-type"],
    )

    @app.exception_handler(InferError)
    async def infer_error(_: Request, error: InferError) -> Response:
        return JSONResponse(error.body(), status_code=error.status_code)

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

    async def generate(body: GenerateRequest, request: Request, as_list: bool) -> Response:
        started_at = time.monotonic()
        metrics.inc("request_count")
        try:
            infer.limit.acquire()
            try:
                valid = await infer.validate(body.inputs, body.parameters, _bearer_token(request))
                validated_at = time.monotonic()
                results = await _unless_disconnected(request, infer.generate(valid))
            finally:
                infer.limit.release()
        except InferError as error:
            metrics.failure(error.error_type)
            raise
        if results is None:
            metrics.inc("request_failure", err="dropped")
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        metrics.inc("request_success")
        response = responses.generate_response(valid, results)
        headers = responses.generate_headers(
            model_id, body.parameters, source, valid, results, started_at, validated_at
        )
        return _json([response] if as_list else response, headers=headers)

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
            valid = await infer.validate(body.inputs, params, _bearer_token(request))
            async with contextlib.aclosing(stream(infer.submit(valid), KEEPALIVE_S)) as events:
                async for event in events:
                    if event is None:
                        yield b":\n\n"
                    elif isinstance(event, TokenEvent):
                        yield _sse(responses.stream_token(event.token))
                    elif isinstance(event, EndEvent):
                        metrics.inc("request_success")
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

    @app.post("/generate")
    async def generate_route(body: GenerateRequest, request: Request) -> Response:
        return await generate(body, request, as_list=False)

    @app.post("/generate_stream")
    async def generate_stream_route(body: GenerateRequest, request: Request) -> Response:
        return generate_stream(body, request)

    @app.post("/")
    @app.post("/invocations")
    async def compat_generate(body: CompatGenerateRequest, request: Request) -> Response:
        """lorax-client posts here: a JSON list of one response, or SSE with `stream: true`."""
        if body.stream:
            return generate_stream(body, request)
        return await generate(body, request, as_list=True)

    @app.get("/health")
    @app.get("/ping")
    @app.get("/")
    async def health() -> Response:
        try:
            await health_check()
        except Exception as error:
            raise UnhealthyError() from error
        return Response(status_code=200)

    @app.get("/info")
    async def info() -> Response:
        return _json(config.info)

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        """Prometheus text, or the reference's JSON shape when the client accepts JSON."""
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse(metrics.render_json())
        return PlainTextResponse(metrics.render_text())

    return app
