"""Gemma, Gemma 2 and Gemma 3 (text): the decoder with (1 + weight) RMSNorms, embeddings times sqrt(hidden_size)
rounded to the model dtype and a GELU-tanh MLP. Gemma 2 and 3 add norms after attention and after the MLP, scale
scores by `query_pre_attn_scalar` and alternate sliding-window layers with global ones; Gemma 2 soft-caps attention
scores and logits; Gemma 3 norms each q/k head instead and gives sliding and global layers their own rotary base."""
from __future__ import annotations

from lorax_server.layers.rotary import rope_parameters
from lorax_server.models.decoder import DecoderConfig, layer_types, layer_windows

ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
_GLOBAL_THETA = 1_000_000.0  # Gemma 3's full-attention rotary base when config.json leaves it out


def _get(cfg: dict, key: str, default):
    """config.json's value where present (null included: it switches a feature off), else transformers' default."""
    return cfg[key] if key in cfg else default


def read_config(cfg: dict) -> DecoderConfig:
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("Gemma checkpoints with bidirectional attention (embedding models) cannot generate")
    arch = (cfg.get("architectures") or [""])[0]
    every_gemma = dict(
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        qkv_bias=bool(cfg.get("attention_bias", False)),
        o_bias=bool(cfg.get("attention_bias", False)),
        unit_offset_norms=True,
        embedding_multiplier=cfg["hidden_size"] ** 0.5,
        embedding_multiplier_in_dtype=True,
    )
    if arch == "GemmaForCausalLM":  # its checkpoints' legacy hidden_act "gelu" means the tanh approximation
        activation = cfg.get("hidden_act") or "gelu_pytorch_tanh"
        return DecoderConfig.from_dict(
            cfg, activation="gelu_pytorch_tanh" if activation == "gelu" else activation, **every_gemma
        )
    if arch == "Gemma2ForCausalLM":
        types = layer_types(cfg, lambda i: i % 2 == 0)
        version = dict(
            attn_softcap=_get(cfg, "attn_logit_softcapping", 50.0),
            final_softcap=_get(cfg, "final_logit_softcapping", 30.0),
        )
    else:  # transformers' Gemma 3 takes no attention soft-cap, whatever the config says
        pattern = int(cfg.get("sliding_window_pattern", 6))
        types = layer_types(cfg, lambda i: (i + 1) % pattern != 0)
        with_theta = {**cfg, "rope_theta": cfg.get("rope_theta") or _GLOBAL_THETA}
        version = dict(
            final_softcap=_get(cfg, "final_logit_softcapping", None),
            qk_norm=True,
            rope={kind: rope_parameters(with_theta, kind) for kind in set(types)},
            layer_rope=types,
        )
    return DecoderConfig.from_dict(
        cfg,
        activation=cfg.get("hidden_activation") or "gelu_pytorch_tanh",
        layer_windows=layer_windows(types, _get(cfg, "sliding_window", 4096)),
        sandwich_norms=True,
        attention_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
        **version,
        **every_gemma,
    )
