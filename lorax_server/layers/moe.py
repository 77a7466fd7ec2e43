"""The sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): a router picks each token's top-k experts and
their weights; each expert then runs once over all the tokens routed to it (a loop over experts, never over tokens),
and its weighted outputs are added back into those tokens' rows, experts in index order as transformers adds them.
Qwen2-MoE adds a shared expert that every token runs, scaled by a sigmoid gate.

Tensor-parallel like the dense MLP: every rank holds each expert's slice of intermediate features (gate/up rows,
down columns) and the whole router, so all ranks route alike and the caller all-reduces the partial outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lorax_server.dist import Parallel
from lorax_server.layers.linear import Linear
from lorax_server.layers.quantized import QuantizedLinear
from lorax_server.weights import Weights


@dataclass(frozen=True)
class SharedExpert:
    """Qwen2-MoE's expert that every token runs: a gated MLP under `prefix`, scaled by sigmoid(x @ gate)."""

    prefix: str  # "mlp.shared_expert"
    gate: str  # "mlp.shared_expert_gate"
    intermediate_size: int


@dataclass(frozen=True)
class MoeConfig:
    """The experts' count and size, how many each token uses, which layers have them (the others keep the dense MLP),
    and the checkpoint's names (within a layer) for them."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of each expert
    normalize_top_k: bool  # the top-k weights renormalised to sum to one (else the softmax's own)
    layers: tuple[int, ...]
    router: str  # the router's linear, e.g. "block_sparse_moe.gate"
    expert: str  # an expert's prefix with `{}` for its index, e.g. "block_sparse_moe.experts.{}"
    projections: tuple[str, str, str]  # gate, up and down within an expert, e.g. ("w1", "w3", "w2")
    shared: SharedExpert | None = None


class SparseMoe:
    """One layer's router and this rank's slices of its experts."""

    def __init__(
        self, cfg: MoeConfig, weights: Weights, prefix: str, parallel: Parallel,
        act: Callable[[torch.Tensor], torch.Tensor],
    ):
        """prefix: the layer's ("model.layers.3")."""
        self.top_k, self.normalize, self.act = cfg.top_k, cfg.normalize_top_k, act
        inter = parallel.split_uneven(cfg.intermediate_size)
        self.inter = inter[1] - inter[0]
        self.router = weights.get(f"{prefix}.{cfg.router}.weight")
        gate, up, down = cfg.projections
        experts = [f"{prefix}.{cfg.expert.format(e)}" for e in range(cfg.num_experts)]
        self.gate_up: list[Linear | QuantizedLinear] = [
            weights.linear_rows([(f"{e}.{gate}", *inter), (f"{e}.{up}", *inter)]) for e in experts
        ]
        self.down: list[Linear | QuantizedLinear] = [weights.linear_cols(f"{e}.{down}", *inter) for e in experts]
        self.shared = None if cfg.shared is None else GatedSharedExpert(cfg.shared, weights, prefix, parallel, act)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k experts [T, k] and their weights [T, k] (float32): softmax over all experts, the top
        k renormalised to sum to one where the family does so."""
        probs = F.softmax(F.linear(x, self.router).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return experts, weights / weights.sum(dim=-1, keepdim=True) if self.normalize else weights

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial MLP output for tokens x [T, hidden]. The tokens per expert are read to the host once
        per call (the sizes of the per-expert matmuls)."""
        experts, weights = self.route(x)
        choices = experts.flatten()  # [T * k]: the expert of each (token, choice)
        order = choices.argsort(stable=True)
        counts = torch.bincount(choices, minlength=len(self.down)).tolist()
        tokens, choice_weights = order // self.top_k, weights.flatten()[order]
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = tokens[start : start + count]
                gate, up = self.gate_up[expert](x[rows]).split([self.inter, self.inter], dim=-1)
                y = self.down[expert](self.act(gate) * up) * choice_weights[start : start + count, None]
                out.index_add_(0, rows, y.to(out.dtype))
            start += count
        return out if self.shared is None else out + self.shared(x)


class GatedSharedExpert:
    """This rank's slice of Qwen2-MoE's shared expert (split like a dense MLP) and its whole gate."""

    def __init__(
        self, cfg: SharedExpert, weights: Weights, prefix: str, parallel: Parallel,
        act: Callable[[torch.Tensor], torch.Tensor],
    ):
        start, stop = parallel.split_uneven(cfg.intermediate_size)
        mlp = f"{prefix}.{cfg.prefix}"
        self.act, self.inter = act, stop - start
        self.gate = weights.get(f"{prefix}.{cfg.gate}.weight")
        self.gate_up = weights.linear_rows([(f"{mlp}.gate_proj", start, stop), (f"{mlp}.up_proj", start, stop)])
        self.down = weights.linear_cols(f"{mlp}.down_proj", start, stop)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split([self.inter, self.inter], dim=-1)
        return torch.sigmoid(F.linear(x, self.gate)) * self.down(self.act(gate) * up)
