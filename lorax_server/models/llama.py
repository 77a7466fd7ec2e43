"""The Llama family (Llama, Mistral, Qwen2, SmolLM): the plain decoder, with optional qkv bias and a sliding window."""
from __future__ import annotations

from lorax_server.models.decoder import DecoderConfig, layer_types, layer_windows

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def read_config(cfg: dict) -> DecoderConfig:
    """Qwen2 always has q/k/v biases and slides only when `use_sliding_window` says so, from layer
    `max_window_layers` on; Mistral slides in every layer whenever it has a window."""
    is_qwen2 = (cfg.get("architectures") or [""])[0] == "Qwen2ForCausalLM"
    attention_bias = bool(cfg.get("attention_bias", False))
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", not is_qwen2) else None
    first_sliding = int(cfg.get("max_window_layers", 0)) if is_qwen2 else 0
    return DecoderConfig.from_dict(
        cfg,
        qkv_bias=is_qwen2 or attention_bias,
        o_bias=attention_bias,
        layer_windows=layer_windows(layer_types(cfg, lambda i: i >= first_sliding), window),
    )
