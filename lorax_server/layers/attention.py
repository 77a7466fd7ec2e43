"""Attention over a paged KV cache for a flat, unpadded batch of many requests.

Each forward writes its new keys/values into cache slots, then every request attends to its own blocks.
Keys and values are gathered a whole block at a time (one contiguous copy per block and head, not per token),
and requests of different lengths are handled by masking, so there is no Python loop over requests. Prefill
(many query tokens) uses the fused SDPA kernel; decode (one query per request) uses two batched matmuls over
(kv head, request) with a float32 softmax: on CPU that is several times faster than SDPA for a single query.
Decode reads each request's cache blocks in place, with no copy and no mask, where a kernel for the device and
dtype exists: on CPU a small C++ kernel for float32 (`cpu_ops.py`), on CUDA FlashAttention's paged kernel
(`flash_decode.py`, after a start-up check); prefill on CUDA takes FlashAttention over the prompts' own keys
(`flash_prefill.py`). The gathered path above stays for the rest and for prefill on CPU.
Layers with their own sliding window (Gemma's alternating local/global layers) narrow the shared mask, once per
forward and window; tanh soft-capping of the scores (Gemma 2), which SDPA cannot do, takes the explicit path.
ALiBi heads (Bloom, Falcon-RW) add slope * (key position - query position) to their scores as a float bias, on
the masked paths only (no in-place decode or flash kernel takes a bias).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from lorax_server.layers import cpu_ops, flash_decode, flash_prefill


@dataclass
class AttentionMetadata:
    """Index tensors shared by every layer of one forward pass."""

    positions: torch.Tensor  # [T] absolute position of each new token
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    query_index: torch.Tensor  # [B, Q] flat token index of each request's i-th query (padding -> 0)
    output_index: torch.Tensor  # [T] row of the padded [B*Q] output that holds each flat token
    key_blocks: torch.Tensor  # [B, K/block_size] cache block holding each request's keys (padding -> 0)
    block_size: int
    mask: torch.Tensor | None  # [B, 1, Q, K] True where a query may attend to a key (None: built when first needed)
    decode_bias: torch.Tensor | None  # [B, 1, K] float32 0 / -inf: the mask as decode attention adds it
    query_positions: torch.Tensor  # [B, Q] absolute position of each request's i-th query (padding -> 0)
    build_mask: Callable[[], torch.Tensor] | None = None  # the dense mask, for layers that need it after all
    cu_seqlens: torch.Tensor | None = None  # [B+1] int32 prompt starts: CUDA prefill reads each prompt's own K/V
    paged: tuple[torch.Tensor, torch.Tensor] | None = None  # (block table, kv lens): decode reads blocks in place
    max_query: int = 1
    max_kv: int = 0
    sliding_window: int | None = None
    _key_rows: torch.Tensor | None = None
    _distances: torch.Tensor | None = None
    _windowed: dict = field(default_factory=dict)

    def key_rows(self, heads: int, cache_blocks: int) -> torch.Tensor:
        """[heads * B * K/block_size] rows of a layer's cache viewed as [heads * cache_blocks, block] holding each
        (key or value) head's blocks, head-major; built once per forward. (Selecting rows of a 2-D view is several times faster
        than index_select along the middle dimension.)"""
        if self._key_rows is None:
            offsets = torch.arange(heads, device=self.key_blocks.device)[:, None] * cache_blocks
            self._key_rows = (offsets + self.key_blocks.view(1, -1)).view(-1)
        return self._key_rows

    def key_distances(self) -> torch.Tensor:
        """[B, Q, K] float32 key position minus query position (ALiBi's bias before each head's slope); built once
        per forward."""
        if self._distances is None:
            keys = torch.arange(self.key_blocks.shape[1] * self.block_size, device=self.query_positions.device)
            self._distances = (keys - self.query_positions[:, :, None]).float()
        return self._distances

    def masks(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mask, decode_bias) for a layer that sees the shared mask (window None) narrowed to the last `window`
        positions; built once per forward and window. Padded queries keep key 0 (0 > -window)."""
        if self.mask is None:
            self.mask = self.build_mask()
            if self.max_query == 1:
                self.decode_bias = _decode_bias(self.mask)
        if window is None:
            return self.mask, self.decode_bias
        if window not in self._windowed:
            keys = torch.arange(self.mask.shape[-1], device=self.mask.device)
            mask = self.mask & (keys > self.query_positions[:, None, :, None] - window)
            self._windowed[window] = mask, _decode_bias(mask) if self.max_query == 1 else None
        return self._windowed[window]


