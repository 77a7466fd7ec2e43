"""PEFT `adapter_config.json`: what we read from it and what we refuse, with the reason."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

# Module name in PEFT checkpoints -> the fused group our model applies it in.
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def read_config(folder: Path, adapter_id: str) -> LoraConfig:
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
    for unsupported in ("use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if raw.get(unsupported):
            raise AdapterError(f"adapter '{adapter_id}' uses {unsupported}, which is not supported")
    targets = raw.get("target_modules") or []
    listed = not isinstance(targets, str)
    if not listed:  # a regex or "all-linear"
        targets = list(MODULES) if targets == "all-linear" else [m for m in MODULES if m in targets]
    else:  # names may be dotted paths; PEFT matches their last part
        targets = [t.rsplit(".", 1)[-1] for t in targets]
        unsupported = sorted(set(targets) - set(MODULES))
        if unsupported:
            raise AdapterError(
                f"adapter '{adapter_id}' targets {', '.join(unsupported)}, which this server cannot apply "
                f"(supported: {', '.join(MODULES)})"
            )
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
