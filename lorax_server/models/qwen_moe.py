"""Qwen2-MoE and Qwen3-MoE: Qwen2's attention (q/k/v bias) or Qwen3's (q/k norms) over the sparse mixture-of-experts
MLP of layers/moe.py in every `decoder_sparse_step`-th layer outside `mlp_only_layers` (the others keep a dense MLP
of `intermediate_size`); Qwen2-MoE adds its gated shared expert. Adapters apply to the attention projections only."""
from __future__ import annotations

from lorax_server.layers.moe import MoeConfig, SharedExpert
from lorax_server.models.decoder import DecoderConfig, layer_types, layer_windows

ARCHITECTURES = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


def read_config(cfg: dict) -> DecoderConfig:
    """Windows as transformers sets them: Qwen3-MoE slides every layer when `use_sliding_window`; Qwen2-MoE the
    even-indexed layers below `max_window_layers` (or its saved `layer_types`)."""
    layers = cfg["num_hidden_layers"]
    qwen2 = cfg["architectures"][0] == "Qwen2MoeForCausalLM"
    num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    step, dense = int(cfg.get("decoder_sparse_step", 1)), set(cfg.get("mlp_only_layers") or [])
    moe = MoeConfig(
        num_experts=num_experts,
        top_k=int(cfg["num_experts_per_tok"]),
        intermediate_size=int(cfg["moe_intermediate_size"]),
        normalize_top_k=bool(cfg.get("norm_topk_prob", False)),
        layers=tuple(i for i in range(layers) if num_experts and i not in dense and (i + 1) % step == 0),
        router="mlp.gate",
        expert="mlp.experts.{}",
        projections=("gate_proj", "up_proj", "down_proj"),
        shared=SharedExpert("mlp.shared_expert", "mlp.shared_expert_gate", int(cfg["shared_expert_intermediate_size"]))
        if qwen2 else None,
    )
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    if qwen2:
        below = int(cfg.get("max_window_layers", layers))
        windows = layer_windows(layer_types(cfg, lambda i: i % 2 == 0 and i < below), window or None)
        bias = dict(qkv_bias=bool(cfg.get("qkv_bias", True)))
    else:
        windows = (window,) * layers
        bias = dict(qkv_bias=bool(cfg.get("attention_bias", False)), o_bias=bool(cfg.get("attention_bias", False)),
                    qk_norm=True)
    return DecoderConfig.from_dict(cfg, moe=moe, layer_windows=windows, **bias)