def _decode_bias(mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, K] float32 0 / -inf from a one-query [B, 1, 1, K] mask: what decode attention adds to its scores."""
    return torch.zeros(mask.shape[:1] + mask.shape[2:], dtype=torch.float32, device=mask.device).masked_fill_(
        ~mask[:, 0], float("-inf")
    )


def build_metadata(
    query_lens: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    block_size: int,
    sliding_window: int | None,
    max_query: int,
    max_kv: int,
) -> AttentionMetadata:
    """Index tensors for requests that add `query_lens` tokens and then hold `kv_lens` tokens in total.

    The new tokens of request b sit at positions kv_lens[b]-query_lens[b] .. kv_lens[b]-1; flat tokens are
    ordered request by request. The maxima of both lengths come from the host, which knows them, so that building
    the metadata never waits for the device; a decode step (one query each) needs no boolean selection either.
    """
    device = query_lens.device
    batch = query_lens.shape[0]
    num_blocks = -(-max_kv // block_size)
    q_range = torch.arange(max_query, device=device)
    q_valid = q_range[None, :] < query_lens[:, None]
    q_pos = (kv_lens - query_lens)[:, None] + q_range[None, :]
    q_pos_safe = torch.where(q_valid, q_pos, 0)

    starts = torch.cumsum(query_lens, 0) - query_lens
    query_index = torch.where(q_valid, starts[:, None] + q_range[None, :], 0)
    block_of = block_tables.gather(1, torch.div(q_pos_safe, block_size, rounding_mode="floor"))
    slots = block_of * block_size + q_pos_safe % block_size
    if max_query == 1:
        positions, slot_mapping, output_index = q_pos[:, 0], slots[:, 0], torch.arange(batch, device=device)
    else:
        positions, slot_mapping = q_pos[q_valid], slots[q_valid]
        output_index = (torch.arange(batch, device=device)[:, None] * max_query + q_range[None, :])[q_valid]

    def build_mask() -> torch.Tensor:
        k_range = torch.arange(num_blocks * block_size, device=device)
        mask = (k_range[None, None, :] <= q_pos[:, :, None]) & (k_range[None, None, :] < kv_lens[:, None, None])
        if sliding_window:
            mask &= k_range[None, None, :] > q_pos[:, :, None] - sliding_window
        mask[:, :, 0] |= ~q_valid  # padded queries attend to one key so the softmax stays finite
        return mask.unsqueeze(1)

    key_blocks = block_tables[:, :num_blocks].contiguous()
    mask, decode_bias, cu_seqlens, paged = None, None, None, None
    if max_query == 1 and (device.type == "cpu" or flash_decode.usable(device)):  # no mask: blocks read in place
        index = torch.int64 if device.type == "cpu" else torch.int32
        paged = key_blocks.to(index), kv_lens.to(index)
    elif max_query == 1:
        mask = build_mask()
        decode_bias = _decode_bias(mask)
    elif flash_prefill.usable(device):  # no dense [B, Q, K] mask: each prompt attends to its own keys
        cu_seqlens = F.pad(torch.cumsum(query_lens, 0), (1, 0)).to(torch.int32)
    else:
        mask = build_mask()
    return AttentionMetadata(
        positions=positions,
        slot_mapping=slot_mapping,
        query_index=query_index,
        output_index=output_index,
        key_blocks=key_blocks,
        block_size=block_size,
        mask=mask,
        decode_bias=decode_bias,
        query_positions=q_pos_safe,
        build_mask=build_mask,
        cu_seqlens=cu_seqlens,
        paged=paged,
        max_query=max_query,
        max_kv=max_kv,
        sliding_window=sliding_window,
    )


def _gather_blocks(kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """[2 * Hkv, B, K, D]: each request's cache blocks laid end to end, keys' heads then values' heads."""
    heads, slots, dim = kv_cache.shape[0] * kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3]
    cache_blocks = slots // meta.block_size
    rows = kv_cache.view(heads * cache_blocks, meta.block_size * dim).index_select(0, meta.key_rows(heads, cache_blocks))
    return rows.view(heads, meta.key_blocks.shape[0], -1, dim)


def _alibi_bias(slopes: torch.Tensor, meta: AttentionMetadata, mask: torch.Tensor) -> torch.Tensor:
    """[B, H, Q, K] float32: each head's slope times (key - query position) where `mask` [B, 1, Q, K] allows, -inf
    elsewhere."""
    bias = slopes[None, :, None, None] * meta.key_distances()[:, None]
    return bias.masked_fill_(~mask, float("-inf"))


def _soft_cap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    return scores if cap is None else torch.tanh(scores / cap) * cap


