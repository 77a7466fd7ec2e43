"""GPT-Neo (125M, 1.3B, 2.7B): learned absolute position embeddings (`wpe`) instead of rotary, layers alternating
global attention and local attention over the last `window_size` positions (`attention_types`), scores not scaled
by 1/sqrt(head_dim), LayerNorms with bias, q/k/v without bias and `out_proj` with bias, a plain GELU (tanh) MLP
(`c_fc`, `c_proj`) with biases, tied embeddings."""
from __future__ import annotations

from lorax_server.models.decoder import DecoderConfig, WeightNames, layer_norm_config

ARCHITECTURES = ("GPTNeoForCausalLM",)
NAMES = WeightNames(
    base="transformer", embed="wte", positions="wpe", layers="h", final_norm="ln_f", attention="attn.attention",
    o="out_proj", gate_up=("c_fc",), down="c_proj", input_norm="ln_1", mlp_norm="ln_2",
)


def attention_kinds(cfg: dict) -> tuple[str, ...]:
    """Each layer's attention, "global" or "local": `attention_types` lists [kinds, repeats] pairs whose kinds are
    repeated in turn (transformers' default: global, local, twelve times)."""
    types = cfg.get("attention_types") or [[["global", "local"], 12]]
    kinds = tuple(kind for pattern, repeats in types for _ in range(repeats) for kind in pattern)
    if len(kinds) != cfg["num_layers"] or not set(kinds) <= {"global", "local"}:
        raise ValueError(f"GPT-Neo attention_types {types} do not give global/local attention for each of the "
                         f"{cfg['num_layers']} layers")
    return kinds


def read_config(cfg: dict) -> DecoderConfig:
    """GPT-Neo's config.json names its sizes num_heads and num_layers; the MLP is four times the width unless
    intermediate_size says otherwise."""
    heads, hidden = cfg["num_heads"], cfg["hidden_size"]
    window = int(cfg.get("window_size", 256))
    sizes = {
        **cfg, "num_attention_heads": heads, "num_hidden_layers": cfg["num_layers"], "head_dim": hidden // heads,
        "intermediate_size": cfg.get("intermediate_size") or 4 * hidden,
        "max_position_embeddings": int(cfg.get("max_position_embeddings", 2048)),
    }
    return layer_norm_config(
        sizes, cfg,
        activation=cfg.get("activation_function") or "gelu_new",
        names=NAMES,
        o_bias=True,
        mlp_bias=True,
        attention_scale=1.0,
        layer_windows=tuple(window if kind == "local" else None for kind in attention_kinds(cfg)),
    )
