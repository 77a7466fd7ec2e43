"""Qwen3 (dense): the plain decoder with an RMSNorm over each head of q and k before rotary, and no q/k/v bias
unless `attention_bias` is set."""
from __future__ import annotations

from lorax_server.models.decoder import DecoderConfig, layer_types, layer_windows

ARCHITECTURES = ("Qwen3ForCausalLM",)


def read_config(cfg: dict) -> DecoderConfig:
    """Like Qwen2, a window applies only with `use_sliding_window`, from layer `max_window_layers` on."""
    attention_bias = bool(cfg.get("attention_bias", False))
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    first_sliding = int(cfg.get("max_window_layers", 0))
    return DecoderConfig.from_dict(
        cfg,
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        qk_norm=True,
        layer_windows=layer_windows(layer_types(cfg, lambda i: i >= first_sliding), window),
    )
