"""The norms of the native families: RMSNorm as the checkpoints' reference code computes it (statistics in float32, then
the learned scale), and LayerNorm."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lorax_server.layers import cpu_ops


class RMSNorm:
    """Normalise the last dimension and scale it by the weight: `w` (Llama, Qwen, Granite), or `1 + w` (Gemma,
    whose checkpoints store the offset from one). A [heads, head_dim] weight scales each head of a
    [tokens, heads, head_dim] input by its own row (q and k norms of several heads at once).

    Float32 inputs take a one-pass kernel where the weight fits it: our C++ one on the CPU (torch runs RMSNorm there
    as five ops, 40-80 us a call), torch's fused one elsewhere. Narrower inputs follow each family's reference
    rounding: Llama rounds the normalised values to the model dtype before the weight, Gemma multiplies by `1 + w` in
    float32 and rounds once."""

    def __init__(self, weight: torch.Tensor, eps: float, unit_offset: bool = False):
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = 1.0 + weight.float() if unit_offset else weight
        self._fused = weight.dim() == 1
        self._cpu_kernel = self._fused and self.weight.device.type == "cpu" and self.weight.dtype == torch.float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            if self._cpu_kernel and x.device.type == "cpu":
                return cpu_ops.rms_norm(x, self.weight, self.eps)
            if self._fused:
                return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
            return F.rms_norm(x, x.shape[-1:], None, self.eps) * self.weight
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x32 * self.weight).to(x.dtype)
        return self.weight * x32.to(x.dtype)


class LayerNorm:
    """LayerNorm over the last dimension (StableLM, Falcon, Bloom): mean and variance, then the learned scale and, where
    the checkpoint has one, shift. A [heads, head_dim] weight scales each head of a [tokens, heads, head_dim] input by
    its own row (StableLM's per-head q/k norms). torch's kernel keeps the statistics in float32 for narrower inputs,
    as the reference's nn.LayerNorm does."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, eps: float):
        self.weight, self.bias, self.eps = weight, bias, eps
        self._fused = weight.dim() == 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        out = F.layer_norm(x, x.shape[-1:], None, None, self.eps) * self.weight
        return out if self.bias is None else out + self.bias
