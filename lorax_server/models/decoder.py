"""The decoder skeleton every native family shares: embedding (plus learned positions where a family has them),
layers of (norm, rotary or ALiBi grouped-query attention over the paged KV cache, gated or plain MLP; one after the
other or in parallel), final norm, LM head; batched multi-LoRA on qkv/o/gate_up/down; tensor-parallel across shards.
A family is the `DecoderConfig` its module reads from config.json (see llama.py, qwen3.py, falcon.py, ...),
including where its checkpoint keeps each weight.

Column-parallel: q/k/v (split by heads, which must divide) and gate/up (split by intermediate features, in parts
that may differ by one). Row-parallel with an all-reduce: o and down. Vocab-parallel: embedding and lm_head, padded
with zero rows to a multiple of the shard count (logits all-gathered, the padding columns dropped before sampling).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from lorax_server.adapters.weights import ModuleShape
from lorax_server.dist import Parallel
from lorax_server.layers.attention import AttentionMetadata, paged_attention
from lorax_server.layers.linear import Linear
from lorax_server.layers.lora import LoraBatch
from lorax_server.layers.moe import MoeConfig, SparseMoe
from lorax_server.layers.norm import LayerNorm, RMSNorm
from lorax_server.layers.quantized import QuantizedRows
from lorax_server.layers.rotary import Rotary, apply_rotary, rope_parameters
from lorax_server.weights import Weights

GELU_TANH = partial(F.gelu, approximate="tanh")
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": GELU_TANH, "gelu_new": GELU_TANH}
Norm = RMSNorm | LayerNorm


@dataclass(frozen=True)
class WeightNames:
    """Where a family's checkpoint keeps each weight (defaults: Llama's). `qkv` and `gate_up` name one module per
    projection (q, k, v; gate, up), or one module fusing them (Phi-3's qkv_proj and gate_up_proj, Falcon's
    query_key_value); a plain MLP names only its up projection."""

    base: str = "model"  # checkpoints saved from the bare model (Bloom's on the hub) have no such prefix
    embed: str = "embed_tokens"
    embed_norm: str | None = None  # Bloom norms the embeddings
    positions: str | None = None  # GPT-Neo's learned absolute position embeddings (wpe), added to the tokens'
    layers: str = "layers"
    final_norm: str = "norm"
    attention: str = "self_attn"
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    o: str = "o_proj"
    q_norm: str = "q_norm"
    k_norm: str = "k_norm"
    mlp: str = "mlp"
    gate_up: tuple[str, ...] = ("gate_proj", "up_proj")
    down: str = "down_proj"
    input_norm: str = "input_layernorm"
    mlp_norm: str | None = "post_attention_layernorm"  # None: the MLP reads the attention's input norm (parallel)


@dataclass(frozen=True)
class DecoderConfig:
    """Sizes, plus the ways families differ (defaults are Llama's)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float  # the epsilon of every norm, LayerNorm's too
    tie_word_embeddings: bool
    max_position_embeddings: int
    raw: dict
    rope: dict[str, dict]  # rotary settings by name (layers/rotary.py's rope_parameters)
    layer_rope: tuple[str, ...]  # the `rope` entry each layer rotates with
    layer_windows: tuple[int | None, ...]  # each layer's sliding window; None: it sees the whole sequence
    qkv_bias: bool = False
    qkv_clip: float | None = None  # MPT's clip_qkv: q, k and v clamped to [-clip, clip] after their projection
    names: WeightNames = WeightNames()
    qkv_grouped: bool = False  # one fused qkv module laid out per KV head: its query heads, its key, its value
    norm: str = "rms"  # or "layer": LayerNorm, with its bias where the checkpoint has one
    gated_mlp: bool = True  # False: up projection, activation, down (no gate)
    mlp_bias: bool = False  # the MLP's up and down projections have biases
    parallel_residual: bool = False  # attention and MLP both read the layer input: h + attn(x) + mlp(y)
    moe: MoeConfig | None = None  # Mixtral, Qwen-MoE: a sparse mixture of experts for the MLP of its layers
    o_bias: bool = False
    activation: str = "silu"
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k, before rotary
    qk_norm_per_head: bool = False  # StableLM: each head has its own q/k norm weights (`{q_norm}.norms.{head}`)
    unit_offset_norms: bool = False  # Gemma: every norm scales by (1 + weight)
    sandwich_norms: bool = False  # Gemma 2/3: attention and MLP outputs are normed too before the residual add
    attention_scale: float | None = None  # None: head_dim ** -0.5
    embedding_multiplier: float = 1.0
    embedding_multiplier_in_dtype: bool = False  # Gemma rounds its multiplier to the model dtype first
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0  # logits are divided by it
    attn_softcap: float | None = None  # attention scores become tanh(s / cap) * cap
    final_softcap: float | None = None  # the same for the logits
    alibi_slopes: tuple[float, ...] | None = None  # per query head: scores add slope * (key - query position); no rope

    @classmethod
    def from_dict(cls, cfg: dict, **family) -> "DecoderConfig":
        """The fields every family reads alike from config.json; `family` sets the rest."""
        heads = cfg["num_attention_heads"]
        layers = cfg["num_hidden_layers"]
        if cfg.get("mlp_bias"):
            raise ValueError("mlp_bias=true checkpoints are not supported")
        activation = family.get("activation") or cfg.get("hidden_act") or "silu"
        if activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation '{activation}' (supported: {', '.join(ACTIVATIONS)})")
        common = dict(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            raw=cfg,
            activation=activation,
            rope={"all": rope_parameters(cfg)},
            layer_rope=("all",) * layers,
            layer_windows=(None,) * layers,
        )
        return cls(**{**common, **family})

    @property
    def rotary(self) -> bool:
        """Whether q and k are rotated: not where positions are ALiBi biases or learned embeddings."""
        return self.alibi_slopes is None and self.names.positions is None

    @property
    def sliding_window(self) -> int | None:
        """The window all layers share, which the attention metadata applies for the whole forward; None when the
        layers differ (each sliding layer then narrows the mask itself) or none slides."""
        windows = set(self.layer_windows)
        return windows.pop() if len(windows) == 1 else None


def layer_norm_config(sizes: dict, cfg: dict, **family) -> DecoderConfig:
    """A GPT-style family (Falcon, Bloom, MPT, GPT-Neo): LayerNorms with config.json's `layer_norm_epsilon`, an MLP
    without a gate, embeddings tied unless the config says otherwise; `family` sets the rest."""
    return DecoderConfig.from_dict(
        sizes, rms_norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)), norm="layer", gated_mlp=False, **family,
    )


