"""Next-token choice for a whole batch at once: penalties, temperature, top-k, top-p, typical-p, then greedy
argmax or seeded sampling.

Sampling uses the Gumbel-max trick with counter-based noise: the noise for (seed, step, token) is a hash, so
a request's output depends only on its own seed and never on which other requests share its batch, and all
rows are sampled with tensor ops (no per-request generator loop).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

_MASK32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding values < 2**32."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Deterministic uniforms in (0, 1), shape [rows, vocab], from each row's seed and step."""
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    key = _fmix32(lo ^ _fmix32(hi ^ _fmix32((steps + 0x9E3779B9) & _MASK32)))
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _fmix32((key[:, None] + idx[None, :] * 0x9E3779B1) & _MASK32)
    return ((bits >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def u64_to_i64(value: int) -> int:
    """Store a u64 seed in an int64 tensor without losing bits."""
    return value - (1 << 64) if value >= (1 << 63) else value


def i64_to_u64(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


@dataclass
class SamplingParams:
    """One row per request; every field is a tensor so the batch can be filtered and concatenated."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    typical_p: torch.Tensor
    repetition_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    sample: torch.Tensor  # bool: this request samples (else greedy)
    seed: torch.Tensor  # int64 bits of the u64 seed

    @classmethod
    def from_pb(cls, params: list, device: torch.device) -> "SamplingParams":
        """From NextTokenChooserParameters messages. A request samples iff do_sample, or temperature not in
        {0, 1}, or top_k/top_p/typical_p restrict the distribution; temperature 0 means greedy."""
        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        sample = [
            p.temperature != 0
            and (p.do_sample or p.temperature != 1.0 or p.top_k > 0 or 0 < p.top_p < 1.0 or 0 < p.typical_p < 1.0)
            for p in params
        ]
        return cls(
            temperature=col([p.temperature if p.temperature > 0 else 1.0 for p in params], torch.float32),
            top_k=col([p.top_k for p in params], torch.int64),
            top_p=col([p.top_p if 0 < p.top_p <= 1 else 1.0 for p in params], torch.float32),
            typical_p=col([p.typical_p if 0 < p.typical_p <= 1 else 1.0 for p in params], torch.float32),
            repetition_penalty=col([p.repetition_penalty or 1.0 for p in params], torch.float32),
            frequency_penalty=col([p.frequency_penalty for p in params], torch.float32),
            presence_penalty=col([p.presence_penalty for p in params], torch.float32),
            sample=col(sample, torch.bool),
            seed=col([u64_to_i64(p.seed) for p in params], torch.int64),
        )

    def select(self, rows: torch.Tensor) -> "SamplingParams":
        return SamplingParams(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @classmethod
    def cat(cls, parts: list["SamplingParams"]) -> "SamplingParams":
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    @property
    def needs_counts(self) -> bool:
        """Whether penalties need per-request token counts."""
        return bool(
            (self.repetition_penalty != 1).any() or (self.frequency_penalty != 0).any() or (self.presence_penalty != 0).any()
        )


def apply_penalties(logits: torch.Tensor, p: SamplingParams, counts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Repetition penalty (divide positive / multiply negative logits of seen tokens), then frequency and
    presence penalties (OpenAI's definition, frequency normalised by the sequence length)."""
    seen = counts > 0
    rep = p.repetition_penalty[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    freq = p.frequency_penalty[:, None] * counts.to(logits.dtype) / lengths[:, None].to(logits.dtype)
    return logits - freq - p.presence_penalty[:, None] * seen.to(logits.dtype)


def warp(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and typical-p for sampling rows; masked tokens get -inf."""
    logits = logits / p.temperature[:, None]
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    k = torch.where(p.top_k > 0, p.top_k.clamp(max=vocab), vocab)
    remove |= torch.arange(vocab, device=logits.device)[None, :] >= k[:, None]
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    remove |= before >= p.top_p[:, None]
    logp = probs.clamp_min(1e-30).log()
    entropy = -(probs * logp).sum(-1, keepdim=True)
    surprise = (-logp - entropy).abs()
    typical_sorted, typical_order = surprise.sort(dim=-1)
    typical_probs = probs.gather(-1, typical_order)
    typical_before = typical_probs.cumsum(-1) - typical_probs
    typical_remove = typical_before >= p.typical_p[:, None]
    remove |= torch.zeros_like(remove).scatter(-1, typical_order, typical_remove)
    remove[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter(-1, order, sorted_logits)


def choose(
    logits: torch.Tensor, p: SamplingParams, steps: torch.Tensor, counts: torch.Tensor | None, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next token ids [B], their logprobs [B], and the processed log-probabilities [B, vocab]."""
    if counts is not None:
        logits = apply_penalties(logits, p, counts, lengths)
    next_ids = logits.argmax(-1)
    rows = p.sample.nonzero().squeeze(-1)
    if rows.numel():
        warped = warp(logits[rows], p.select(rows))
        gumbel = -torch.log(-torch.log(uniform_noise(p.seed[rows], steps[rows], logits.shape[-1])))
        next_ids[rows] = (warped + gumbel).argmax(-1)
        logits = logits.index_copy(0, rows, warped)
    logprobs = logits.log_softmax(-1)
    return next_ids, logprobs.gather(-1, next_ids[:, None]).squeeze(-1), logprobs
