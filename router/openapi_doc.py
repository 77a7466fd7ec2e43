"""What `/openapi.json` says about the routes' answers (spec 3.11): bodies, SSE events and error statuses.

The routes return raw `Response`s (for their headers and exact bytes), so FastAPI cannot infer their shapes; these
helpers declare them. Server-sent events are documented as `text/event-stream` whose events are the named model.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from router.schemas import ErrorResponse

REF = "#/components/schemas/{model}"

BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body is not valid JSON"},
    415: {"model": ErrorResponse, "description": "The body is not `application/json`"},
    422: {"model": ErrorResponse, "description": "Input validation error"},
}
ERRORS: dict[int | str, dict[str, Any]] = {
    **BODY_ERRORS,
    424: {"model": ErrorResponse, "description": "Generation error (a shard, or an adapter download/load, failed)"},
    429: {"model": ErrorResponse, "description": "Model is overloaded"},
    500: {"model": ErrorResponse, "description": "Incomplete generation"},
}


def _events(model: type[BaseModel]) -> dict[str, Any]:
    return {"text/event-stream": {"schema": {"$ref": REF.format(model=model.__name__)}}}


def generation(
    body: Any, events: type[BaseModel] | None = None, description: str = "Generated text"
) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a generating route: a JSON `body` (a model, or a list of one), SSE `events`, or either
    (chosen by `stream`)."""
    ok: dict[str, Any] = {"description": description}
    if body is not None:
        ok["model"] = body
    if events is not None:
        ok["content"] = _events(events)
    return {200: ok, **ERRORS}


def install(app: FastAPI, event_models: list[type[BaseModel]]) -> None:
    """Generate the document once, adding the SSE event models that no route names as its JSON body."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description,
                                   routes=app.routes)
            _, definitions = models_json_schema(
                [(model, "serialization") for model in event_models], ref_template=REF
            )
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in definitions.get("$defs", {}).items():
                schemas.setdefault(name, schema)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
