"""Rotary position embeddings (the rotate-half convention of Hugging Face checkpoints) and their scaling types:
`linear`, `llama3`, `dynamic` (NTK), `yarn` and `longrope` (`su`), computed as transformers computes them."""
from __future__ import annotations

import math

import torch

_NEEDS_ORIGINAL_LENGTH = ("llama3", "yarn", "longrope")


def rope_parameters(config: dict, layer_type: str | None = None) -> dict:
    """One flat dict of rotary settings (rope_type, rope_theta, scaling fields, max_position_embeddings) from either
    config.json layout: transformers 5's `rope_parameters` (flat, or keyed by layer type as Gemma 3 saves it), or the
    older top-level `rope_theta` + `rope_scaling` (Gemma 3's `rope_local_base_freq` being the sliding layers' theta,
    its `rope_scaling` applying to the full-attention layers only)."""
    params = dict(config.get("rope_parameters") or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    elif layer_type is not None and any(isinstance(v, dict) for v in params.values()):
        params = {}
    scaling = dict(config.get("rope_scaling") or {})
    theta = config.get("rope_theta")
    if layer_type == "sliding_attention":
        theta, scaling = config.get("rope_local_base_freq", theta), {}
    params = {**params, **scaling}
    legacy_type = params.pop("type", None)
    params["rope_type"] = params.get("rope_type") or legacy_type or "default"
    if params["rope_type"] == "su":
        params["rope_type"] = "longrope"
    params["rope_theta"] = float(params.get("rope_theta") or theta or 10000.0)
    params["partial_rotary_factor"] = float(params.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0)
    params["max_position_embeddings"] = int(config.get("max_position_embeddings", 4096))
    if params["rope_type"] in _NEEDS_ORIGINAL_LENGTH:
        # a top-level original length (Phi-3) wins, as in transformers
        original = config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
        params["original_max_position_embeddings"] = int(original or params["max_position_embeddings"])
    return params


def _exponents(head_dim: int) -> torch.Tensor:
    return torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim


def _yarn(params: dict, head_dim: int) -> tuple[torch.Tensor, float]:
    """Interpolate low frequencies, keep high ones, ramp linearly between (YaRN), with its attention temperature."""
    base, original = params["rope_theta"], params["original_max_position_embeddings"]
    factor = params.get("factor") or params["max_position_embeddings"] / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1.0 / base ** _exponents(head_dim)
    return extrapolated / factor * ramp + extrapolated * (1 - ramp), float(attention)


def _llama3(params: dict, inv: torch.Tensor) -> torch.Tensor:
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_len = float(params["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


def inverse_frequencies(params: dict, head_dim: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Per-pair rotation frequencies (float64) and the factor cos/sin are multiplied by, for sequences of `seq_len`
    tokens (only `dynamic` and `longrope` depend on it; None means the model's trained length)."""
    rope_type, theta = params["rope_type"], params["rope_theta"]
    inv = 1.0 / theta ** _exponents(head_dim)
    if rope_type == "default":
        return inv, 1.0
    if rope_type == "linear":
        return inv / float(params["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3(params, inv), 1.0
    if rope_type == "dynamic":
        trained, factor = params["max_position_embeddings"], float(params["factor"])
        length = max(seq_len or trained, trained)
        base = theta * ((factor * length / trained) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / base ** _exponents(head_dim), 1.0
    if rope_type == "yarn":
        return _yarn(params, head_dim)
    if rope_type == "longrope":
        original = params["original_max_position_embeddings"]
        factor = params.get("factor") or params["max_position_embeddings"] / original
        attention = params.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        long = seq_len is not None and seq_len > original
        ext = torch.tensor(params["long_factor" if long else "short_factor"], dtype=torch.float64)
        return inv / ext, float(attention)
    raise ValueError(f"unsupported rope scaling type '{rope_type}'")


def _angles(params: dict, head_dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """[max_positions, head_dim/2] rotation angles. `longrope` switches to its long factors from the original
    length on (per position: a prompt crossing that length keeps the short factors for its first positions, where
    transformers would rotate the whole prompt with the long ones); `dynamic` is scaled for the table's length."""
    positions = torch.arange(max_positions, dtype=torch.float64)
    inv, attention = inverse_frequencies(params, head_dim, max_positions)
    if params["rope_type"] == "longrope":
        short, _ = inverse_frequencies(params, head_dim, None)
        original = params["original_max_position_embeddings"]
        inv = torch.where((positions >= original)[:, None], inv, short)
        return positions[:, None] * inv, attention
    return torch.outer(positions, inv), attention


class Rotary:
    """Precomputed cos/sin tables looked up by absolute position, over the first `partial_rotary_factor` of each
    head's features (Phi-4-mini rotates three quarters; the rest pass through unrotated).

    The sin table carries rotate-half's sign: [-sin, +sin] over the two halves, so rotating is a swap of the
    halves, a multiply and a fused multiply-add: x*cos + cat(-x2, x1)*sin in three kernels (the fused add may round
    the last bit differently). Scaling types with an attention factor (yarn, longrope) have it folded in."""

    def __init__(self, params: dict, head_dim: int, max_positions: int, device: torch.device, dtype: torch.dtype):
        angles, attention = _angles(params, int(head_dim * params["partial_rotary_factor"]), max_positions)
        cos, sin = angles.cos() * attention, angles.sin() * attention
        self.cos = torch.cat([cos, cos], dim=-1).to(device=device, dtype=dtype)
        self.sin = torch.cat([-sin, sin], dim=-1).to(device=device, dtype=dtype)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for each token, shaped [tokens, 1, head_dim] to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate [tokens, heads, head_dim] vectors by their positions' angles: each whole head, or its first
    cos.shape[-1] features when the tables are narrower (partial rotary)."""
    rotated = cos.shape[-1]
    if rotated < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :rotated], cos, signed_sin), x[..., rotated:]], dim=-1)
    swapped = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return torch.addcmul(x * cos, swapped, signed_sin)
