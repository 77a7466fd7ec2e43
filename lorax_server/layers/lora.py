"""Many LoRA adapters applied in one forward pass.

For each fused projection group (qkv, o, gate_up, down) the adapters present in the batch are laid side by
side: A_cat [layers, in, R] holds every adapter's A along the rank axis, B_cat [layers, R, out] their scaled
B (block-diagonal across q/k/v or gate/up). A token then uses only its own adapter's rank columns:

    y += ((x @ A_cat) * mask) @ B_cat,    mask[t, c] = 1 iff rank column c belongs to token t's adapter

Two dense matmuls per group and layer for the whole batch, whatever mix of adapters and ranks it holds:
no loop over requests or adapters, no weight merging, and tokens without an adapter get an exact zero delta.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lorax_server.adapters.weights import LoraWeights

# Group name -> the PEFT modules fused into it, in output order.
GROUPS = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


@dataclass
class LoraGroup:
    a: torch.Tensor  # [layers, in, R]
    b: torch.Tensor  # [layers, R, out]
    owner: torch.Tensor  # [R] position (in the batch's adapter list) of each rank column


def stack_adapters(
    adapters: list[LoraWeights], out_sizes: dict[str, int], num_layers: int, in_sizes: dict[str, int],
    dtype: torch.dtype, device: torch.device,
) -> dict[str, LoraGroup]:
    """Lay the given adapters side by side per group (built once per batch composition and cached)."""
    groups = {}
    for group, modules in GROUPS.items():
        offsets, total = {}, 0
        for m in modules:
            offsets[m] = total
            total += out_sizes[m]
        pieces = [(pos, m, w.modules[m]) for pos, w in enumerate(adapters) for m in modules if m in w.modules]
        if not pieces:
            continue
        rank_total = sum(a.shape[-1] for _, _, (a, _) in pieces)
        a_cat = torch.zeros(num_layers, in_sizes[group], rank_total, dtype=dtype, device=device)
        b_cat = torch.zeros(num_layers, rank_total, total, dtype=dtype, device=device)
        owner = torch.empty(rank_total, dtype=torch.int64, device=device)
        col = 0
        for pos, m, (a, b) in pieces:
            r = a.shape[-1]
            a_cat[:, :, col : col + r] = a
            b_cat[:, col : col + r, offsets[m] : offsets[m] + out_sizes[m]] = b
            owner[col : col + r] = pos
            col += r
        groups[group] = LoraGroup(a_cat, b_cat, owner)
    return groups


class LoraBatch:
    """The adapters of one forward pass and which tokens use which."""

    def __init__(self, groups: dict[str, LoraGroup], token_slots: torch.Tensor):
        """token_slots [T]: each token's position in the adapter list, -1 for the base model."""
        self.groups = groups
        self.masks = {
            name: (g.owner[None, :] == token_slots[:, None]).to(g.a.dtype) for name, g in groups.items()
        }

    def apply(self, group: str, layer: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y plus every token's own adapter delta for this projection group and layer."""
        g = self.groups.get(group)
        if g is None:
            return y
        return y + ((x @ g.a[layer]) * self.masks[group]) @ g.b[layer]
