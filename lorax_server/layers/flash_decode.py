"""Decode attention on CUDA straight from the paged KV cache, with torch's FlashAttention kernel and a block table.

The portable decode path copies every request's cache blocks, padded to the longest request, into a fresh tensor per
layer and masks the padding. Here the kernel reads the blocks in place: each request's block table row and its
key count (`seqused_k`) say where its keys are, so nothing is copied and no [B, K] mask exists. A layer's cache is
[2, kv_heads, blocks * block_size, head_dim]; viewed as [blocks, block_size, kv_heads, head_dim] (a permutation,
no copy) it is the page pool the kernel takes.

Whether the installed kernel accepts that layout and block size is decided once per device at start-up by running
it against the portable path on random data; on failure the reason is logged and decode keeps the portable path.
"""
from __future__ import annotations

import logging

import torch

from lorax_server.layers.cuda_checks import agrees, has_varlen, once_per_device

logger = logging.getLogger(__name__)


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    """What FlashAttention computes: half-precision inputs, head sizes up to 256 in steps of 8."""
    return dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256


def pages(layer_cache: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one layer's cache as [blocks, block_size, kv_heads, head_dim] views."""
    kv_heads, slots, dim = layer_cache.shape[1:]
    paged = layer_cache.view(2, kv_heads, slots // block_size, block_size, dim).permute(0, 2, 3, 1, 4)
    return paged[0], paged[1]


def attend(
    q: torch.Tensor, layer_cache: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor, max_kv: int,
    block_size: int, scale: float, window: int | None,
) -> torch.Tensor:
    """q [B, H, D], one new token per request, already written to the cache; block_table [B, blocks] and kv_lens
    [B] int32 -> [B, H*D]. Each query sees its request's keys, at most the last `window` of them when given."""
    from torch.nn.attention.varlen import varlen_attn

    keys, values = pages(layer_cache, block_size)
    batch = q.shape[0]
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    out = varlen_attn(
        q, keys, values, cu_q, None, 1, max_kv, scale=scale, window_size=(window - 1 if window else -1, 0),
        enable_gqa=q.shape[1] != keys.shape[2], seqused_k=kv_lens, block_table=block_table,
    )
    return out.reshape(batch, -1)


def _check(device: torch.device) -> bool:
    """Run the kernel on a small cache whose requests own scattered blocks, against plain attention per request."""
    if not has_varlen("decode attention: blocks gathered per layer"):
        return False
    block, heads, kv_heads, dim, blocks = 16, 4, 2, 64, 12
    gen = torch.Generator(device=device).manual_seed(0)
    cache = torch.randn(2, kv_heads, blocks * block, dim, generator=gen, device=device, dtype=torch.float16)
    q = torch.randn(3, heads, dim, generator=gen, device=device, dtype=torch.float16)
    lens, tables = [5, 37, 16], [[7, 0, 0], [2, 9, 4], [11, 0, 0]]
    table = torch.tensor(tables, dtype=torch.int32, device=device)
    try:
        got = attend(q, cache, table, torch.tensor(lens, dtype=torch.int32, device=device), max(lens), block,
                     dim**-0.5, None).float()
    except Exception as exc:  # a kernel this GPU or build cannot run (e.g. a block size it does not page by)
        logger.warning("decode attention: blocks gathered per layer (the paged flash kernel failed its check: %s)", exc)
        return False
    keys, values = pages(cache, block)
    expected = []
    for b, (n, row) in enumerate(zip(lens, tables)):
        k, v = (t[row].flatten(0, 1)[:n].transpose(0, 1).float() for t in (keys, values))  # [Hkv, n, D]
        out = torch.nn.functional.scaled_dot_product_attention(
            q[b, :, None].float(), k, v, scale=dim**-0.5, enable_gqa=True
        )
        expected.append(out.reshape(-1))
    return agrees(got, torch.stack(expected), "decode attention: blocks gathered per layer",
                  "decode attention: FlashAttention paged kernel (reads the cache in place)")


# Whether CUDA decode on a device takes this kernel: checked once per device, the reason logged.
usable = once_per_device(_check)
