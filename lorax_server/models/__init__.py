"""Model registry: config.json `architectures` -> the family module that reads its config (one per family, all
built on the shared decoder in decoder.py); any other causal LM transformers knows runs on the transformers-backed
path (transformers_backed.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from lorax_server.dist import Parallel
from lorax_server.models import (
    bloom, falcon, gemma, gpt_neo, granite, llama, mixtral, mpt, phi3, qwen3, qwen_moe, stablelm, transformers_backed,
)
from lorax_server.models.decoder import DecoderConfig, DecoderModel
from lorax_server.weights import Weights, load_config

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FAMILIES = (llama, qwen3, granite, gemma, phi3, mixtral, qwen_moe, stablelm, falcon, bloom, mpt, gpt_neo)
READERS: dict[str, Callable[[dict], DecoderConfig]] = {
    arch: family.read_config for family in FAMILIES for arch in family.ARCHITECTURES
}


def choose_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    """--dtype when given; else float32 on CPU, and on a GPU bfloat16 where it is supported (float16 otherwise),
    whatever the checkpoint was saved in: float32 checkpoints would run at half speed in twice the memory."""
    if requested:
        return DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def read_config(config: dict) -> DecoderConfig:
    """The decoder config of a config.json, read by the family its first `architectures` entry names."""
    arch = (config.get("architectures") or ["<none>"])[0]
    if arch not in READERS:
        raise ValueError(f"unsupported architecture '{arch}' (supported: {', '.join(READERS)})")
    return READERS[arch](config)


def load_model(
    folder: Path, dtype: str | None, device: torch.device, parallel: Parallel, trust_remote_code: bool = False,
    quantize: str | None = None,
) -> DecoderModel | transformers_backed.TransformersModel:
    """Build the model class named by the folder's config.json and load this rank's weights: a native family when
    there is one, else the transformers-backed path (the only one that runs checkpoint code, and only when trusted)."""
    config = load_config(folder)
    arch = (config.get("architectures") or ["<none>"])[0]
    if arch not in READERS:
        if quantize:
            raise ValueError(f"--quantize {quantize} needs a native model family; {arch} runs on the transformers path")
        return transformers_backed.load(folder, config, choose_dtype(dtype, device), device, parallel, trust_remote_code)
    weights = Weights(folder, choose_dtype(dtype, device), device, parallel.rank, parallel.world_size, quantize)
    return DecoderModel(read_config(config), weights, parallel)


def implementation(model: DecoderModel | transformers_backed.TransformersModel) -> str:
    """Which path serves the model: "native" or "transformers" (logged at start-up, reported by Info)."""
    return "transformers" if isinstance(model, transformers_backed.TransformersModel) else "native"
