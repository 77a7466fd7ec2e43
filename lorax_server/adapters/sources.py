"""Where adapters come from: the Hugging Face hub (its cache layout), S3, or a local folder.

Each source turns an adapter id into a local folder holding adapter_config.json and the weights.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from lorax_server.adapters.config import AdapterError
from lorax_server.sources import cache_dir

logger = logging.getLogger(__name__)

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


def parse_s3(adapter_id: str) -> tuple[str, str]:
    """(bucket, prefix): s3://bucket/path, else PREDIBASE_MODEL_BUCKET with the id as path, else bucket/path."""
    if adapter_id.startswith("s3://"):
        bucket, _, prefix = adapter_id[5:].partition("/")
    elif os.environ.get("PREDIBASE_MODEL_BUCKET"):
        bucket = os.environ["PREDIBASE_MODEL_BUCKET"]
        folder = os.environ.get("PREDIBASE_MODEL_FOLDER", "")
        prefix = f"{folder.rstrip('/')}/{adapter_id}" if folder else adapter_id
    else:
        bucket, _, prefix = adapter_id.partition("/")
    if not bucket or not prefix:
        raise AdapterError(f"S3 adapter id '{adapter_id}' must look like s3://bucket/path")
    return bucket, prefix.strip("/")


def fetch_s3(adapter_id: str) -> Path:
    """Download every object under the adapter's prefix into the cache (skipping files already there)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3(adapter_id)
    target = cache_dir() / f"models--s3--{bucket}--{prefix.replace('/', '--')}"
    endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None
    client = boto3.client("s3", endpoint_url=endpoint, config=Config(retries={"max_attempts": 5, "mode": "standard"}))
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
        keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        if not keys:
            raise AdapterError(f"S3 adapter '{adapter_id}': no objects under s3://{bucket}/{prefix}/")
        for key in keys:
            dest = target / key[len(prefix) + 1 :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".part")
            client.download_file(bucket, key, str(tmp))
            os.replace(tmp, dest)
    except (BotoCoreError, ClientError) as exc:
        raise AdapterError(f"S3 adapter '{adapter_id}' could not be fetched: {exc}") from exc
    return target


def fetch_adapter(adapter_id: str, source: str, api_token: str | None = None, trusted: bool = False) -> Path:
    """Local folder of `adapter_id` from `source` (hub, s3, local)."""
    source = source.lower()
    if source == "local":
        return fetch_local(adapter_id, trusted)
    if source == "hub":
        return fetch_hub(adapter_id, api_token)
    if source == "s3":
        return fetch_s3(adapter_id)
    if source == "pbase":
        raise AdapterError(f"adapter source 'pbase' is not supported by this server (adapter '{adapter_id}')")
    raise AdapterError(f"unknown adapter source '{source}' for adapter '{adapter_id}' (expected hub, s3 or local)")
