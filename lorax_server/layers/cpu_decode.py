"""Decode attention on the CPU reading the paged KV cache in place (`decode_attention_cpu.cpp`).

The portable decode path copies every request's cache blocks, padded to the longest request, into a fresh tensor
per layer and adds a [B, K] mask: at 32 requests that copy was 7.5% of a decode step. The kernel instead follows
each request's block table row, so a step reads each key and value once and only the request's own. Float32
models take it (the CPU default); other dtypes keep the portable path. Built once per machine like the LoRA kernel.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lorax_server.layers import cpp_build

_SOURCE = Path(__file__).with_name("decode_attention_cpu.cpp")
_op = None


def op():
    """torch.ops.lorax_attention.decode_attention, built on first use and cached on this machine."""
    global _op
    if _op is None:
        schema = ("(Tensor q, Tensor cache, Tensor block_table, Tensor kv_lens, int block, float scale, int window, "
                  "float softcap) -> Tensor")
        cpp_build.load("lorax_attention_cpu", _SOURCE, "lorax_attention", {"decode_attention": schema})
        _op = torch.ops.lorax_attention.decode_attention
    return _op


def supports(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


def attend(
    q: torch.Tensor, layer_cache: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor, block_size: int,
    scale: float, window: int | None, softcap: float | None,
) -> torch.Tensor:
    """q [B, H, D] (the new tokens, already in the cache [2, Hkv, slots, D]) -> [B, H*D]."""
    return op()(q, layer_cache, block_table, kv_lens, block_size, scale, window or 0, softcap or 0.0)


if __name__ == "__main__":  # build the kernel ahead of time
    op()
    print("lorax decode-attention CPU kernel ready")
