"""What the native and OpenAI generating routes share: one validated, generated request under a concurrency permit,
its metrics, and raw JSON replies (the routes set their own headers and exact bytes)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from router import responses
from router.errors import InferError
from router.infer import GenerationResult
from router.metrics import Metrics
from router.schemas import GenerateParameters
from router.state import RouterState
from router.validation import ValidRequest

T = TypeVar("T")

KEEPALIVE_S = 15.0
CLIENT_CLOSED_REQUEST = 499


@dataclass(frozen=True)
class Outcome:
    """A finished non-streamed generation: results best first, and the `x-*` headers describing it."""

    request: ValidRequest
    results: list[GenerationResult]
    headers: dict[str, str]


def json_response(model: BaseModel | list[BaseModel], headers: dict[str, str] | None = None) -> Response:
    if isinstance(model, list):
        body = b"[" + b",".join(m.model_dump_json().encode() for m in model) + b"]"
    else:
        body = model.model_dump_json().encode()
    return Response(body, media_type="application/json", headers=headers)


@contextlib.contextmanager
def recorded(metrics: Metrics) -> Iterator[None]:
    """Count a request, and its failure by error type."""
    metrics.inc("request_count")
    try:
        yield
    except InferError as error:
        metrics.failure(error.error_type)
        raise


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


async def complete(state: RouterState, inputs: str, params: GenerateParameters, request: Request) -> Outcome | None:
    """Validate and generate under one permit; None if the client left first (the request is dropped)."""
    infer = state.infer
    started_at = time.monotonic()
    infer.limit.acquire()
    try:
        valid = await infer.validate(inputs, params, state.hub_token(request))
        validated_at = time.monotonic()
        results = await _unless_disconnected(request, infer.generate(valid))
    finally:
        infer.limit.release()
    if results is None:
        state.metrics.inc("request_failure", err="dropped")
        return None
    state.served(valid.adapter)
    source = state.config.default_adapter_source
    headers = responses.generate_headers(state.model_id, params, source, valid, results, started_at, validated_at)
    return Outcome(valid, results, headers)
