"""PEFT `adapter_config.json`: what we read from it and what we refuse, with the reason."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


class AdapterError(ValueError):
    """An adapter that cannot be served; the message says why (it reaches the user as a 4xx)."""


@dataclass(frozen=True)
class LoraConfig:
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool
    base_model_name_or_path: str | None
    targets_listed: bool = True  # False when target_modules is a pattern ("all-linear" or a regex)

    @property
    def scale(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def matches(module: str, target: str) -> bool:
    """PEFT's rule for whether a target names a module (by its path within a layer, as the model names it): equal,
    or one ends with the other at a dot ("c_proj" names "attn.c_proj" and "mlp.c_proj"; "self_attn.q_proj", "q_proj")."""
    return module == target or module.endswith("." + target) or target.endswith("." + module)


def read_config(folder: Path, adapter_id: str, modules: tuple[str, ...] | None = None) -> LoraConfig:
    """`modules`: the LoRA modules of the model that will serve it, which its targets are resolved to (None: not
    known yet, as when the launcher downloads a static adapter before any model is loaded; targets stay as written)."""
    path = Path(folder) / "adapter_config.json"
    if not path.exists():
        raise AdapterError(f"adapter '{adapter_id}' has no adapter_config.json: not a LoRA adapter")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"adapter '{adapter_id}': adapter_config.json is not valid JSON ({exc})") from exc
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter '{adapter_id}' is a {raw.get('peft_type')} adapter; only LoRA is supported")
    if raw.get("modules_to_save"):
        raise AdapterError(f"adapter '{adapter_id}' sets modules_to_save {raw['modules_to_save']}, which is not supported")
    if raw.get("target_parameters"):  # PEFT's LoRA on raw weights, as on the expert tensors of mixture-of-experts models
        raise AdapterError(
            f"adapter '{adapter_id}' targets parameters {raw['target_parameters']} (such as expert weights), which is "
            "not supported: adapters apply to linear modules only"
        )
    for unsupported in ("use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if raw.get(unsupported):
            raise AdapterError(f"adapter '{adapter_id}' uses {unsupported}, which is not supported")
    targets = raw.get("target_modules") or []
    listed = not isinstance(targets, str)
    if modules is None:
        targets = list(targets) if listed else []
    elif not listed:  # a regex or "all-linear"
        targets = list(modules) if targets == "all-linear" else [m for m in modules if m.rsplit(".", 1)[-1] in targets]
    else:
        unsupported = sorted(t for t in targets if not any(matches(m, t) for m in modules))
        if unsupported:
            raise AdapterError(
                f"adapter '{adapter_id}' targets {', '.join(unsupported)}, which this server cannot apply "
                f"(supported: {', '.join(modules)})"
            )
        targets = [m for m in modules if any(matches(m, t) for t in targets)]
    if not raw.get("r"):
        raise AdapterError(f"adapter '{adapter_id}': adapter_config.json has no rank `r`")
    return LoraConfig(
        r=int(raw["r"]),
        lora_alpha=float(raw.get("lora_alpha", raw["r"])),
        target_modules=tuple(sorted(targets)),
        use_rslora=bool(raw.get("use_rslora", False)),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
        targets_listed=listed,
    )
