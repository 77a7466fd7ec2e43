"""Read a PEFT LoRA checkpoint into per-module stacks [layers, in, r] / [layers, r, out], then take this rank's slice.

The scale (alpha/r) is folded into B once at load time, so applying an adapter is two matmuls.
Shapes are checked against the base model, so an adapter for another model is refused with the reason.
Reading and slicing are separate steps so merges see whole tensors (TIES/DARE pruning must not depend on the
number of shards).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lorax_server.adapters.config import AdapterError, LoraConfig

logger = logging.getLogger(__name__)

KEY = re.compile(r"\.(\d+)\.([\w.]+)\.lora_([AB])\.weight$")  # layer index, the module's path in the layer
PICKLE_OPT_IN = "ALLOW_PICKLE_ADAPTERS"


@dataclass(frozen=True)
class ModuleShape:
    """Full input/output features of a base linear, and this rank's slice of one of them: [start, stop), followed by
    the `more` ranges of a module whose output fuses several projections (Phi-3's qkv_proj: this rank's q, then its k
    and v), concatenated in the order the rank's base output holds them."""

    in_features: int
    out_features: int
    split: str  # "out" (column-parallel) or "in" (row-parallel)
    start: int
    stop: int
    more: tuple[tuple[int, int], ...] = ()

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        return ((self.start, self.stop), *self.more)

    @property
    def local_features(self) -> int:
        """Features of the split dim this rank holds."""
        return sum(stop - start for start, stop in self.ranges)


@dataclass
class LoraWeights:
    """One adapter's weights on some device: module -> (A [L, in, r], scaled B [L, r, out])."""

    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())

    def to(self, device: torch.device, dtype: torch.dtype) -> "LoraWeights":
        return LoraWeights(self.rank, {m: (a.to(device, dtype), b.to(device, dtype)) for m, (a, b) in self.modules.items()})


def _read_tensors(folder: Path, adapter_id: str) -> dict[str, torch.Tensor]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if files:
        tensors = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    tensors.update({k: f.get_tensor(k) for k in f.keys()})
            except (SafetensorError, OSError, ValueError) as exc:
                raise AdapterError(f"adapter '{adapter_id}': corrupt safetensors file {file.name} ({exc})") from exc
        return tensors
    bins = sorted(Path(folder).glob("adapter_model*.bin"))
    if not bins:
        raise AdapterError(f"adapter '{adapter_id}' has no adapter_model.safetensors")
    if os.environ.get(PICKLE_OPT_IN) != "1":
        raise AdapterError(
            f"adapter '{adapter_id}' only has pickle weights ({bins[0].name}); set {PICKLE_OPT_IN}=1 to allow them"
        )
    tensors = {}
    for file in bins:
        tensors.update(torch.load(file, map_location="cpu", weights_only=True))
    return tensors


def load_lora(
    folder: Path, adapter_id: str, config: LoraConfig, scale: float, shapes: dict[str, ModuleShape], num_layers: int
) -> LoraWeights:
    """Every module the adapter targets in all layers, whole (CPU, float32), B times `scale`.

    The tensors must agree with adapter_config.json (rank, target modules) and cover every layer: an adapter that
    would be applied only in part, or with a scale computed from the wrong rank, is refused rather than served."""
    found: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    unused = []
    for name, tensor in _read_tensors(folder, adapter_id).items():
        match = KEY.search(name)
        path = match.group(2) if match else ""
        module = path if path in shapes else next((m for m in shapes if path.endswith("." + m)), None)
        if module is None:
            if "lora_" in name:
                raise AdapterError(f"adapter '{adapter_id}' has LoRA weights this server cannot apply ({name})")
            unused.append(name)
            continue
        layer, which = int(match.group(1)), match.group(3)
        if layer >= num_layers:
            raise AdapterError(f"adapter '{adapter_id}' has weights for layer {layer}; the base model has {num_layers}")
        found.setdefault((module, which), {})[layer] = tensor
    if unused:
        logger.warning("adapter %s: ignoring %d tensors (%s...)", adapter_id, len(unused), unused[0])

    modules = {}
    for module in shapes:
        a_layers, b_layers = found.get((module, "A"), {}), found.get((module, "B"), {})
        if not a_layers and not b_layers:
            continue
        if len(a_layers) < num_layers or len(b_layers) < num_layers:
            missing = sorted(set(range(num_layers)) - (set(a_layers) & set(b_layers)))
            raise AdapterError(f"adapter '{adapter_id}': {module} has no LoRA weights for layers {missing[:8]}")
        shape = shapes[module]
        a = torch.stack([a_layers[i] for i in range(num_layers)]).float()  # [L, r, in]
        b = torch.stack([b_layers[i] for i in range(num_layers)]).float()  # [L, out, r]
        rank = a.shape[1]
        if rank != config.r:
            raise AdapterError(
                f"adapter '{adapter_id}': adapter_config.json says r={config.r}, but its {module} weights have rank {rank}"
            )
        if a.shape[2] != shape.in_features or b.shape[1] != shape.out_features or b.shape[2] != rank:
            raise AdapterError(
                f"adapter '{adapter_id}': {module} LoRA shapes A{list(a.shape[1:])} B{list(b.shape[1:])} do not fit the "
                f"base model ({shape.in_features} -> {shape.out_features} features)"
            )
        modules[module] = (a.transpose(1, 2).contiguous(), (b.transpose(1, 2) * scale).contiguous())
    if not modules:
        raise AdapterError(f"adapter '{adapter_id}' has no LoRA weights for {', '.join(shapes)}")
    if config.targets_listed and set(modules) != set(config.target_modules):
        extra, absent = sorted(set(modules) - set(config.target_modules)), sorted(set(config.target_modules) - set(modules))
        raise AdapterError(
            f"adapter '{adapter_id}': its weights and adapter_config.json disagree on target modules ("
            + "; ".join(filter(None, [extra and f"weights for {', '.join(extra)} not targeted",
                                      absent and f"{', '.join(absent)} targeted without weights"])) + ")"
        )
    ranks = {a.shape[-1] for a, _ in modules.values()}
    return LoraWeights(rank=max(ranks), modules=modules)


def shard_lora(weights: LoraWeights, shapes: dict[str, ModuleShape]) -> LoraWeights:
    """This rank's slice: A along `in` for row-parallel modules, B along `out` for column-parallel ones (each range
    of a fused module, so its B keeps the layout of the rank's fused base output)."""
    modules = {}
    for module, (a, b) in weights.modules.items():
        shape = shapes[module]
        if shape.split == "in":
            a = a[:, shape.start : shape.stop].contiguous()
        else:
            b = torch.cat([b[:, :, start:stop] for start, stop in shape.ranges], dim=-1)
        modules[module] = (a, b)
    return LoraWeights(weights.rank, modules)
