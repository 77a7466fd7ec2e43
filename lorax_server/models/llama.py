"""The Llama architecture family (Llama, Mistral, Qwen2, SmolLM): RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU MLP, tied or untied embeddings, optional qkv bias; tensor-parallel across shards.

Column-parallel: q/k/v (split by heads) and gate/up (split by intermediate features). Row-parallel with an
all-reduce: o and down. Vocab-parallel: embedding and lm_head (logits all-gathered).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorax_server.dist import Parallel
from lorax_server.adapters.weights import ModuleShape
from lorax_server.layers.attention import AttentionMetadata, paged_attention
from lorax_server.layers.linear import Linear
from lorax_server.layers.lora import LoraBatch
from lorax_server.layers.rotary import Rotary, apply_rotary
from lorax_server.weights import Weights

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class LlamaConfig:
    """The config.json fields this implementation reads."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    max_position_embeddings: int
    raw: dict

    @classmethod
    def from_dict(cls, cfg: dict) -> "LlamaConfig":
        arch = (cfg.get("architectures") or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture '{arch}' (supported: {', '.join(ARCHITECTURES)})")
        heads = cfg["num_attention_heads"]
        is_qwen2 = cfg.get("model_type") == "qwen2"
        attention_bias = bool(cfg.get("attention_bias", False))
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", not is_qwen2) else None
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=window,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            raw=cfg,
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as the reference checkpoints were trained. Float32 inputs take torch's fused
    kernel (the same arithmetic in one pass); narrower ones round to their dtype before the weight, as the
    checkpoints' reference code does."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def kv_heads_for_rank(cfg: LlamaConfig, parallel: Parallel) -> tuple[int, int]:
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


class LlamaLayer:
    """One decoder layer holding this rank's slices of the weights."""

    def __init__(self, cfg: LlamaConfig, weights: Weights, parallel: Parallel, index: int):
        p = f"model.layers.{index}"
        self.parallel = parallel
        self.eps = cfg.rms_norm_eps
        d = cfg.head_dim
        q0, q1 = parallel.split(cfg.num_heads, "num_attention_heads")
        k0, k1 = kv_heads_for_rank(cfg, parallel)
        self.index = index
        self.num_heads, self.num_kv_heads, self.head_dim = q1 - q0, k1 - k0, d
        self.q_range, self.kv_range = (q0 * d, q1 * d), (k0 * d, k1 * d)
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        qkv = [
            weights.get_rows(f"{p}.self_attn.q_proj.weight", q0 * d, q1 * d),
            weights.get_rows(f"{p}.self_attn.k_proj.weight", k0 * d, k1 * d),
            weights.get_rows(f"{p}.self_attn.v_proj.weight", k0 * d, k1 * d),
        ]
        self.qkv = Linear(torch.cat(qkv))
        self.qkv_bias = None
        if cfg.qkv_bias:
            self.qkv_bias = torch.cat([
                weights.get_rows(f"{p}.self_attn.q_proj.bias", q0 * d, q1 * d),
                weights.get_rows(f"{p}.self_attn.k_proj.bias", k0 * d, k1 * d),
                weights.get_rows(f"{p}.self_attn.v_proj.bias", k0 * d, k1 * d),
            ])
        self.o = Linear(weights.get_cols(f"{p}.self_attn.o_proj.weight", q0 * d, q1 * d))
        self.o_bias = weights.get(f"{p}.self_attn.o_proj.bias") if cfg.o_bias else None
        i0, i1 = parallel.split(cfg.intermediate_size, "intermediate_size")
        self.inter, self.inter_range = i1 - i0, (i0, i1)
        gate_up = [weights.get_rows(f"{p}.mlp.gate_proj.weight", i0, i1), weights.get_rows(f"{p}.mlp.up_proj.weight", i0, i1)]
        self.gate_up = Linear(torch.cat(gate_up))
        self.down = Linear(weights.get_cols(f"{p}.mlp.down_proj.weight", i0, i1))
        if cfg.mlp_bias:
            raise ValueError("mlp_bias=true checkpoints are not supported")
        self.input_norm = weights.get(f"{p}.input_layernorm.weight")
        self.post_norm = weights.get(f"{p}.post_attention_layernorm.weight")
        self.scale = d**-0.5

    def _row_parallel(
        self, x: torch.Tensor, linear: Linear, bias: torch.Tensor | None, lora: LoraBatch | None, group: str
    ) -> torch.Tensor:
        out = linear(x)
        if lora is not None:  # the partial x@A sums over ranks in the same all-reduce as the base output
            out = lora.apply(group, self.index, x, out)
        out = self.parallel.all_reduce(out)
        return out + bias if bias is not None else out

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        lora: LoraBatch | None,
    ) -> torch.Tensor:
        x = rms_norm(hidden, self.input_norm, self.eps)
        qkv = self.qkv(x)
        if lora is not None:
            qkv = lora.apply("qkv", self.index, x, qkv)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        tokens, heads = x.shape[0], self.num_heads
        qk = apply_rotary(qkv[:, : self.q_size + self.kv_size].view(tokens, heads + self.num_kv_heads, self.head_dim), cos, sin)
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[:, self.q_size + self.kv_size :].view(tokens, self.num_kv_heads, self.head_dim)
        attn = paged_attention(q, k, v, kv_cache, meta, self.scale)
        hidden = hidden + self._row_parallel(attn, self.o, self.o_bias, lora, "o")

        x = rms_norm(hidden, self.post_norm, self.eps)
        gate_up = self.gate_up(x)
        if lora is not None:
            gate_up = lora.apply("gate_up", self.index, x, gate_up)
        gate, up = gate_up.split([self.inter, self.inter], dim=-1)
        return hidden + self._row_parallel(F.silu(gate) * up, self.down, None, lora, "down")