def layer_types(cfg: dict, sliding: Callable[[int], bool]) -> tuple[str, ...]:
    """Each layer's attention type, "sliding_attention" or "full_attention": config.json's `layer_types` where saved
    (transformers 5), else the family's rule for which layer indices slide."""
    layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or ["sliding_attention" if sliding(i) else "full_attention" for i in range(layers)]
    return tuple(types[:layers])


def layer_windows(types: tuple[str, ...], window: int | None) -> tuple[int | None, ...]:
    """Each layer's sliding window: `window` for sliding layers (none at all when it is None)."""
    return tuple(window if t == "sliding_attention" else None for t in types)


def kv_heads_for_rank(cfg: DecoderConfig, parallel: Parallel) -> tuple[int, int]:
    """[first, stop) of the KV heads this rank needs: split when there are enough, replicated when fewer."""
    q_start, q_stop = parallel.split(cfg.num_heads, "num_attention_heads")
    group = cfg.num_heads // cfg.num_kv_heads
    local_q = q_stop - q_start
    if local_q % group and group % local_q:
        raise ValueError(
            f"{cfg.num_heads} attention heads with {cfg.num_kv_heads} KV heads cannot be split over "
            f"{parallel.world_size} shards"
        )
    return q_start // group, (q_stop - 1) // group + 1


def projection_rows(
    prefix: str, modules: tuple[str, ...], ranges: list[tuple[int, int]], sizes: list[int]
) -> list[tuple[str, int, int]]:
    """(checkpoint module, start, stop) of the rows this rank holds of each projection of a column-parallel group:
    `ranges` of the separate `modules`, or of the one fused module whose rows stack the projections' full `sizes`
    in order (the row offsets there are also the column offsets of a fused adapter's B)."""
    if len(modules) == len(ranges):
        return [(f"{prefix}.{m}", start, stop) for m, (start, stop) in zip(modules, ranges)]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(f"{prefix}.{modules[0]}", offset + start, offset + stop) for offset, (start, stop) in zip(offsets, ranges)]


