"""Rotary position embeddings (the rotate-half convention of Hugging Face checkpoints)."""
from __future__ import annotations

import math

import torch


def inverse_frequencies(config: dict, head_dim: int) -> torch.Tensor:
    """Per-pair rotation frequencies, honouring `rope_theta` and the `llama3`/`linear` scaling types."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    theta = float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)
    rope_type = scaling.get("rope_type") or scaling.get("type") or params.get("rope_type") or "default"
    if rope_type != "default" and not scaling:
        scaling = params
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rope_type == "default":
        return inv
    if rope_type == "linear":
        return inv / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    raise ValueError(f"unsupported rope scaling type '{rope_type}'")


class Rotary:
    """Precomputed cos/sin tables looked up by absolute position.

    The sin table carries rotate-half's sign: [-sin, +sin] over the two halves, so rotating is a swap of the
    halves, a multiply and a fused multiply-add: x*cos + cat(-x2, x1)*sin in three kernels (the fused add may round
    the last bit differently)."""

    def __init__(self, config: dict, head_dim: int, max_positions: int, device: torch.device, dtype: torch.dtype):
        inv = inverse_frequencies(config, head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv)
        self.cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(device=device, dtype=dtype)
        self.sin = torch.cat([-angles.sin(), angles.sin()], dim=-1).to(device=device, dtype=dtype)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for each token, shaped [tokens, 1, head_dim] to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate [tokens, heads, head_dim] vectors by their positions' angles."""
    swapped = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return torch.addcmul(x * cos, swapped, signed_sin)
