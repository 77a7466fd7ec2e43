"""A bound on how long one adapter source may take, so a source that accepts and never answers fails its adapter
(the router answers its requests with a 424) instead of holding a download forever.

LORAX_ADAPTER_SOURCE_TIMEOUT_S (default 120) bounds each source call as a whole (metadata and download of one
adapter id). The same value is each source's socket timeout, so the abandoned call's thread ends soon after.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import TypeVar

from lorax_server.adapters.config import AdapterError

TIMEOUT_ENV = "LORAX_ADAPTER_SOURCE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 120.0

T = TypeVar("T")


def source_timeout() -> float:
    """Seconds a source call may take (LORAX_ADAPTER_SOURCE_TIMEOUT_S)."""
    value = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    if value <= 0:
        raise AdapterError(f"{TIMEOUT_ENV} must be > 0 (got {value:g})")
    return value


def within_deadline(what: str, fn: Callable[..., T], *args) -> T:
    """`fn(*args)` on a daemon thread of its own, waited for at most `source_timeout()` seconds.

    A daemon thread, not a pool: an abandoned call must neither occupy a shared worker nor hold up the exit."""
    timeout = source_timeout()
    result: Future = Future()

    def run() -> None:
        try:
            result.set_result(fn(*args))
        except BaseException as exc:  # handed to the waiting caller
            result.set_exception(exc)

    threading.Thread(target=run, name="adapter-source", daemon=True).start()
    if not wait([result], timeout).done:
        raise AdapterError(f"{what}: the adapter source did not answer within {timeout:g}s ({TIMEOUT_ENV})")
    return result.result()
