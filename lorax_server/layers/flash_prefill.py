"""Prefill attention on CUDA with torch's FlashAttention variable-length kernel (`torch.nn.attention.varlen`).

A prefill batch holds whole prompts, so each prompt attends causally to its own new keys only: the kernel takes the
flat q/k/v and the prompts' offsets, with no padding, no gather from the cache and no dense [B, Q, K] mask (the SDPA
path with a boolean mask rules out the flash kernel and materialises padded score matrices). It is chosen at start-up:
`usable` is true on a CUDA device when torch ships the kernel and a one-time check against plain attention passes;
otherwise the reason is logged and prefill keeps the portable path.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from lorax_server.layers.cuda_checks import agrees, has_varlen, once_per_device

logger = logging.getLogger(__name__)


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    """What FlashAttention computes: half-precision inputs, head sizes up to 256 in steps of 8."""
    return dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, scale: float,
    window: int | None,
) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] of whole prompts laid end to end (offsets `cu_seqlens`) -> [T, H*D], causal,
    each query seeing at most the last `window` positions (itself included) when a window is given."""
    from torch.nn.attention.varlen import varlen_attn

    out = varlen_attn(
        q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scale,
        window_size=(window - 1 if window else -1, 0), enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.reshape(q.shape[0], -1)


def _check(device: torch.device) -> bool:
    if not has_varlen("prefill attention: SDPA with a mask"):
        return False
    lens, heads, kv_heads, dim = [5, 17], 4, 2, 64
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(sum(lens), h, dim, generator=gen, device=device, dtype=torch.float16)
               for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device=device)
    try:
        got = attend(q, k, v, cu, max(lens), dim**-0.5, None).float()
    except Exception as exc:  # a kernel this GPU or build cannot run
        logger.warning("prefill attention: SDPA with a mask (the varlen flash kernel failed its check: %s)", exc)
        return False
    expected = []
    for start, n in zip([0, lens[0]], lens):
        part = [t[start : start + n].transpose(0, 1).float() for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*part, is_causal=True, scale=dim**-0.5, enable_gqa=True)
        expected.append(out.transpose(0, 1).reshape(n, -1))
    return agrees(got, torch.cat(expected), "prefill attention: SDPA with a mask",
                  "prefill attention: FlashAttention varlen kernel (no dense mask)")


# Whether CUDA prefill on a device takes this kernel: checked once per device, the reason logged.
usable = once_per_device(_check)
