"""The transformers-backed path: a causal LM the native families do not cover runs transformers' own modeling code
(GPT-2, GPT-NeoX, OPT, Phi, OLMo, ...), driven by our continuous batching.

Three public transformers interfaces make that possible without copying modeling code:
- attention: the model is loaded with our registered attention implementation (layers/transformers_attention.py),
  which writes each layer's k/v into our paged KV cache and attends with our metadata; the flat batch of many
  requests is one "sequence" of the model, positions come from our metadata, transformers' own cache is off;
- logits: `logits_to_keep` with the rows we need, so the head runs only on those tokens;
- multi-LoRA: a forward hook on every linear (or GPT-2 `Conv1D`) module of the decoder layers adds each token's own
  adapter delta with the batched LoRA op, reading the same slot pools as the native path.

Only models whose class declares itself usable with custom attention backends (`is_backend_compatible`) and whose
every layer's attention reached ours at a load-time probe run here; the rest are refused with the reason. The path
runs on one shard (no tensor parallelism).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorax_server.adapters.weights import ModuleShape
from lorax_server.dist import Parallel
from lorax_server.layers.attention import AttentionMetadata
from lorax_server.layers.lora import LoraBatch, groups_for
from lorax_server.layers.transformers_attention import LayerAttention, Step, register

CAUSAL_LM = "AutoModelForCausalLM"


@dataclass(frozen=True)
class BackedConfig:
    """What the generator and the adapter registry read of a model (the fields the native DecoderConfig shares)."""

    vocab_size: int
    num_layers: int
    head_dim: int
    max_position_embeddings: int
    raw: dict
    sliding_window: None = None  # windows are per layer: transformers passes each its own


def model_class(folder: Path, config: dict, trust_remote_code: bool) -> type:
    """The transformers causal-LM class of a checkpoint, or a ValueError that says why it cannot run on this path.
    Code shipped with the checkpoint (`auto_map`) is used only with --trust-remote-code."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    arch = (config.get("architectures") or [None])[0]
    remote = CAUSAL_LM in (config.get("auto_map") or {})
    if remote and trust_remote_code:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        cls = get_class_from_dynamic_module(config["auto_map"][CAUSAL_LM], str(folder))
    else:
        hint = " (its modeling code ships with the checkpoint: --trust-remote-code runs it)" if remote else ""
        try:
            hf_config = AutoConfig.from_pretrained(folder)
        except (ValueError, KeyError) as exc:
            raise ValueError(
                f"unsupported architecture '{arch}': transformers does not know model type "
                f"'{config.get('model_type')}'{hint}"
            ) from exc
        if type(hf_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise ValueError(f"unsupported architecture '{arch}': transformers has no causal LM for it{hint}")
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    if arch is not None and cls.__name__ != arch:
        raise ValueError(f"unsupported architecture '{arch}': not a causal LM (transformers' is {cls.__name__})")
    if not cls.is_backend_compatible():
        raise ValueError(
            f"unsupported architecture '{cls.__name__}': its transformers modeling code does not support custom "
            "attention backends (attention outside transformers' attention interface, or masks carrying biases such "
            "as ALiBi), so it cannot attend over the paged KV cache"
        )
    return cls


def _features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a module LoRA can wrap: nn.Linear, or GPT-2's Conv1D (weight stored [in, out])."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def _decoder_layers(hf: nn.Module, num_layers: int) -> nn.ModuleList:
    for _, module in hf.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"{type(hf).__name__}: no list of {num_layers} decoder layers found")


def _lora_targets(layers: nn.ModuleList) -> dict[str, tuple[int, int]]:
    """Modules every layer has at the same path with the same sizes: path within a layer -> (in, out) features."""
    per_layer = [
        {name: f for name, m in layer.named_modules() if (f := _features(m)) is not None} for layer in layers
    ]
    return {name: f for name, f in per_layer[0].items() if all(p.get(name) == f for p in per_layer[1:])}


