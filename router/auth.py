"""Optional API keys: with LORAX_API_KEY set, generating, tokenizing and adapter routes need
`Authorization: Bearer <key>` (what OpenAI clients send as their `api_key`). Probes (/health, /ping, /info) stay
open; scrapers too, unless LORAX_METRICS_REQUIRE_KEY closes /metrics behind the same keys.

LORAX_API_KEY is one key, several separated by commas, or the path of a file with one key per line. Keys are
compared in constant time, and never logged or echoed in an error.
"""
from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from pathlib import Path

from fastapi import Request

from router.errors import UnauthorizedError

ENV = "LORAX_API_KEY"
METRICS_ENV = "LORAX_METRICS_REQUIRE_KEY"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}


def load_api_keys(value: str | None = None) -> tuple[str, ...]:
    """The configured keys (none: the API is open)."""
    value = (os.environ.get(ENV, "") if value is None else value).strip()
    if not value:
        return ()
    path = Path(value)
    lines = path.read_text().splitlines() if "," not in value and path.is_file() else value.split(",")
    keys = tuple(k.strip() for k in lines if k.strip())
    if not keys:
        raise ValueError(f"{ENV} names no key")
    return keys


def load_metrics_require_key(value: str | None = None) -> bool:
    """Whether /metrics needs an API key too (a boolean env var: 1/true/yes/on or 0/false/no/off)."""
    value = (os.environ.get(METRICS_ENV, "") if value is None else value).strip().lower()
    if value not in _TRUE | _FALSE:
        raise ValueError(f"{METRICS_ENV} must be true or false, not {value!r}")
    return value in _TRUE


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def require_api_key(keys: tuple[str, ...]) -> Callable[[Request], None]:
    """A FastAPI dependency that lets a request through only with one of `keys` (every request when none)."""
    encoded = [k.encode() for k in keys]

    def check(request: Request) -> None:
        if not encoded:
            return
        token = (bearer_token(request) or "").encode()
        matched = False
        for key in encoded:  # every key compared, so timing says nothing about which one was close
            matched |= hmac.compare_digest(token, key)
        if not matched:
            raise UnauthorizedError("Missing or invalid API key: send `Authorization: Bearer <key>`")

    return check
