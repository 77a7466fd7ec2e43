"""MPT (MPT-7B, MPT-30B and their instruct, chat and storywriter variants): ALiBi position biases with MPT's own
slopes (`alibi_bias_max`), one fused `Wqkv` stacking all query heads, then the keys, then the values (q/k/v clamped
to `clip_qkv` where set), LayerNorms without bias, a plain GELU MLP (`up_proj`, `down_proj`) of `expansion_ratio`
times the width, no biases, tied embeddings (`wte`).

The mosaicml checkpoints name their class MPTForCausalLM (their own code); transformers' MptForCausalLM runs the same
weights, but builds its ALiBi slopes with alibi_bias_max=8 whatever the config says: here they follow the config, as
MPT's own code does (every released MPT says 8). Settings of MPT's own code that transformers does not run are
refused at start-up, so that no checkpoint runs differently from the code it was trained with."""
from __future__ import annotations

from lorax_server.layers.alibi import mpt_alibi_slopes
from lorax_server.models.decoder import DecoderConfig, WeightNames, layer_norm_config

ARCHITECTURES = ("MptForCausalLM", "MPTForCausalLM")
NAMES = WeightNames(
    base="transformer", embed="wte", layers="blocks", final_norm="norm_f", attention="attn", qkv=("Wqkv",),
    o="out_proj", mlp="ffn", gate_up=("up_proj",), down="down_proj", input_norm="norm_1", mlp_norm="norm_2",
)
EXACT_GELU = {"name": "gelu", "approximate": "none"}
LAYERNORMS = ("low_precision_layernorm", "layernorm")  # the same LayerNorm; "low precision" only under autocast


def unsupported(cfg: dict, attn: dict, ffn: dict) -> list[str]:
    """Why this MPT config (attn: its attn_config, ffn: its ffn_config) cannot be served natively: each setting, with
    what it would have needed."""
    reasons = {
        "attn_config.alibi=false (learned absolute position embeddings instead of ALiBi)": not attn.get("alibi", True),
        f"attn_config.attn_type={attn.get('attn_type')} (only multihead_attention: every head its own keys and "
        "values)": attn.get("attn_type", "multihead_attention") != "multihead_attention",
        "attn_config.qk_ln=true (LayerNorms over q and k)": bool(attn.get("qk_ln")),
        "attn_config.prefix_lm=true (bidirectional attention over a prefix)": bool(attn.get("prefix_lm")),
        "attn_config.rope=true (rotary positions)": bool(attn.get("rope")),
        f"attn_config.sliding_window_size={attn.get('sliding_window_size')} (a sliding window)":
            attn.get("sliding_window_size", -1) not in (-1, None),
        "no_bias=false (biases on the linears and norms)": not cfg.get("no_bias", True),
        f"logit_scale={cfg.get('logit_scale')} (scaled logits)": cfg.get("logit_scale") is not None,
        f"norm_type={cfg.get('norm_type')} (only LayerNorm)": cfg.get("norm_type", LAYERNORMS[0]) not in LAYERNORMS,
        f"ffn_config.ffn_type={ffn.get('ffn_type')} (only mptmlp)": ffn.get("ffn_type", "mptmlp") != "mptmlp",
        f"ffn_config.ffn_act_fn={ffn.get('ffn_act_fn')} (only exact GELU)":
            ffn.get("ffn_act_fn") not in (None, EXACT_GELU),
    }
    return [reason for reason, refused in reasons.items() if refused]


def read_config(cfg: dict) -> DecoderConfig:
    """MPT's config.json names its sizes d_model, n_heads, n_layers, expansion_ratio (or ffn_config.ffn_hidden_size)
    and max_seq_len, and nests the attention's settings in attn_config. Positions past max_seq_len are refused, as
    MPT's reference code refuses them (its ALiBi table ends there); clip_qkv 0 or null means no clamp."""
    attn, ffn = cfg.get("attn_config") or {}, cfg.get("ffn_config") or {}
    refused = unsupported(cfg, attn, ffn)
    if refused:
        raise ValueError(f"MPT with {'; '.join(refused)} is not supported")
    hidden, heads = cfg["d_model"], cfg["n_heads"]
    sizes = {
        **cfg, "hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": cfg["n_layers"],
        "intermediate_size": ffn.get("ffn_hidden_size") or int(hidden * cfg.get("expansion_ratio", 4)),
        "head_dim": hidden // heads, "max_position_embeddings": int(cfg.get("max_seq_len", 2048)),
    }
    return layer_norm_config(
        sizes, cfg,
        activation="gelu",
        names=NAMES,
        qkv_clip=attn.get("clip_qkv") or None,
        attention_scale=attn.get("softmax_scale"),
        alibi_slopes=tuple(mpt_alibi_slopes(heads, float(attn.get("alibi_bias_max", 8)))),
    )
