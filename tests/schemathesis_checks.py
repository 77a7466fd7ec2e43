"""A schemathesis check (loaded through SCHEMATHESIS_HOOKS in the client venv): every error keeps LoRAX's shape.

An error is `{"error": str, "error_type": str}`, as the response body of a 4xx/5xx or, on a stream, as an SSE event
of a 200 response (spec 3.5, 3.9). A stream event reporting a server-side failure counts as a 5xx.
"""
from __future__ import annotations

import json
from typing import Any

import schemathesis

SERVER_SIDE_ERROR_TYPES = {"internal", "incomplete_generation"}


def _shape_problem(payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return f"error payload is not a JSON object: {payload!r}"
    if not isinstance(payload.get("error"), str) or not isinstance(payload.get("error_type"), str):
        return f"error payload lacks string `error` and `error_type`: {payload!r}"
    return None


def _events(response: Any) -> list[str]:
    """The `data:` payloads of an SSE body, without a last line the client stopped reading in the middle of."""
    lines = response.content.decode("utf-8", "replace").splitlines()
    if response.stream_cut_short and lines:
        lines = lines[:-1]
    return [line[len("data:"):].strip() for line in lines if line.startswith("data:")]


def _check_stream(response: Any) -> None:
    for data in _events(response):
        if data == "[DONE]":
            continue
        try:
            event = json.loads(data)
        except ValueError:
            raise AssertionError(f"SSE event is not JSON: {data[:300]!r}") from None
        if isinstance(event, dict) and "error" in event:
            problem = _shape_problem(event)
            if problem:
                raise AssertionError(f"stream {problem}")
            if event["error_type"] in SERVER_SIDE_ERROR_TYPES:
                raise AssertionError(f"stream reported a server-side error: {event!r}")


@schemathesis.check
def lorax_error_shape(ctx: Any, response: Any, case: Any) -> None:
    """4xx/5xx bodies and SSE error events are `{"error", "error_type"}` objects."""
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code >= 400:
        try:
            payload = json.loads(response.content)
        except ValueError:
            raise AssertionError(f"{response.status_code} body is not JSON: {response.content[:300]!r}") from None
        problem = _shape_problem(payload)
        if problem:
            raise AssertionError(f"{response.status_code} {problem}")
    elif content_type.startswith("text/event-stream"):
        _check_stream(response)