def _attention_shape(hf: nn.Module, cls_name: str, num_layers: int, sliding_config: bool) -> LayerAttention:
    """Run two tokens through the model with the probing attention and check that every layer attended through it,
    causally, once, with no mask or sinks of its own and one KV shape: what the paged cache can hold exactly."""
    step = Step()
    device = next(hf.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.int64, device=device)
    hf(input_ids=ids, position_ids=torch.arange(2, device=device)[None], use_cache=False, lorax_step=step)
    seen = step.seen

    def refuse(why: str) -> ValueError:
        return ValueError(f"unsupported architecture '{cls_name}' on the transformers-backed path: {why}")

    if sorted(s.layer for s in seen if s.layer is not None) != list(range(num_layers)) or len(seen) != num_layers:
        raise refuse(
            f"{len(seen)} attention calls for {num_layers} layers (each layer must attend once through transformers' "
            "attention interface, naming its layer index)"
        )
    if any(not s.causal or s.masked or s.sinks for s in seen):
        raise refuse("its attention is not plain causal attention (bidirectional, mask biases or attention sinks)")
    first = seen[0]
    same = (first.kv_heads,) + (first.head_dim,) * 3
    if any((s.kv_heads, s.head_dim, s.value_dim, s.query_dim) != same for s in seen):
        raise refuse("its layers differ in KV heads or q/k/v head sizes, which one paged KV cache cannot hold")
    if sliding_config and not any(s.sliding for s in seen):
        raise refuse("its config sets a sliding window that its attention calls do not pass on")
    return seen[0]


class TransformersModel:
    """A transformers causal LM whose attention reads and writes our paged KV cache and whose linear modules add
    batched multi-LoRA deltas; the same interface as the native DecoderModel."""

    def __init__(self, hf: nn.Module, raw: dict, dtype: torch.dtype, device: torch.device):
        self.hf, self.dtype, self.device = hf, dtype, device
        text = hf.config.get_text_config()
        num_layers = text.num_hidden_layers
        self.layers = _decoder_layers(hf, num_layers)
        sliding = bool(getattr(text, "sliding_window", None))  # Qwen2-MoE says 0 for none
        with torch.inference_mode():
            attention = _attention_shape(hf, type(hf).__name__, num_layers, sliding)
        self.num_kv_heads = attention.kv_heads
        vocab = hf.get_output_embeddings().weight.shape[0]
        max_positions = getattr(text, "max_position_embeddings", None) or 4096
        self.cfg = BackedConfig(vocab, num_layers, attention.head_dim, int(max_positions), raw)
        self._targets = _lora_targets(self.layers)
        group_of = {m: g for g, modules in groups_for(self._targets).items() for m in modules}
        self.lora: LoraBatch | None = None  # the running forward's adapters, read by the hooks
        for index, layer in enumerate(self.layers):
            for name, module in layer.named_modules():
                if name in self._targets:
                    module.register_forward_hook(self._lora_hook(group_of[name], index))

    def _lora_hook(self, group: str, layer: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            lora = self.lora
            if lora is None or not lora.targets(group):
                return None
            x = args[0].reshape(-1, args[0].shape[-1])
            if x.shape[0] != lora.token_slots.shape[0]:
                raise RuntimeError(f"{group} in layer {layer} ran on {x.shape[0]} rows, not one per token: LoRA cannot "
                                   "apply to it")
            out = output.contiguous()
            lora.apply(group, layer, x, out.view(-1, out.shape[-1]))
            return out

        return hook

    def lora_shapes(self) -> dict[str, ModuleShape]:
        """Each LoRA-targetable module, named by its path within a decoder layer (one shard holds all of it)."""
        return {name: ModuleShape(i, o, "out", 0, o) for name, (i, o) in self._targets.items()}

    @property
    def kv_bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.cfg.num_layers * self.num_kv_heads * self.cfg.head_dim * element

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
        logit_rows: torch.Tensor,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        """Logits [len(logit_rows), vocab] (float32) for the selected flat tokens; every token's K/V goes to the
        cache."""
        self.lora = lora
        try:
            out = self.hf(
                input_ids=input_ids[None], position_ids=meta.positions[None], use_cache=False,
                logits_to_keep=logit_rows, lorax_step=Step(meta, kv_cache),
            )
        finally:
            self.lora = None
        return out.logits[0].float()


def load(
    folder: Path, config: dict, dtype: torch.dtype, device: torch.device, parallel: Parallel, trust_remote_code: bool
) -> TransformersModel:
    """The checkpoint's transformers model on `device` in `dtype`, ready for our batches (ValueError: why not)."""
    cls = model_class(folder, config, trust_remote_code)
    if parallel.world_size > 1:
        raise ValueError(
            f"{cls.__name__} runs on the transformers-backed path, which has no tensor parallelism: start it with "
            "--num-shard 1"
        )
    hf = cls.from_pretrained(folder, dtype=dtype, attn_implementation=register(), device_map=device).eval()
    hf.requires_grad_(False)
    return TransformersModel(hf, config, dtype, device)