def grouped_qkv_rows(
    module: str, cfg: DecoderConfig, q_heads: tuple[int, int], kv_heads: tuple[int, int]
) -> list[tuple[str, int, int]]:
    """The rows of this rank's q heads, then k heads, then v heads, in a fused qkv module that keeps each KV head's
    block together: its query heads, its key, its value (Falcon's new architecture; with one query head per KV head,
    the per-head [q, k, v] of Bloom and the first Falcons). Reading the base weight, its bias and an adapter's B
    through the same rows puts all three in the layout the attention splits; adjacent rows are read as one range."""
    d, group = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    block = (group + 2) * d
    starts = [h // group * block + h % group * d for h in range(*q_heads)]
    starts += [j * block + group * d for j in range(*kv_heads)]
    starts += [j * block + (group + 1) * d for j in range(*kv_heads)]
    rows: list[tuple[str, int, int]] = []
    for start in starts:
        if rows and rows[-1][2] == start:
            rows[-1] = (module, rows[-1][1], start + d)
        else:
            rows.append((module, start, start + d))
    return rows


def fused_shape(in_features: int, out_features: int, rows: list[tuple[str, int, int]]) -> ModuleShape:
    """The LoRA shape of a fused module whose rank rows are `rows` (projection_rows of it)."""
    (_, start, stop), *more = rows
    return ModuleShape(in_features, out_features, "out", start, stop, tuple((a, b) for _, a, b in more))


def load_norm(cfg: DecoderConfig, weights: Weights, name: str) -> Norm:
    """The norm at `name` of the family's kind (a LayerNorm with its bias where the checkpoint has one)."""
    bias = None
    if cfg.norm == "layer" and f"{name}.bias" in weights:
        bias = weights.get(f"{name}.bias")
    return make_norm(cfg, weights.get(f"{name}.weight"), bias)


def make_norm(cfg: DecoderConfig, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Norm:
    """An RMSNorm, or with `norm="layer"` a LayerNorm, of this weight (and bias)."""
    if cfg.norm == "layer":
        return LayerNorm(weight, bias, cfg.rms_norm_eps)
    return RMSNorm(weight, cfg.rms_norm_eps, cfg.unit_offset_norms)


class DecoderLayer:
    """One decoder layer holding this rank's slices of the weights."""

    def __init__(self, cfg: DecoderConfig, weights: Weights, parallel: Parallel, index: int, prefix: str):
        """prefix: the layer's in the checkpoint ("model.layers.3")."""
        p, names = prefix, cfg.names
        attn, mlp = f"{p}.{names.attention}", f"{p}.{names.mlp}"
        self.parallel = parallel
        d = cfg.head_dim
        q0, q1 = parallel.split(cfg.num_heads, "num_attention_heads")
        k0, k1 = kv_heads_for_rank(cfg, parallel)
        self.index = index
        self.num_heads, self.num_kv_heads, self.head_dim = q1 - q0, k1 - k0, d
        self.q_range, self.kv_range = (q0 * d, q1 * d), (k0 * d, k1 * d)
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        q_full, kv_full = cfg.num_heads * d, cfg.num_kv_heads * d
        if cfg.qkv_grouped:
            self.qkv_rows = grouped_qkv_rows(f"{attn}.{names.qkv[0]}", cfg, (q0, q1), (k0, k1))
        else:
            self.qkv_rows = projection_rows(
                attn, names.qkv, [self.q_range, self.kv_range, self.kv_range], [q_full, kv_full, kv_full]
            )
        self.qkv = weights.linear_rows(self.qkv_rows)
        self.qkv_bias, self.qkv_clip = None, cfg.qkv_clip
        if cfg.qkv_bias:
            self.qkv_bias = torch.cat([weights.get_rows(f"{m}.bias", start, stop) for m, start, stop in self.qkv_rows])
        self.o = weights.linear_cols(f"{attn}.{names.o}", q0 * d, q1 * d)
        self.o_bias = weights.get(f"{attn}.{names.o}.bias") if cfg.o_bias else None
        i0, i1 = parallel.split_uneven(cfg.intermediate_size)
        self.inter, self.inter_range = i1 - i0, (i0, i1)
        self.gated = cfg.gated_mlp
        self.act = ACTIVATIONS[cfg.activation]
        self.moe = SparseMoe(cfg.moe, weights, p, parallel, self.act) if cfg.moe and index in cfg.moe.layers else None
        self.up_bias = self.down_bias = None
        if self.moe is None:
            parts = 2 if cfg.gated_mlp else 1
            self.gate_up_rows = projection_rows(mlp, names.gate_up, [(i0, i1)] * parts, [cfg.intermediate_size] * parts)
            self.gate_up = weights.linear_rows(self.gate_up_rows)
            self.down = weights.linear_cols(f"{mlp}.{names.down}", i0, i1)
            if cfg.mlp_bias:
                self.up_bias = torch.cat([weights.get_rows(f"{m}.bias", a, b) for m, a, b in self.gate_up_rows])
                self.down_bias = weights.get(f"{mlp}.{names.down}.bias")

        self.input_norm = load_norm(cfg, weights, f"{p}.{names.input_norm}")
        self.post_attn_norm = self.post_mlp_norm = None
        self.parallel_residual = cfg.parallel_residual
        if cfg.sandwich_norms:
            self.post_attn_norm = load_norm(cfg, weights, f"{p}.post_attention_layernorm")
            self.pre_mlp_norm = load_norm(cfg, weights, f"{p}.pre_feedforward_layernorm")
            self.post_mlp_norm = load_norm(cfg, weights, f"{p}.post_feedforward_layernorm")
        else:  # Llama's "post-attention" norm is the MLP's input norm; in parallel layers, None shares the input norm
            self.pre_mlp_norm = load_norm(cfg, weights, f"{p}.{names.mlp_norm}") if names.mlp_norm else None
        self.qk_norm = None
        if cfg.qk_norm:  # one [heads, head_dim] weight normalises q's and k's heads in one call
            if cfg.qk_norm_per_head:
                q_norm = torch.stack([weights.get(f"{attn}.{names.q_norm}.norms.{h}.weight") for h in range(q0, q1)])
                k_norm = torch.stack([weights.get(f"{attn}.{names.k_norm}.norms.{h}.weight") for h in range(k0, k1)])
            else:
                q_norm = weights.get(f"{attn}.{names.q_norm}.weight").expand(self.num_heads, d)
                k_norm = weights.get(f"{attn}.{names.k_norm}.weight").expand(self.num_kv_heads, d)
            self.qk_norm = make_norm(cfg, torch.cat([q_norm, k_norm]))

        self.scale = cfg.attention_scale or d**-0.5
        self.softcap = cfg.attn_softcap
        self.window = cfg.layer_windows[index] if cfg.sliding_window is None else None
        self.rope = cfg.layer_rope[index] if cfg.rotary else None
        self.alibi = None
        if cfg.alibi_slopes is not None:  # this rank's heads' slopes
            self.alibi = torch.tensor(cfg.alibi_slopes[q0:q1], dtype=torch.float32, device=weights.device)
        self.residual_multiplier = cfg.residual_multiplier

    def _reduce(self, partial: torch.Tensor, *biases: torch.Tensor | None) -> torch.Tensor:
        """The sum over ranks of row-parallel outputs (their LoRA deltas included: each rank's partial x@A sums in the
        same all-reduce), then the biases, which every rank holds whole."""
        out = self.parallel.all_reduce(partial)
        for bias in biases:
            if bias is not None:
                out = out + bias
        return out

    def _residual(self, hidden: torch.Tensor, out: torch.Tensor, norm: Norm | None) -> torch.Tensor:
        if norm is not None:
            out = norm(out)
        if self.residual_multiplier != 1.0:
            out = out * self.residual_multiplier
        return hidden + out

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: dict[str, tuple[torch.Tensor, torch.Tensor]],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        lora: LoraBatch | None,
    ) -> torch.Tensor:
        """rotary: each `rope` entry's cos and signed sin for this forward's tokens."""
        x = self.input_norm(hidden)
        attn = self._attention(x, rotary, kv_cache, meta, lora)
        if self.parallel_residual:  # one all-reduce for both branches
            y = x if self.pre_mlp_norm is None else self.pre_mlp_norm(hidden)
            return hidden + self._reduce(attn + self._mlp(y, lora), self.o_bias, self.down_bias)
        hidden = self._residual(hidden, self._reduce(attn, self.o_bias), self.post_attn_norm)
        return self._residual(hidden, self._reduce(self._mlp(self.pre_mlp_norm(hidden), lora), self.down_bias),
                              self.post_mlp_norm)

    def _attention(
        self,
        x: torch.Tensor,
        rotary: dict[str, tuple[torch.Tensor, torch.Tensor]],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        lora: LoraBatch | None,
    ) -> torch.Tensor:
        """This rank's part of the attention output projection (before the all-reduce and the bias)."""
        qkv = self.qkv(x)
        if lora is not None:
            qkv = lora.apply("qkv", self.index, x, qkv)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        if self.qkv_clip is not None:  # after the adapters' deltas, as the reference clamps the adapted output
            qkv = qkv.clamp_(-self.qkv_clip, self.qkv_clip)
        tokens, heads = x.shape[0], self.num_heads
        qk = qkv[:, : self.q_size + self.kv_size].view(tokens, heads + self.num_kv_heads, self.head_dim)
        if self.qk_norm is not None:
            qk = self.qk_norm(qk)
        if self.rope is not None:
            qk = apply_rotary(qk, *rotary[self.rope])
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[:, self.q_size + self.kv_size :].view(tokens, self.num_kv_heads, self.head_dim)
        attn = paged_attention(q, k, v, kv_cache, meta, self.scale, self.window, self.softcap, self.alibi)
        out = self.o(attn)
        return lora.apply("o", self.index, attn, out) if lora is not None else out

    def _mlp(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        """This rank's part of the MLP output (before the all-reduce and the bias)."""
        if self.moe is not None:
            return self.moe(x)
        gate_up = self.gate_up(x)
        if lora is not None:
            gate_up = lora.apply("gate_up", self.index, x, gate_up)
        if self.up_bias is not None:
            gate_up = gate_up + self.up_bias
        if self.gated:
            gate, up = gate_up.split([self.inter, self.inter], dim=-1)
            hidden = self.act(gate) * up
        else:
            hidden = self.act(gate_up)
        out = self.down(hidden)
        return lora.apply("down", self.index, hidden, out) if lora is not None else out


class DecoderModel:
    """Weights of one rank plus the forward pass over a flat batch of tokens."""

    def __init__(self, cfg: DecoderConfig, weights: Weights, parallel: Parallel):
        self.cfg, self.parallel = cfg, parallel
        self.dtype, self.device = weights.dtype, weights.device
        self.vocab_start, self.vocab_stop = parallel.split_padded(cfg.vocab_size)
        names = cfg.names
        base = f"{names.base}." if f"{names.base}.{names.embed}.weight" in weights else ""
        self.embed = self._vocab_rows(weights, f"{base}{names.embed}.weight")
        self.embed_norm = load_norm(cfg, weights, f"{base}{names.embed_norm}") if names.embed_norm else None
        self.positions = weights.get(f"{base}{names.positions}.weight") if names.positions else None  # every rank whole
        tied = cfg.tie_word_embeddings or "lm_head.weight" not in weights
        head = self.embed if tied else self._vocab_rows(weights, "lm_head.weight")
        if weights.int8_embeddings:  # LORAX_QUANTIZE_EMBEDDINGS=int8 with --quantize: one int8 copy of each table
            self.lm_head = QuantizedRows(head, self.dtype)
            self.embed = self.lm_head if tied else QuantizedRows(self.embed, self.dtype)
        else:
            self.lm_head = Linear(head)
        self.layers = [
            DecoderLayer(cfg, weights, parallel, i, f"{base}{names.layers}.{i}") for i in range(cfg.num_layers)
        ]
        self.norm = load_norm(cfg, weights, f"{base}{names.final_norm}")
        self.rotaries = {
            name: Rotary(params, cfg.head_dim, cfg.max_position_embeddings, self.device, self.dtype)
            for name, params in (cfg.rope if cfg.rotary else {}).items()
        }
        self.num_kv_heads = self.layers[0].num_kv_heads
        multiplier = cfg.embedding_multiplier
        if cfg.embedding_multiplier_in_dtype:
            multiplier = torch.tensor(multiplier, dtype=self.dtype, device=self.device)
        self.embed_multiplier = None if cfg.embedding_multiplier == 1.0 else multiplier

    def _vocab_rows(self, weights: Weights, name: str) -> torch.Tensor:
        """This rank's vocab rows of `name`, zero rows past the vocabulary: ids never select them, and the logits
        they give are dropped after the gather."""
        rows = weights.get_rows(name, self.vocab_start, min(self.vocab_stop, self.cfg.vocab_size))
        return F.pad(rows, (0, 0, 0, self.vocab_stop - self.vocab_start - rows.shape[0]))

    def lora_shapes(self) -> dict[str, ModuleShape]:
        """Full sizes of each LoRA-targetable linear and the slice this rank holds, by the checkpoint's module names
        (a fused module's adapters are fused alike)."""
        layer, hidden, inter, names = self.layers[0], self.cfg.hidden_size, self.cfg.intermediate_size, self.cfg.names
        q_full, kv_full = self.cfg.num_heads * self.cfg.head_dim, self.cfg.num_kv_heads * self.cfg.head_dim
        if len(names.qkv) == 1:
            shapes = {names.qkv[0]: fused_shape(hidden, q_full + 2 * kv_full, layer.qkv_rows)}
        else:
            shapes = {
                name: ModuleShape(hidden, full, "out", *rows)
                for name, full, rows in zip(names.qkv, (q_full, kv_full, kv_full),
                                            (layer.q_range, layer.kv_range, layer.kv_range))
            }
        shapes[names.o] = ModuleShape(q_full, hidden, "in", *layer.q_range)
        if self.cfg.moe is not None:  # MLPs take no adapters where some layers have experts
            return shapes
        if len(names.gate_up) == 1:  # Phi-3's fused gate_up_proj, or a plain MLP's up projection
            shapes[names.gate_up[0]] = fused_shape(hidden, len(layer.gate_up_rows) * inter, layer.gate_up_rows)
        else:
            shapes.update({name: ModuleShape(hidden, inter, "out", *layer.inter_range) for name in names.gate_up})
        shapes[names.down] = ModuleShape(inter, hidden, "in", *layer.inter_range)
        return shapes

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token occupies on this rank (all layers, keys and values)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.cfg.num_layers * self.num_kv_heads * self.cfg.head_dim * element

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size == 1:
            out = self.embed[input_ids]
        else:
            local = input_ids - self.vocab_start
            inside = (local >= 0) & (local < self.embed.shape[0])
            out = self.embed[torch.where(inside, local, 0)] * inside.unsqueeze(-1).to(self.dtype)
            out = self.parallel.all_reduce(out)
        if self.embed_multiplier is not None:
            out = out * self.embed_multiplier
        if self.positions is not None:
            out = out + self.positions[positions]
        return out if self.embed_norm is None else self.embed_norm(out)

    def _finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.cfg.logits_scaling != 1.0:
            logits = logits / self.cfg.logits_scaling
        if self.cfg.final_softcap is not None:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits.float()

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
        logit_rows: torch.Tensor,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        """Logits [len(logit_rows), vocab] for the selected flat tokens; K/V of every token go to the cache.

        kv_cache is [layers, 2, kv_heads, slots, head_dim].
        """
        hidden = self._embed(input_ids, meta.positions)
        rotary = {name: rotary.tables(meta.positions) for name, rotary in self.rotaries.items()}
        for i, layer in enumerate(self.layers):
            hidden = layer.forward(hidden, rotary, kv_cache[i], meta, lora)
        hidden = self.norm(hidden[logit_rows])
        logits = self.parallel.all_gather_last_dim(self.lm_head(hidden))
        if logits.shape[-1] != self.cfg.vocab_size:
            logits = logits[:, : self.cfg.vocab_size].contiguous()
        return self._finish_logits(logits)
