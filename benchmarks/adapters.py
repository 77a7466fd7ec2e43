"""Random PEFT LoRA adapters written straight to disk (no peft needed), for benchmarks.

Each adapter is a folder with `adapter_config.json` and `adapter_model.safetensors` in PEFT's key layout. Weights
are seeded random: A ~ N(0, 1/in) and B ~ N(0, (DELTA / (scale * sqrt(r)))^2), so whatever the rank, alpha or
rsLoRA, the delta `scale * B @ A @ x` is about DELTA times the size of x: outputs change, but stay sane.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
DELTA = 0.05


@dataclass(frozen=True)
class Spec:
    """One adapter's shape: rank, alpha, target modules and rsLoRA."""

    r: int
    lora_alpha: float
    targets: tuple[str, ...]
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def label(self) -> str:
        names = {("q_proj", "v_proj"): "q,v", ATTENTION: "q,k,v,o", ATTENTION + MLP: "all 7", MLP: "mlp"}
        return (f"r={self.r} {names.get(self.targets, ','.join(self.targets))} alpha={self.lora_alpha:g}"
                + (" rslora" if self.use_rslora else ""))


QV8 = Spec(8, 16, ("q_proj", "v_proj"))
# A mix like published adapters: ranks 8..64, attention / all / MLP-only targets, alpha above and below r, rsLoRA.
PUBLISHED_MIX = (
    QV8,
    Spec(16, 32, ATTENTION),
    Spec(32, 16, ATTENTION + MLP),
    Spec(64, 16, ATTENTION + MLP, use_rslora=True),
    Spec(8, 32, MLP),
    Spec(16, 8, MLP, use_rslora=True),
    Spec(32, 64, ("q_proj", "v_proj"), use_rslora=True),
    Spec(64, 32, ATTENTION),
)


def module_dims(config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-targetable linear of a Llama-style config.json."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    return {
        "q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out), "o_proj": (q_out, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }


def write_adapter(folder: Path, spec: Spec, config: dict, seed: int) -> int:
    """Write one random adapter into `folder`; returns the bytes of its weights."""
    dims, layers = module_dims(config), config["num_hidden_layers"]
    gen = torch.Generator().manual_seed(seed)
    b_std = DELTA / (spec.scale * math.sqrt(spec.r))
    tensors = {}
    for i in range(layers):
        for module in spec.targets:
            fan_in, fan_out = dims[module]
            prefix = f"base_model.model.model.layers.{i}.{'mlp' if module in MLP else 'self_attn'}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(spec.r, fan_in, generator=gen) / math.sqrt(fan_in)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, spec.r, generator=gen) * b_std
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.r, "lora_alpha": spec.lora_alpha,
        "target_modules": list(spec.targets), "use_rslora": spec.use_rslora, "base_model_name_or_path": None,
        "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0,
    }, indent=1))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_adapters(root: Path, specs: list[Spec], config: dict, seed: int = 0) -> tuple[list[str], int]:
    """Write `specs[i]` into `root/{i:04d}`; returns their absolute paths and the total bytes of their weights."""
    paths, total = [], 0
    for i, spec in enumerate(specs):
        folder = (root / f"{i:04d}").resolve()
        total += write_adapter(folder, spec, config, seed * 1_000_003 + i)
        paths.append(str(folder))
    return paths, total
