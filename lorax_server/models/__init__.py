"""Model registry: config.json `architectures` -> implementation."""
from __future__ import annotations

from pathlib import Path

import torch

from lorax_server.dist import Parallel
from lorax_server.models.llama import ARCHITECTURES as LLAMA_ARCHITECTURES
from lorax_server.models.llama import LlamaModel
from lorax_server.weights import Weights, load_config

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def choose_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    """--dtype when given; else float32 on CPU, and on a GPU bfloat16 where it is supported (float16 otherwise),
    whatever the checkpoint was saved in: float32 checkpoints would run at half speed in twice the memory."""
    if requested:
        return DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(folder: Path, dtype: str | None, device: torch.device, parallel: Parallel) -> LlamaModel:
    """Build the model class named by the folder's config.json and load this rank's weights."""
    config = load_config(folder)
    arch = (config.get("architectures") or ["<none>"])[0]
    if arch not in LLAMA_ARCHITECTURES:
        raise ValueError(f"unsupported architecture '{arch}' (supported: {', '.join(LLAMA_ARCHITECTURES)})")
    weights = Weights(folder, choose_dtype(dtype, device), device, parallel.rank, parallel.world_size)
    return LlamaModel(config, weights, parallel)
