"""Mixtral: the Mistral decoder whose MLP is a sparse mixture of experts (layers/moe.py), stored as hub checkpoints
store it (`block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1/w3/w2` for gate/up/down). Adapters apply to the
attention projections only."""
from __future__ import annotations

from lorax_server.layers.moe import MoeConfig
from lorax_server.models.decoder import DecoderConfig

ARCHITECTURES = ("MixtralForCausalLM",)


def read_config(cfg: dict) -> DecoderConfig:
    """Like Mistral, one sliding window (when set) over every layer."""
    moe = MoeConfig(
        num_experts=int(cfg["num_local_experts"]),
        top_k=int(cfg["num_experts_per_tok"]),
        intermediate_size=int(cfg["intermediate_size"]),
        normalize_top_k=True,
        layers=tuple(range(cfg["num_hidden_layers"])),
        router="block_sparse_moe.gate",
        expert="block_sparse_moe.experts.{}",
        projections=("w1", "w3", "w2"),
    )
    return DecoderConfig.from_dict(cfg, moe=moe, layer_windows=(cfg.get("sliding_window"),) * cfg["num_hidden_layers"])
