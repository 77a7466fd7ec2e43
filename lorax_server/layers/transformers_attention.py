"""Our paged attention as a transformers attention implementation, so a model's own modeling code attends over the
paged KV cache of a flat batch of many requests.

transformers calls the function registered under `NAME` with each layer's q/k/v ([1, heads, tokens, head_dim]: the
whole flat batch as one "sequence") and forwards the model's extra keyword arguments to it: `lorax_step` carries the
step's attention metadata and KV cache. Attention implementations transformers has no mask function for get no mask
built (masking_utils), so the only masking is ours: each request sees its own earlier tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lorax_server.layers.attention import AttentionMetadata, paged_attention

NAME = "lorax_paged"


@dataclass(frozen=True)
class LayerAttention:
    """What one layer's attention call showed at the load-time probe."""

    layer: int | None
    kv_heads: int
    head_dim: int
    value_dim: int
    query_dim: int
    causal: bool
    masked: bool  # the model built an attention mask of its own (e.g. ALiBi biases): ours would ignore it
    sinks: bool  # attention sinks (`s_aux`), which paged attention does not add
    sliding: bool  # the call named its own sliding window


@dataclass
class Step:
    """One forward's attention inputs; without a cache it is the probe that records each layer's call instead."""

    meta: AttentionMetadata | None = None
    kv_cache: torch.Tensor | None = None  # [layers, 2, kv_heads, slots, head_dim]
    seen: list[LayerAttention] = field(default_factory=list)


def _probe(step: Step, module, query, key, value, mask, scaling, kwargs) -> torch.Tensor:
    step.seen.append(LayerAttention(
        getattr(module, "layer_idx", None), key.shape[1], key.shape[-1], value.shape[-1], query.shape[-1],
        getattr(module, "is_causal", True), mask is not None, kwargs.get("s_aux") is not None,
        bool(kwargs.get("sliding_window")),
    ))
    out = F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    lorax_step: Step | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature; returns [1, tokens, heads, head_dim] as its implementations do."""
    if lorax_step is None:
        raise RuntimeError(f"attention '{NAME}' runs only inside a lorax forward (no `lorax_step` was passed)")
    if lorax_step.kv_cache is None:
        return _probe(lorax_step, module, query, key, value, attention_mask, scaling, kwargs), None
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, head_dim]
    out = paged_attention(
        q, k, v, lorax_step.kv_cache[module.layer_idx], lorax_step.meta, scaling or query.shape[-1] ** -0.5,
        kwargs.get("sliding_window") or None, kwargs.get("softcap"),  # some configs say 0 for no window
    )
    return out.view(1, q.shape[0], q.shape[1], q.shape[2]), None


def register() -> str:
    """Make the implementation known to transformers (importing transformers' modeling code only when a model needs
    it); returns the `attn_implementation` name to load models with."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, paged_attention_forward)
    return NAME