def _decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float, softcap: float | None
) -> torch.Tensor:
    """q [B, H, D] against keys/values [Hkv, B, K, D]; query head h reads KV head h // (H / Hkv)."""
    batch, heads, dim = q.shape
    kv_heads = keys.shape[0]
    grouped = q.view(batch, kv_heads, heads // kv_heads, dim).transpose(0, 1)  # [Hkv, B, group, D]
    scores = _soft_cap(torch.matmul(grouped, keys.transpose(-1, -2)) * scale, softcap) + bias  # [Hkv, B, group, K], float32
    probs = scores.softmax(-1).to(q.dtype)
    return torch.matmul(probs, values).transpose(0, 1).reshape(batch, heads * dim)


def _capped_prefill_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float
) -> torch.Tensor:
    """queries [B, H, Q, D] against keys/values [B, Hkv, K, D] with soft-capped scores and a float32 softmax; `mask`
    is boolean, or a float bias added after the cap."""
    batch, heads, max_q, dim = queries.shape
    kv_heads = keys.shape[1]
    grouped = queries.reshape(batch, kv_heads, heads // kv_heads * max_q, dim)
    scores = _soft_cap(torch.matmul(grouped, keys.transpose(-1, -2)) * scale, softcap)
    scores = scores.view(batch, heads, max_q, -1)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(-1, dtype=torch.float32).to(queries.dtype).view(batch, kv_heads, -1, keys.shape[2])
    return torch.matmul(probs, values).view(batch, heads, max_q, dim)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    alibi: torch.Tensor | None = None,
) -> torch.Tensor:
    """Store k/v ([T, kv_heads, D]) in one layer's cache ([2, kv_heads, slots, D]), attend q ([T, heads, D]);
    returns [T, heads*D]. Keys and values move together: one write and one gather per layer. `window`: this
    layer's own sliding window on top of the shared mask; `softcap`: scores become tanh(s / cap) * cap; `alibi`: the
    float32 slopes [heads] of ALiBi heads, which take the masked paths only."""
    kv_heads = k.shape[1]
    new = torch.cat([k, v], dim=1).transpose(0, 1)  # [2 * Hkv, T, D]
    kv_cache.view(2 * kv_heads, -1, k.shape[2]).index_copy_(1, meta.slot_mapping, new)
    windows = [w for w in (meta.sliding_window, window) if w]
    # decode, where a kernel reads the blocks in place (else the masks are built now); ALiBi heads take the masks,
    # as no such kernel adds their bias
    if meta.paged is not None and alibi is None:
        seen = min(windows, default=None)  # the keys a query sees: the narrower of the shared and the layer's window
        if q.device.type == "cpu" and cpu_ops.supports(q.dtype):
            return cpu_ops.attend(q, kv_cache, *meta.paged, meta.block_size, scale, seen, softcap)
        if q.device.type == "cuda" and softcap is None and flash_decode.supports(q.dtype, q.shape[-1]):
            return flash_decode.attend(q, kv_cache, *meta.paged, meta.max_kv, meta.block_size, scale, seen)
    if (meta.cu_seqlens is not None and softcap is None and alibi is None
            and flash_prefill.supports(q.dtype, q.shape[-1])):
        return flash_prefill.attend(q, k, v, meta.cu_seqlens, meta.max_query, scale, min(windows, default=None))
    gathered = _gather_blocks(kv_cache, meta)
    keys, values = gathered[:kv_heads], gathered[kv_heads:]
    mask, decode_bias = meta.masks(window)
    batch, max_q = meta.query_index.shape
    heads, dim = q.shape[1], q.shape[2]
    if alibi is not None:
        mask = _alibi_bias(alibi, meta, mask)
        if decode_bias is not None:  # [Hkv, B, group, K], as the decode scores
            decode_bias = mask.view(batch, kv_heads, heads // kv_heads, -1).transpose(0, 1)
        elif softcap is None:  # SDPA adds a float mask of the queries' dtype
            mask = mask.to(q.dtype)
    if decode_bias is not None:
        return _decode_attention(q, keys, values, decode_bias, scale, softcap)
    queries = q[meta.query_index].transpose(1, 2)  # [B, H, Q, D]
    if softcap is not None:
        out = _capped_prefill_attention(queries, keys.transpose(0, 1), values.transpose(0, 1), mask, scale, softcap)
    else:
        out = F.scaled_dot_product_attention(
            queries, keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask, scale=scale,
            enable_gqa=heads != kv_heads,
        )
    out = out.transpose(1, 2).reshape(batch * max_q, heads * dim)
    return out[meta.output_index]
