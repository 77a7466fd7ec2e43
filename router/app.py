"""The FastAPI app (spec 3.2-3.11): the route modules of router/routes, who may call them, CORS and error shapes.

Every error body has the reference shape `{"error": ..., "error_type": ...}`, including a missing JSON content type
(415), malformed bodies (400), bodies of the wrong shape (422), unknown paths and methods (404/405) and unexpected
failures (500).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from router import openapi_doc
from router.auth import require_api_key
from router.errors import InferError
from router.infer import Infer
from router.metrics import Metrics
from router.openai_schemas import ChatCompletionChunk
from router.routes import admin, native, openai
from router.schemas import StreamResponse
from router.state import AppConfig, RouterState

logger = logging.getLogger(__name__)


def create_app(
    infer: Infer, health_check: Callable[[], Awaitable[None]], config: AppConfig, metrics: Metrics
) -> FastAPI:
    app = FastAPI(title="LoRAX", version="0.5.0", description="Multi-LoRA inference server")
    app.state.router = RouterState(infer, health_check, config, metrics)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(config.cors_allow_origins) or ["*"],
        allow_methods=["GET", "POST"],
        allow_headers=["content-type"],
    )
    openapi_doc.install(app, [StreamResponse, ChatCompletionChunk])
    _install_error_handlers(app)
    guarded = [Depends(require_api_key(config.api_keys))]  # everything that generates, tokenizes or lists adapters
    app.include_router(native.router, dependencies=guarded)
    app.include_router(openai.router, dependencies=guarded)
    app.include_router(admin.tokenizing, dependencies=guarded)
    app.include_router(admin.probes)
    app.include_router(admin.scraping, dependencies=guarded if config.metrics_require_key else [])
    return app


def _install_error_handlers(app: FastAPI) -> None:
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
