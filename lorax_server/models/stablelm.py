"""StableLM (StableLM 2, StableLM-3B-4e1t, StableCode): Llama's module names and gated MLP with LayerNorms (with
bias) instead of RMSNorms, rotary over the first `partial_rotary_factor` of each head, and, as the config says,
q/k/v biases, a LayerNorm per head of q and k before rotary (`qk_layernorm`), and attention and MLP side by side
from one input norm (`use_parallel_residual`)."""
from __future__ import annotations

from lorax_server.layers.rotary import rope_parameters
from lorax_server.models.decoder import DecoderConfig, WeightNames

ARCHITECTURES = ("StableLmForCausalLM",)
NAMES = WeightNames(q_norm="q_layernorm", k_norm="k_layernorm")
PARALLEL_NAMES = WeightNames(q_norm="q_layernorm", k_norm="k_layernorm", mlp_norm=None)


def read_config(cfg: dict) -> DecoderConfig:
    """Configs that leave `partial_rotary_factor` out rotate a quarter of each head, as transformers reads them."""
    rope = rope_parameters({"partial_rotary_factor": 0.25, **cfg})
    parallel = bool(cfg.get("use_parallel_residual", False))
    return DecoderConfig.from_dict(
        cfg,
        rms_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        norm="layer",
        qkv_bias=bool(cfg.get("use_qkv_bias", False)),
        qk_norm=bool(cfg.get("qk_layernorm", False)),
        qk_norm_per_head=True,
        parallel_residual=parallel,
        names=PARALLEL_NAMES if parallel else NAMES,
        rope={"all": rope},
    )
