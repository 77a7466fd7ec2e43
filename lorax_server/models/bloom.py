"""Bloom (BLOOM, BLOOMZ): ALiBi position biases instead of rotary, a LayerNorm over the embeddings, and Falcon's
module names with each head's q, k, v together in `query_key_value`; LayerNorms, a plain GELU (tanh) MLP of four
times the hidden size, biases on every linear, tied embeddings."""
from __future__ import annotations

from dataclasses import replace

from lorax_server.layers.alibi import alibi_slopes
from lorax_server.models.decoder import DecoderConfig, layer_norm_config
from lorax_server.models.falcon import names

ARCHITECTURES = ("BloomForCausalLM",)
NAMES = replace(names("input_layernorm", "post_attention_layernorm"), embed_norm="word_embeddings_layernorm")


def read_config(cfg: dict) -> DecoderConfig:
    """Bloom's config.json names its sizes `n_head`, `n_layer` (and in old checkpoints `n_embed`)."""
    if cfg.get("apply_residual_connection_post_layernorm"):
        raise ValueError("Bloom with apply_residual_connection_post_layernorm=true is not supported")
    heads = cfg.get("n_head") or cfg["num_attention_heads"]
    hidden = cfg.get("hidden_size") or cfg["n_embed"]
    sizes = {
        **cfg, "num_attention_heads": heads, "num_hidden_layers": cfg.get("n_layer") or cfg["num_hidden_layers"],
        "hidden_size": hidden, "intermediate_size": 4 * hidden, "head_dim": hidden // heads,
    }
    return layer_norm_config(
        sizes, cfg,
        activation="gelu_pytorch_tanh",
        names=NAMES,
        qkv_grouped=True,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        alibi_slopes=tuple(alibi_slopes(heads)),
    )
