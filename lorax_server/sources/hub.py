"""Models on the Hugging Face hub, stored in the hub's own cache layout (models--org--name/snapshots/<sha>)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# Only what a shard and the router need: weights, configs, tokenizer files.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken"]


def _token() -> str | None:
    return os.environ.get("HUGGING_FACE_HUB_TOKEN") or os.environ.get("HF_TOKEN") or None


def locate(model_id: str, revision: str | None, cache: Path) -> Path | None:
    """The cached snapshot of `model_id` at `revision`, or None when it is not cached."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(
                model_id, revision=revision, cache_dir=cache, local_files_only=True, allow_patterns=ALLOW_PATTERNS
            )
        )
    except Exception:  # huggingface_hub raises several kinds for "not cached"
        return None
    return folder if (folder / "config.json").exists() else None


def fetch(model_id: str, revision: str | None, cache: Path) -> Path:
    """Download (or reuse) `model_id`; offline with HF_HUB_OFFLINE=1 uses the cache only."""
    from huggingface_hub import snapshot_download

    from lorax_server.sources import ModelNotFound

    found = locate(model_id, revision, cache)
    if found is not None:
        logger.info("model %s already present in %s", model_id, found)
        return found
    logger.info("downloading %s (revision %s) from the hub into %s", model_id, revision or "main", cache)
    try:
        folder = snapshot_download(
            model_id, revision=revision, cache_dir=cache, allow_patterns=ALLOW_PATTERNS, token=_token()
        )
    except Exception as exc:
        raise ModelNotFound(f"could not download model '{model_id}' (source hub): {exc}") from exc
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ModelNotFound(f"model '{model_id}' (source hub) has no config.json")
    return folder