class LlamaModel:
    """Weights of one rank plus the forward pass over a flat batch of tokens."""

    def __init__(self, config: dict, weights: Weights, parallel: Parallel):
        cfg = LlamaConfig.from_dict(config)
        self.cfg, self.parallel = cfg, parallel
        self.dtype, self.device = weights.dtype, weights.device
        self.vocab_start, self.vocab_stop = parallel.split(cfg.vocab_size, "vocab_size")
        self.embed = weights.get_rows("model.embed_tokens.weight", self.vocab_start, self.vocab_stop)
        if cfg.tie_word_embeddings or "lm_head.weight" not in weights:
            self.lm_head = Linear(self.embed)
        else:
            self.lm_head = Linear(weights.get_rows("lm_head.weight", self.vocab_start, self.vocab_stop))
        self.layers = [LlamaLayer(cfg, weights, parallel, i) for i in range(cfg.num_layers)]
        self.norm = weights.get("model.norm.weight")
        self.rotary = Rotary(config, cfg.head_dim, cfg.max_position_embeddings, self.device, self.dtype)
        self.num_kv_heads = self.layers[0].num_kv_heads

    def lora_shapes(self) -> dict[str, ModuleShape]:
        """Full sizes of each LoRA-targetable linear and the slice this rank holds."""
        layer, hidden, inter = self.layers[0], self.cfg.hidden_size, self.cfg.intermediate_size
        q_full, kv_full = self.cfg.num_heads * self.cfg.head_dim, self.cfg.num_kv_heads * self.cfg.head_dim
        return {
            "q_proj": ModuleShape(hidden, q_full, "out", *layer.q_range),
            "k_proj": ModuleShape(hidden, kv_full, "out", *layer.kv_range),
            "v_proj": ModuleShape(hidden, kv_full, "out", *layer.kv_range),
            "o_proj": ModuleShape(q_full, hidden, "in", *layer.q_range),
            "gate_proj": ModuleShape(hidden, inter, "out", *layer.inter_range),
            "up_proj": ModuleShape(hidden, inter, "out", *layer.inter_range),
            "down_proj": ModuleShape(inter, hidden, "in", *layer.inter_range),
        }

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token occupies on this rank (all layers, keys and values)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.cfg.num_layers * self.num_kv_heads * self.cfg.head_dim * element

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size == 1:
            return self.embed[input_ids]
        local = input_ids - self.vocab_start
        inside = (local >= 0) & (local < self.embed.shape[0])
        out = self.embed[torch.where(inside, local, 0)] * inside.unsqueeze(-1).to(self.dtype)
        return self.parallel.all_reduce(out)

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
        hidden = self._embed(input_ids)
        cos, sin = self.rotary.tables(meta.positions)
        for i, layer in enumerate(self.layers):
            hidden = layer.forward(hidden, cos, sin, kv_cache[i], meta, lora)
        hidden = rms_norm(hidden[logit_rows], self.norm, self.cfg.rms_norm_eps)
        logits = self.lm_head(hidden)
        return self.parallel.all_gather_last_dim(logits).float()
