"""Where adapters come from: the Hugging Face hub (its cache layout), S3, Predibase (via S3), or a local folder.

Each source turns an adapter id into a local folder holding adapter_config.json and the weights.
"""
from __future__ import annotations

import os
from pathlib import Path

from lorax_server.adapters import pbase
from lorax_server.adapters.access import AccessDenied
from lorax_server.adapters.config import AdapterError
from lorax_server.adapters.deadline import source_timeout
from lorax_server.sources import cache_dir, s3


CREDENTIAL_SOURCES = ("hub", "pbase")  # the sources a request's api_token is a credential for
ADAPTER_PATTERNS = ["adapter_config.json", "*.safetensors", "adapter_model*.bin", "tokenizer*", "*.json"]
LOCAL_ROOTS_ENV = "LORAX_LOCAL_ADAPTER_ROOTS"


def local_roots() -> list[Path]:
    """Folders request-named local adapters may live under: LORAX_LOCAL_ADAPTER_ROOTS (':'-separated), else the
    weights cache. A request can never make the shard read an arbitrary path."""
    roots = [p for p in os.environ.get(LOCAL_ROOTS_ENV, "").split(":") if p]
    return [Path(p).resolve() for p in roots] or [cache_dir().resolve()]


def fetch_local(adapter_id: str, trusted: bool = False) -> Path:
    path = Path(adapter_id).expanduser()
    if not path.is_absolute():
        path = cache_dir() / path
    path = path.resolve()
    if not trusted and not any(path == root or root in path.parents for root in local_roots()):
        raise AdapterError(
            f"local adapter path '{adapter_id}' is outside the allowed roots ({', '.join(map(str, local_roots()))}); "
            f"set {LOCAL_ROOTS_ENV} to allow it"
        )
    if not path.is_dir():
        raise AdapterError(f"local adapter '{adapter_id}' does not exist")
    return path


def _hub_token(api_token: str | None) -> str | None:
    return api_token or os.environ.get("HUGGING_FACE_HUB_TOKEN") or os.environ.get("HF_TOKEN") or None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _hub_failure(adapter_id: str, exc: Exception) -> AdapterError:
    """The hub's 401/403/404 as an AccessDenied; anything else as an AdapterError with the reason."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403, 404):
        return AccessDenied(f"adapter '{adapter_id}': the hub answered {status} (no access with this token)", status)
    return AdapterError(f"adapter '{adapter_id}' could not be fetched from the hub: {type(exc).__name__}: {exc}")


def hub_access(adapter_id: str, api_token: str | None) -> bool:
    """Ask the hub's model info with the request's token: the access check every hub fetch starts with, since
    snapshot_download alone would serve a cached copy when the hub refuses the token. Raises AccessDenied when it
    refuses; False when the hub cannot be reached (a fetch then uses the cache, as offline)."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        api.model_info(adapter_id, token=_hub_token(api_token), timeout=source_timeout())
    except HfHubHTTPError as exc:
        raise _hub_failure(adapter_id, exc) from exc
    except (httpx2.TransportError, ConnectionError):
        return False
    return True


def fetch_hub(adapter_id: str, api_token: str | None, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    if not _hub_offline():
        hub_access(adapter_id, api_token)
    try:
        return Path(snapshot_download(
            adapter_id, revision=revision, cache_dir=cache_dir(), allow_patterns=ADAPTER_PATTERNS,
            token=_hub_token(api_token), endpoint=os.environ.get("HF_ENDPOINT") or None, etag_timeout=source_timeout(),
        ))
    except Exception as exc:  # not found, unauthorized, offline and not cached...
        raise _hub_failure(adapter_id, exc) from exc


def fetch_s3(adapter_id: str) -> Path:
    try:
        return s3.fetch(adapter_id, cache_dir())
    except s3.S3Error as exc:
        raise AdapterError(f"S3 adapter '{adapter_id}': {exc}") from exc


def fetch_adapter(adapter_id: str, source: str, api_token: str | None = None, trusted: bool = False) -> Path:
    """Local folder of `adapter_id` from `source` (hub, s3, local, pbase)."""
    source = source.lower()
    if source == "local":
        return fetch_local(adapter_id, trusted)
    if source == "hub":
        return fetch_hub(adapter_id, api_token)
    if source == "s3":
        return fetch_s3(adapter_id)
    if source == "pbase":
        return fetch_s3(pbase.resolve(adapter_id, api_token))
    raise AdapterError(f"unknown adapter source '{source}' for adapter '{adapter_id}' (expected hub, s3, local or pbase)")


def prove_access(source: str, adapter_id: str, api_token: str | None) -> None:
    """Ask the source whether `api_token` may read the adapter (a metadata call, no download); raises AccessDenied
    when it says no. Used for adapters already in a tier (see access.py)."""
    if source == "hub":
        if _hub_offline():
            raise AdapterError(f"adapter '{adapter_id}': access cannot be checked with the hub offline (HF_HUB_OFFLINE)")
        if not hub_access(adapter_id, api_token):
            raise AdapterError(f"adapter '{adapter_id}': the hub could not be reached to check access")
    elif source == "pbase":
        pbase.resolve(adapter_id, api_token)
