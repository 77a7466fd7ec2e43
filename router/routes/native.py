"""LoRAX's own generation routes (spec 3.2-3.4): `/generate`, `/generate_stream`, and `/` and `/invocations` for
lorax-client. Streams always answer 200 and report errors as an SSE event of the error shape."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from router import openapi_doc, responses
from router.errors import InferError, ValidationError
from router.infer import stream
from router.queue import EndEvent, ErrorEvent, TokenEvent
from router.routes.generation import CLIENT_CLOSED_REQUEST, KEEPALIVE_S, complete, json_response, recorded
from router.schemas import CompatGenerateRequest, GenerateRequest, GenerateResponse, StreamResponse
from router.state import RouterState, State

router = APIRouter()


def _sse(model: BaseModel | dict[str, str]) -> bytes:
    payload = model.model_dump_json() if isinstance(model, BaseModel) else json.dumps(model, separators=(",", ":"))
    return f"data:{payload}\n\n".encode()


async def _generate(state: RouterState, body: GenerateRequest, request: Request, as_list: bool) -> Response:
    with recorded(state.metrics):
        outcome = await complete(state, body.inputs, body.parameters, request)
    if outcome is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    state.metrics.inc("request_success")
    response = responses.generate_response(outcome.request, outcome.results)
    return json_response([response] if as_list else response, headers=outcome.headers)


async def _stream_events(state: RouterState, body: GenerateRequest, request: Request) -> AsyncIterator[bytes]:
    infer, metrics = state.infer, state.metrics
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
        valid = await infer.validate(body.inputs, params, state.hub_token(request))
        async with contextlib.aclosing(stream(infer.submit(valid), KEEPALIVE_S)) as events:
            async for event in events:
                if event is None:
                    yield b":\n\n"
                elif isinstance(event, TokenEvent):
                    yield _sse(responses.stream_token(event.token))
                elif isinstance(event, EndEvent):
                    metrics.inc("request_success")
                    state.served(valid.adapter)
                    yield _sse(responses.stream_end(valid, event))
                elif isinstance(event, ErrorEvent):
                    raise event.error
    except InferError as error:
        metrics.failure(error.error_type)
        yield _sse(error.body())
    finally:
        infer.limit.release()


def _generate_stream(state: RouterState, body: GenerateRequest, request: Request) -> Response:
    source = state.config.default_adapter_source
    headers = responses.stream_headers(state.model_id, body.inputs, body.parameters, source)
    return StreamingResponse(_stream_events(state, body, request), media_type="text/event-stream", headers=headers)


@router.post("/generate", responses=openapi_doc.generation(GenerateResponse))
async def generate_route(body: GenerateRequest, request: Request, state: State) -> Response:
    return await _generate(state, body, request, as_list=False)


@router.post("/generate_stream", responses=openapi_doc.generation(None, StreamResponse, "Server-sent events"))
async def generate_stream_route(body: GenerateRequest, request: Request, state: State) -> Response:
    return _generate_stream(state, body, request)


_COMPAT_RESPONSES = openapi_doc.generation(list[GenerateResponse], StreamResponse, "A list of one response, or events")


@router.post("/", responses=_COMPAT_RESPONSES)
@router.post("/invocations", responses=_COMPAT_RESPONSES)
async def compat_generate(body: CompatGenerateRequest, request: Request, state: State) -> Response:
    """lorax-client posts here: a JSON list of one response, or SSE with `stream: true`."""
    if body.stream:
        return _generate_stream(state, body, request)
    return await _generate(state, body, request, as_list=True)
