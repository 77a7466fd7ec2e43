"""Models and adapters in S3 (or any S3-compatible store): every object under a prefix, mirrored into the cache.

Ids look like `s3://bucket/path`; a bare `path` uses PREDIBASE_MODEL_BUCKET (and PREDIBASE_MODEL_FOLDER), and
`bucket/path` works too. The endpoint comes from S3_ENDPOINT_URL / AWS_ENDPOINT_URL, credentials the usual boto3 way.
Objects are downloaded into a staging folder beside the cache entry and moved into place (one atomic rename per
file, the completion marker last) only once all of them arrived, so an interrupted download or a full disk leaves
the entry as it was, never half-written.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

COMPLETE_MARKER = ".lorax-s3-complete"


class S3Error(Exception):
    """The id is malformed, the prefix is empty, or S3 refused or failed the download."""


def parse(model_id: str) -> tuple[str, str]:
    """(bucket, prefix) of an S3 id."""
    if model_id.startswith("s3://"):
        bucket, _, prefix = model_id[5:].partition("/")
    elif os.environ.get("PREDIBASE_MODEL_BUCKET"):
        bucket = os.environ["PREDIBASE_MODEL_BUCKET"]
        folder = os.environ.get("PREDIBASE_MODEL_FOLDER", "")
        prefix = f"{folder.rstrip('/')}/{model_id}" if folder else model_id
    else:
        bucket, _, prefix = model_id.partition("/")
    if not bucket or not prefix.strip("/"):
        raise S3Error(f"S3 id '{model_id}' must look like s3://bucket/path")
    return bucket, prefix.strip("/")


def target_dir(model_id: str, cache: Path) -> Path:
    bucket, prefix = parse(model_id)
    return cache / f"models--s3--{bucket}--{prefix.replace('/', '--')}"


def locate(model_id: str, cache: Path) -> Path | None:
    """The mirrored folder of a fully downloaded `model_id`, or None."""
    target = target_dir(model_id, cache)
    return target if (target / COMPLETE_MARKER).exists() else None


def fetch(model_id: str, cache: Path) -> Path:
    """Download every object under the id's prefix into the cache (overwriting what is there) and return the folder."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse(model_id)
    target = target_dir(model_id, cache)
    endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None
    timeout = _timeout()
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=timeout, read_timeout=timeout)
    client = boto3.client("s3", endpoint_url=endpoint, config=config)
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lorax-s3-partial-", dir=cache))  # same filesystem: renames are atomic
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
        keys = [obj["Key"] for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
        if not keys:
            raise S3Error(f"no objects under s3://{bucket}/{prefix}/")
        for key in keys:
            dest = staging / key[len(prefix) + 1 :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(dest))
        _move_into_place(staging, target)
    except (BotoCoreError, ClientError) as exc:
        raise S3Error(f"s3://{bucket}/{prefix} could not be fetched: {exc}") from exc
    except OSError as exc:  # the disk filled, or the cache is not writable
        raise S3Error(f"s3://{bucket}/{prefix} could not be stored in {cache}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _timeout() -> float:
    """Socket timeout: the adapter source bound (LORAX_ADAPTER_SOURCE_TIMEOUT_S), which models share."""
    from lorax_server.adapters.deadline import source_timeout

    return source_timeout()


def _move_into_place(staging: Path, target: Path) -> None:
    """Every complete file from `staging` into `target`, each by an atomic rename; the marker last."""
    (target / COMPLETE_MARKER).unlink(missing_ok=True)
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        dest = target / file.relative_to(staging)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, dest)
    (target / COMPLETE_MARKER).touch()
