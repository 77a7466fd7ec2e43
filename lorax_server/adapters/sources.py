"""Where adapters come from: the Hugging Face hub (its cache layout), S3, Predibase (via S3), or a local folder.

Each source turns an adapter id into a local folder holding adapter_config.json and the weights.
"""
from __future__ import annotations

import os
from pathlib import Path

from lorax_server.adapters import pbase
from lorax_server.adapters.config import AdapterError
from lorax_server.sources import cache_dir, s3


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


def fetch_hub(adapter_id: str, api_token: str | None, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    token = api_token or os.environ.get("HUGGING_FACE_HUB_TOKEN") or os.environ.get("HF_TOKEN") or None
    try:
        return Path(snapshot_download(adapter_id, revision=revision, cache_dir=cache_dir(), allow_patterns=ADAPTER_PATTERNS, token=token))
    except Exception as exc:  # not found, unauthorized, offline and not cached...
        raise AdapterError(f"adapter '{adapter_id}' could not be fetched from the hub: {type(exc).__name__}: {exc}") from exc


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
