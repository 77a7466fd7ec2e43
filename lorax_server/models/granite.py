"""IBM Granite (dense): the plain decoder with muP-style multipliers on the embeddings, the residual branches and
the attention scores, and logits divided by `logits_scaling`."""
from __future__ import annotations

from lorax_server.models.decoder import DecoderConfig

ARCHITECTURES = ("GraniteForCausalLM",)


def read_config(cfg: dict) -> DecoderConfig:
    """`attention_multiplier` replaces 1/sqrt(head_dim) as the score scale."""
    attention_bias = bool(cfg.get("attention_bias", False))
    return DecoderConfig.from_dict(
        cfg,
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        attention_scale=float(cfg.get("attention_multiplier", 1.0)),
        embedding_multiplier=float(cfg.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(cfg.get("residual_multiplier", 1.0)),
        logits_scaling=float(cfg.get("logits_scaling", 1.0)),
    )
