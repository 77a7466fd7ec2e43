"""Attention over a paged KV cache for a flat, unpadded batch of many requests.

Each forward writes its new keys/values into cache slots, then every request attends to its own slots.
Requests of different lengths are handled by one padded gather + one masked SDPA call per layer, so there is
no Python loop over requests; prefill (many query tokens) and decode (one per request) share the code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Index tensors shared by every layer of one forward pass."""

    positions: torch.Tensor  # [T] absolute position of each new token
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    query_index: torch.Tensor  # [B, Q] flat token index of each request's i-th query (padding -> 0)
    output_index: torch.Tensor  # [T] row of the padded [B*Q] output that holds each flat token
    key_slots: torch.Tensor  # [B, K] cache slot of each request's j-th key (padding -> 0)
    mask: torch.Tensor  # [B, 1, Q, K] True where a query may attend to a key


def build_metadata(
    query_lens: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    block_size: int,
    sliding_window: int | None = None,
) -> AttentionMetadata:
    """Index tensors for requests that add `query_lens` tokens and then hold `kv_lens` tokens in total.

    The new tokens of request b sit at positions kv_lens[b]-query_lens[b] .. kv_lens[b]-1; flat tokens are
    ordered request by request.
    """
    device = query_lens.device
    batch = query_lens.shape[0]
    max_q = int(query_lens.max())
    max_k = int(kv_lens.max())
    q_range = torch.arange(max_q, device=device)
    q_valid = q_range[None, :] < query_lens[:, None]
    q_pos = (kv_lens - query_lens)[:, None] + q_range[None, :]
    q_pos_safe = torch.where(q_valid, q_pos, 0)

    starts = torch.cumsum(query_lens, 0) - query_lens
    query_index = torch.where(q_valid, starts[:, None] + q_range[None, :], 0)
    output_index = (torch.arange(batch, device=device)[:, None] * max_q + q_range[None, :])[q_valid]

    def slots_of(pos: torch.Tensor) -> torch.Tensor:
        return block_tables.gather(1, torch.div(pos, block_size, rounding_mode="floor")) * block_size + pos % block_size

    slot_mapping = slots_of(q_pos_safe)[q_valid]
    k_range = torch.arange(max_k, device=device)
    key_slots = slots_of(k_range[None, :].expand(batch, max_k).contiguous())
    key_slots = torch.where(k_range[None, :] < kv_lens[:, None], key_slots, 0)

    mask = (k_range[None, None, :] <= q_pos[:, :, None]) & (k_range[None, None, :] < kv_lens[:, None, None])
    if sliding_window:
        mask &= k_range[None, None, :] > q_pos[:, :, None] - sliding_window
    mask[:, :, 0] |= ~q_valid  # padded queries attend to one key so the softmax stays finite
    return AttentionMetadata(
        positions=q_pos[q_valid],
        slot_mapping=slot_mapping,
        query_index=query_index,
        output_index=output_index,
        key_slots=key_slots,
        mask=mask.unsqueeze(1),
    )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Store k/v ([T, kv_heads, D]) in the cache, attend q ([T, heads, D]); returns [T, heads*D]."""
    k_cache[meta.slot_mapping] = k
    v_cache[meta.slot_mapping] = v
    batch, max_q = meta.query_index.shape
    heads, dim = q.shape[1], q.shape[2]
    queries = q[meta.query_index].transpose(1, 2)  # [B, H, Q, D]
    keys = k_cache[meta.key_slots].transpose(1, 2)  # [B, Hkv, K, D]
    values = v_cache[meta.key_slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=meta.mask, scale=scale, enable_gqa=heads != keys.shape[1]
    )
    out = out.transpose(1, 2).reshape(batch * max_q, heads * dim)
    return out[meta.output_index]
