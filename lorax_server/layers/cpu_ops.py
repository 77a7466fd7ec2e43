"""Fused float32 CPU kernels for the decode step (`cpu_kernels.cpp`), built once per machine like the LoRA kernel.

- Decode attention reading the paged KV cache in place. The portable path copies every request's cache blocks,
  padded to the longest request, into a fresh tensor per layer and adds a [B, K] mask: at 32 requests that copy
  was 7.5% of a decode step. The kernel follows each request's block table row instead, so a step reads each key
  and value once and only the request's own.
- RMSNorm in one pass: torch runs it as five ops on the CPU, 40-80 us a call, twice per layer.
Float32 (the CPU default) takes them; other dtypes keep the portable paths.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lorax_server.layers import cpp_build

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_ops = None


def ops():
    """torch.ops.lorax_cpu, built on first use and cached on this machine."""
    global _ops
    if _ops is None:
        cpp_build.load("lorax_cpu_kernels", _SOURCE, "lorax_cpu", {
            "decode_attention": "(Tensor q, Tensor cache, Tensor block_table, Tensor kv_lens, int block, float scale, "
                                "int window, float softcap) -> Tensor",
            "rms_norm": "(Tensor x, Tensor weight, float eps) -> Tensor",
        })
        _ops = torch.ops.lorax_cpu
    return _ops


def supports(dtype: torch.dtype) -> bool:
    """Whether the kernels take activations of this dtype (float32 only; the rest keep torch's paths)."""
    return dtype == torch.float32


def attend(
    q: torch.Tensor, layer_cache: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor, block_size: int,
    scale: float, window: int | None, softcap: float | None,
) -> torch.Tensor:
    """q [B, H, D] (the new tokens, already in the cache [2, Hkv, slots, D]) -> [B, H*D]."""
    return ops().decode_attention(q, layer_cache, block_table, kv_lens, block_size, scale, window or 0, softcap or 0.0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension (float32 x and weight on the CPU)."""
    return ops().rms_norm(x, weight, eps)


if __name__ == "__main__":  # build the kernels ahead of time
    ops()
    print("lorax CPU decode kernels ready")
