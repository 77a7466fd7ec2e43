"""Falcon (7B, 40B, 180B, Falcon 2, the RefinedWeb models): LayerNorms, one fused `query_key_value` projection, a
plain GELU MLP (`dense_h_to_4h`, `dense_4h_to_h`), biases on every linear when `bias` is set, and tied embeddings.

The fused projection's layout follows the config: the new decoder architecture (40B, 180B) keeps each KV head's
query heads, key and value together; the first Falcons keep each head's q, k, v together, unless they are
multi-query (7B: all query heads, then the one key and value). Attention and MLP read the layer input side by side
(`parallel_attn`) through one input norm, or through two (`ln_attn`, `ln_mlp`) in the new architecture, else one
after the other with a second norm between. Positions are rotary, or ALiBi biases where `alibi` is set (Falcon-RW)."""
from __future__ import annotations

import torch

from lorax_server.layers.alibi import alibi_slopes
from lorax_server.models.decoder import DecoderConfig, WeightNames, layer_norm_config

ARCHITECTURES = ("FalconForCausalLM",)


def names(input_norm: str, mlp_norm: str | None) -> WeightNames:
    """Falcon's (and Bloom's) module names, with the layer's norms."""
    return WeightNames(
        base="transformer", embed="word_embeddings", layers="h", final_norm="ln_f", attention="self_attention",
        qkv=("query_key_value",), o="dense", gate_up=("dense_h_to_4h",), down="dense_4h_to_h",
        input_norm=input_norm, mlp_norm=mlp_norm,
    )


def read_config(cfg: dict) -> DecoderConfig:
    """With `alibi` (Falcon-RW), the bias is added before the 1/sqrt(head_dim) scale, and transformers rounds the
    slopes to bfloat16: so are ours, then scaled."""
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    slopes = None
    if cfg.get("alibi"):
        rounded = torch.tensor(alibi_slopes(heads)).bfloat16().float() * (hidden // heads) ** -0.5
        slopes = tuple(rounded.tolist())
    new = bool(cfg.get("new_decoder_architecture", False))
    multi_query = bool(cfg.get("multi_query", True))
    parallel = bool(cfg.get("parallel_attn", True))
    if new:
        if not parallel:
            raise ValueError("Falcon's new decoder architecture with parallel_attn=false is not a model transformers "
                             "runs")
        kv_heads = cfg.get("num_kv_heads") or heads
        two_norms = (cfg.get("num_ln_in_parallel_attn") or 2) == 2
        layer_names = names("ln_attn", "ln_mlp") if two_norms else names("input_layernorm", None)
    else:
        kv_heads = 1 if multi_query else heads
        layer_names = names("input_layernorm", None if parallel else "post_attention_layernorm")
    bias = bool(cfg.get("bias", False))
    sizes = {
        **cfg, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "intermediate_size": cfg.get("ffn_hidden_size") or 4 * hidden,
    }
    return layer_norm_config(
        sizes, cfg,
        activation=cfg.get("activation") or "gelu",
        names=layer_names,
        qkv_grouped=new or not multi_query,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        parallel_residual=parallel,
        alibi_slopes=slopes,
    )
