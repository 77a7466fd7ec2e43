"""Routes around generation (spec 3.7-3.11): tokenize, health probes, info, metrics and the reference's OpenAPI
address. Three routers, because they differ in who may call them (`create_app` guards each as configured):
`tokenizing` needs an API key, `scraping` (/metrics) may, `probes` never do."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from router import openapi_doc
from router.errors import UnhealthyError
from router.routes.generation import json_response
from router.schemas import AdapterTier, ErrorResponse, Info, SimpleToken, TokenizeRequest
from router.state import State

NO_TOKENIZER = {"error": "No fast tokenizer or tokenizer.json for this model", "error_type": "no fast tokenizer"}

tokenizing = APIRouter()
probes = APIRouter()
scraping = APIRouter()


@tokenizing.post(
    "/tokenize",
    response_model=list[SimpleToken],
    responses={404: {"model": ErrorResponse, "description": "No fast tokenizer"}, **openapi_doc.BODY_ERRORS},
)
async def tokenize(body: TokenizeRequest, state: State) -> Response:
    """The tokens of `inputs`: id, vocabulary string and character offsets."""
    tokenizer = state.config.tokenizer
    if tokenizer is None:
        return JSONResponse(NO_TOKENIZER, status_code=404)
    return json_response(await tokenizer.tokenize(body.inputs, body.add_special_tokens))


@probes.get("/health", responses={503: {"model": ErrorResponse, "description": "Unhealthy"}})
@probes.get("/ping", include_in_schema=False)
@probes.get("/", include_in_schema=False)
async def health(state: State) -> Response:
    try:
        await state.health_check()
    except Exception as error:
        raise UnhealthyError() from error
    return Response(status_code=200)


@probes.get("/info", response_model=Info)
async def info(state: State) -> Response:
    config = state.config
    answer = config.info
    if config.adapter_tiers is not None:
        tiers = {name: AdapterTier(adapters=n, bytes=b) for name, (n, b) in config.adapter_tiers().items()}
        answer = answer.model_copy(update={"adapter_tiers": tiers})
    return json_response(answer)


@probes.get("/api-doc/openapi.json", include_in_schema=False)
async def reference_openapi(request: Request) -> JSONResponse:
    """The reference's address for the same document as /openapi.json."""
    return JSONResponse(request.app.openapi())


@scraping.get("/metrics", response_class=PlainTextResponse)
async def metrics_route(request: Request, state: State) -> Response:
    """Prometheus text, or the reference's JSON shape when the client accepts JSON."""
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse(state.metrics.render_json())
    return PlainTextResponse(state.metrics.render_text())
