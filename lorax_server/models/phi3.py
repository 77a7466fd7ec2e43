"""Phi-3, Phi-3.5 (mini, medium) and Phi-4-mini: the Llama decoder whose checkpoint fuses q/k/v into one `qkv_proj`
and gate/up into one `gate_up_proj` (sliced per rank part by part; adapters target those fused modules by name), with
`longrope` rotary scaling for the long-context variants (over part of each head on Phi-4-mini) and, when set, one
sliding window over every layer."""
from __future__ import annotations

from lorax_server.layers.rotary import rope_parameters
from lorax_server.models.decoder import DecoderConfig, WeightNames

ARCHITECTURES = ("Phi3ForCausalLM",)
NAMES = WeightNames(qkv=("qkv_proj",), gate_up=("gate_up_proj",))


def read_config(cfg: dict) -> DecoderConfig:
    """transformers reads a Phi-3 rope type of `su` (the original name) or `yarn` as `longrope`, and so do we."""
    rope = rope_parameters(cfg)
    if rope["rope_type"] == "yarn":
        rope["rope_type"] = "longrope"
    return DecoderConfig.from_dict(
        cfg,
        names=NAMES,
        rope={"all": rope},
        layer_windows=(cfg.get("sliding_window"),) * cfg["num_hidden_layers"],
    )
