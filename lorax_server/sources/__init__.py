"""Resolve a model id (hub repo, S3 prefix, local folder, .gguf file) to a local folder of weights.

`locate_model` never touches the network; `fetch_model` may download (the launcher's download step).
Both agree on where things land, so the shard and the router can find what the download step fetched.
"""
from __future__ import annotations

import os
from pathlib import Path

from lorax_server.sources import hub, local, s3

SOURCES = ("hub", "s3", "local")


class ModelNotFound(Exception):
    """The id could not be resolved from the named source."""


def cache_dir() -> Path:
    """The weights cache: WEIGHTS_CACHE_OVERRIDE, else HUGGINGFACE_HUB_CACHE, else huggingface_hub's default."""
    override = os.environ.get("WEIGHTS_CACHE_OVERRIDE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if override:
        return Path(override)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def locate_model(model_id: str, revision: str | None = None, source: str = "hub") -> Path:
    """The local folder holding `model_id`'s config and safetensors, without any download.

    Raises ModelNotFound when the model is not on this machine yet.
    """
    path = local.as_local_path(model_id)
    if path is not None:
        return local.locate(path, cache_dir())
    if source == "hub":
        found = hub.locate(model_id, revision, cache_dir())
        if found is None:
            raise ModelNotFound(f"model '{model_id}' (source hub) is not in the cache {cache_dir()}")
        return found
    if source == "s3":
        found = s3.locate(model_id, cache_dir())
        if found is None:
            raise ModelNotFound(f"model '{model_id}' (source s3) has not been downloaded into {cache_dir()} yet")
        return found
    raise ModelNotFound(f"unknown model source '{source}' for '{model_id}' (expected one of {', '.join(SOURCES)})")


def fetch_model(model_id: str, revision: str | None = None, source: str = "hub") -> Path:
    """Make `model_id` available locally (downloading or converting as needed) and return its folder."""
    path = local.as_local_path(model_id)
    if path is not None:
        return local.prepare(path, cache_dir())
    if source == "hub":
        return hub.fetch(model_id, revision, cache_dir())
    if source == "s3":
        try:
            return s3.fetch(model_id, cache_dir())
        except s3.S3Error as exc:
            raise ModelNotFound(f"model '{model_id}' (source s3): {exc}") from exc
    raise ModelNotFound(f"unknown model source '{source}' for '{model_id}' (expected one of {', '.join(SOURCES)})")
