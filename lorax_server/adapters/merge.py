"""Combining several LoRA adapters into one (`merged_adapters`): linear, TIES, DARE-linear and DARE-TIES.

A and B are combined separately, module by module, as the reference does; the merged adapter then uses the
first adapter's scale. DARE rescales kept entries by 1/density (the published method).
"""
from __future__ import annotations

import torch

from lorax_server.adapters.config import AdapterError
from lorax_server.adapters.weights import LoraWeights

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")


def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries with the largest magnitude."""
    if density >= 1:
        return t
    k = int(t.numel() * density)
    if k == 0:
        return torch.zeros_like(t)
    threshold = t.abs().flatten().kthvalue(t.numel() - k + 1).values
    return torch.where(t.abs() >= threshold, t, torch.zeros_like(t))


def _prune_random(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return t
    keep = torch.rand(t.shape, generator=generator) < density
    return torch.where(keep, t / density, torch.zeros_like(t))


def _disjoint_mean(tensors: list[torch.Tensor], weights: list[float], sign_method: str) -> torch.Tensor:
    stacked = torch.stack([w * t for w, t in zip(weights, tensors)])
    summed = stacked.sum(0) if sign_method == "total" else stacked.sign().sum(0)
    elected = torch.where(summed >= 0, 1.0, -1.0)
    agree = stacked.sign() == elected
    count = agree.sum(0).clamp(min=1)
    return (stacked * agree).sum(0) / count


def combine(
    tensors: list[torch.Tensor], weights: list[float], strategy: str, density: float, sign_method: str, seed: int
) -> torch.Tensor:
    if strategy == "linear":
        return sum(w * t for w, t in zip(weights, tensors))
    if strategy == "ties":
        return _disjoint_mean([_prune_magnitude(t, density) for t in tensors], weights, sign_method)
    generator = torch.Generator().manual_seed(seed)
    pruned = [_prune_random(t, density, generator) for t in tensors]
    if strategy == "dare_linear":
        return sum(w * t for w, t in zip(weights, pruned))
    if strategy == "dare_ties":
        return _disjoint_mean(pruned, weights, sign_method)
    raise AdapterError(f"unknown merge strategy '{strategy}' (expected one of {', '.join(STRATEGIES)})")


def merge(
    adapters: list[LoraWeights], weights: list[float], strategy: str, density: float, sign_method: str
) -> LoraWeights:
    """One LoraWeights from several of the same rank (their unscaled A/B; the caller applies a scale)."""
    if strategy not in STRATEGIES:
        raise AdapterError(f"unknown merge strategy '{strategy}' (expected one of {', '.join(STRATEGIES)})")
    if strategy != "linear" and density <= 0:
        raise AdapterError(f"merge strategy '{strategy}' needs 0 < density <= 1 (got {density})")
    ranks = {a.rank for a in adapters}
    if len(ranks) != 1:
        raise AdapterError(f"merged adapters must share one rank; got ranks {sorted(ranks)}")
    weights = weights or [1.0] * len(adapters)
    modules = {}
    for module in sorted({m for a in adapters for m in a.modules}):
        having = [(w, a.modules[module]) for w, a in zip(weights, adapters) if module in a.modules]
        ws = [w for w, _ in having]
        a_merged = combine([ab[0] for _, ab in having], ws, strategy, density, sign_method, seed=0)
        b_merged = combine([ab[1] for _, ab in having], ws, strategy, density, sign_method, seed=1)
        modules[module] = (a_merged, b_merged)
    return LoraWeights(rank=ranks.pop(), modules=modules)
