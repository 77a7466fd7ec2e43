"""Many LoRA adapters applied in one forward pass, each token reading its own adapter's rows from the slot pools.

A projection group is a fused base projection (qkv, o, gate_up, down); its modules (q_proj, k_proj, v_proj, ...)
each have their own pools (see `adapters/slots.py`). For a group the whole batch's delta is one `lora_apply`
call: no Python loop over requests or adapters, no weights stacked or copied per batch, no merging, and tokens
of the base model get an exact zero delta.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from lorax_server.adapters.slots import SlotPools
from lorax_server.layers.lora_kernel import lora_apply

# Group name -> the PEFT modules fused into it, in output order.
GROUPS = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
# The same groups where the checkpoint (and so PEFT) already fuses them into one module (Phi-3).
FUSED_GROUPS = {**GROUPS, "qkv": ("qkv_proj",), "gate_up": ("gate_up_proj",)}
# Falcon's and Bloom's names: fused q/k/v, and a plain MLP whose up projection takes the gate_up group's place.
FALCON_GROUPS = {
    "qkv": ("query_key_value",), "o": ("dense",), "gate_up": ("dense_h_to_4h",), "down": ("dense_4h_to_h",),
}
# MPT's: Wqkv, out_proj, and a plain MLP's up projection in the gate_up group's place.
MPT_GROUPS = {"qkv": ("Wqkv",), "o": ("out_proj",), "gate_up": ("up_proj",), "down": ("down_proj",)}
# GPT-Neo's: separate q/k/v, out_proj, and a plain MLP (c_fc, c_proj).
GPT_NEO_GROUPS = {**GROUPS, "o": ("out_proj",), "gate_up": ("c_fc",), "down": ("c_proj",)}


def groups_for(modules: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """The projection groups of a model with these LoRA modules: one of the native decoder's layouts (GROUPS,
    FUSED_GROUPS, FALCON_GROUPS, MPT_GROUPS, GPT_NEO_GROUPS) when every module is one of its modules, else each module
    a group of its own (the transformers-backed path's modules)."""
    modules = tuple(modules)
    for layout in (GROUPS, FUSED_GROUPS, FALCON_GROUPS, MPT_GROUPS, GPT_NEO_GROUPS):
        if {m for group in layout.values() for m in group}.issuperset(modules):
            return {g: group for g, group in layout.items() if set(group) <= set(modules)}
    return {m: (m,) for m in modules}


class LoraBatch:
    """Which slot each token of one forward pass uses, and the pools to read (the only per-step LoRA input)."""

    def __init__(
        self, pools: SlotPools, token_slots: torch.Tensor, out_sizes: dict[str, int], slots: set[int] | None
    ):
        """token_slots [T]: each token's slot, -1 for the base model; `slots`: the set of them but -1 (known on the
        host, so the batch's modules are found without reading the device), or None for every module whose pool
        holds rows (`every_pool`). out_sizes: module -> output features."""
        self.token_slots = token_slots
        if slots is None:
            targeted = {m for m, pool in pools.pools.items() if pool.a.shape[1]}
        else:
            targeted = set().union(*(pools.targets[s] for s in slots))
        self._groups = {}  # only the modules some token's adapter targets: no kernel call for the rest
        for group, modules in groups_for(out_sizes).items():
            offsets, start = [], 0
            for m in modules:
                offsets.append(start)
                start += out_sizes[m]
            used = [(m, off) for m, off in zip(modules, offsets) if m in targeted]
            if used:
                p = [pools.pools[m] for m, _ in used]
                self._groups[group] = ([x.a for x in p], [x.b for x in p], [x.rows for x in p], [off for _, off in used])

    @classmethod
    def every_pool(cls, pools: SlotPools, token_slots: torch.Tensor) -> "LoraBatch":
        """Inputs that serve any mix of adapters, as a CUDA graph must (which kernels run is fixed at capture): every
        module whose pool holds rows runs, and a token whose adapter does not target a module gets an exact zero
        delta there (its slot's row table for that module is all -1)."""
        return cls(pools, token_slots, {m: pool.b.shape[2] for m, pool in pools.pools.items()}, None)

    def targets(self, group: str) -> bool:
        """Whether some token's adapter targets the group (else `apply` leaves its output as it is)."""
        return group in self._groups

    def apply(self, group: str, layer: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y plus every token's own adapter delta for this projection group and layer (y, a fresh matmul output,
        is updated in place)."""
        pools = self._groups.get(group)
        if pools is not None:
            lora_apply(y, x, self.token_slots, *pools, layer)
        return y
