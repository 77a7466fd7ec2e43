"""Next-token choice for a whole batch at once, in the reference's order (spec 5.9): watermark, penalties, the
JSON-schema mask, temperature, top-k, top-p, typical-p, then greedy argmax or seeded sampling.

Sampling uses the Gumbel-max trick with counter-based noise: the noise for (seed, step, token) is a hash, so
a request's output depends only on its own seed and never on which other requests share its batch, and all
rows are sampled with tensor ops (no per-request generator loop).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

from lorax_server.uploads import upload

_MASK32 = 0xFFFFFFFF
WATERMARK_KEY = 15485863  # Kirchenbauer et al.'s hash key: the green list after token t is seeded by KEY * t


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding values < 2**32."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def _row_uniforms(key: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1), shape [rows, vocab]: a hash of (row key, token id)."""
    idx = torch.arange(vocab, device=key.device, dtype=torch.int64)
    bits = _fmix32((key[:, None] + idx[None, :] * 0x9E3779B1) & _MASK32)
    return ((bits >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Deterministic uniforms in (0, 1), shape [rows, vocab], from each row's seed and step."""
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    return _row_uniforms(_fmix32(lo ^ _fmix32(hi ^ _fmix32((steps + 0x9E3779B9) & _MASK32))), vocab)


def green_list(prev_ids: torch.Tensor, vocab: int, gamma: float) -> torch.Tensor:
    """[rows, vocab] bool: the watermark's green tokens after each previous token, about a `gamma` share of the
    vocabulary. A pure function of (previous token, token id), so a detector that knows only the text can
    recompute it; KEY * t mod 2**32 is a bijection (KEY is odd), so different previous tokens get different lists."""
    return _row_uniforms(_fmix32((prev_ids * WATERMARK_KEY) & _MASK32), vocab) < gamma


def argmax_rows(x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """x.argmax(-1) for [rows, vocab] logits, first index on ties, about 3x faster on CPU: torch's argmax tracks
    indices element by element, while a max per chunk is vectorised and leaves one chunk per row to search."""
    rows, vocab = x.shape
    n = vocab // chunk
    if n < 2 or not x.is_contiguous() or x.device.type != "cpu":
        return x.argmax(-1)
    head = x[:, : n * chunk].view(rows, n, chunk)
    chunk_max = head.amax(-1)
    best = chunk_max.argmax(-1)  # the first chunk holding the row's maximum
    r = torch.arange(rows, device=x.device)
    ids = best * chunk + head[r, best].argmax(-1)
    if n * chunk < vocab:  # the last partial chunk wins only when strictly larger
        tail_max, tail_ids = x[:, n * chunk :].max(-1)
        ids = torch.where(tail_max > chunk_max[r, best], n * chunk + tail_ids, ids)
    return ids


@dataclass(frozen=True)
class Watermark:
    """Kirchenbauer et al.'s soft watermark: +delta to the green list chosen by the previous token."""

    gamma: float = 0.5
    delta: float = 2.0

    @classmethod
    def from_env(cls) -> "Watermark":
        """gamma and delta as the launcher passes them (--watermark-gamma/--watermark-delta)."""
        return cls(float(os.environ.get("WATERMARK_GAMMA", 0.5)), float(os.environ.get("WATERMARK_DELTA", 2.0)))


def u64_to_i64(value: int) -> int:
    """Store a u64 seed in an int64 tensor without losing bits."""
    return value - (1 << 64) if value >= (1 << 63) else value


def i64_to_u64(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


@dataclass(frozen=True)
class RowFlags:
    """Host copies of the per-row choices that decide which work a step does, so choosing that work never reads
    the device: which rows sample, carry a watermark, restrict the distribution (top-k/p, typical-p) or use
    penalties, and each row's seed (reported back with the text)."""

    sample: tuple[bool, ...]
    watermark: tuple[bool, ...]
    restrict: tuple[bool, ...]
    penalize: tuple[bool, ...]
    seed: tuple[int, ...]

    def select(self, rows: list[int]) -> "RowFlags":
        return RowFlags(*(tuple(getattr(self, f.name)[i] for i in rows) for f in fields(self)))

    @classmethod
    def cat(cls, parts: list["RowFlags"]) -> "RowFlags":
        return cls(*(sum((getattr(p, f.name) for p in parts), ()) for f in fields(cls)))

    @staticmethod
    def rows(flags: tuple[bool, ...]) -> list[int]:
        return [i for i, on in enumerate(flags) if on]


@dataclass
class SamplingParams:
    """One row per request; every field but `flags` is a tensor so the batch can be filtered and concatenated."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    typical_p: torch.Tensor
    repetition_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    seed: torch.Tensor  # int64 bits of the u64 seed
    flags: RowFlags

    @classmethod
    def from_pb(cls, params: list, device: torch.device) -> "SamplingParams":
        """From NextTokenChooserParameters messages. A request samples iff do_sample, or temperature not in
        {0, 1}, or top_k/top_p/typical_p restrict the distribution; temperature 0 means greedy."""
        def col(values, dtype):
            return upload(values, dtype, device)

        top_p = [p.top_p if 0 < p.top_p <= 1 else 1.0 for p in params]
        typical_p = [p.typical_p if 0 < p.typical_p <= 1 else 1.0 for p in params]
        repetition = [p.repetition_penalty or 1.0 for p in params]
        restrict = tuple(p.top_k > 0 or tp < 1 or ty < 1 for p, tp, ty in zip(params, top_p, typical_p))
        sample = tuple(
            p.temperature != 0 and (p.do_sample or p.temperature != 1.0 or r) for p, r in zip(params, restrict)
        )
        seeds = [u64_to_i64(p.seed) for p in params]
        return cls(
            temperature=col([p.temperature if p.temperature > 0 else 1.0 for p in params], torch.float32),
            top_k=col([p.top_k for p in params], torch.int64),
            top_p=col(top_p, torch.float32),
            typical_p=col(typical_p, torch.float32),
            repetition_penalty=col(repetition, torch.float32),
            frequency_penalty=col([p.frequency_penalty for p in params], torch.float32),
            presence_penalty=col([p.presence_penalty for p in params], torch.float32),
            seed=col(seeds, torch.int64),
            flags=RowFlags(
                sample=sample,
                watermark=tuple(bool(p.watermark) for p in params),
                restrict=restrict,
                penalize=tuple(
                    r != 1 or p.frequency_penalty != 0 or p.presence_penalty != 0 for p, r in zip(params, repetition)
                ),
                seed=tuple(seeds),
            ),
        )

    def select(self, rows: list[int], index: torch.Tensor) -> "SamplingParams":
        """The given rows; `index` is `rows` already on the device."""
        tensors = {f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "flags"}
        return SamplingParams(**tensors, flags=self.flags.select(rows))

    @classmethod
    def cat(cls, parts: list["SamplingParams"]) -> "SamplingParams":
        tensors = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls) if f.name != "flags"}
        return cls(**tensors, flags=RowFlags.cat([p.flags for p in parts]))

    @property
    def needs_counts(self) -> bool:
        """Whether penalties need per-request token counts."""
        return any(self.flags.penalize)

    def seed_of(self, row: int) -> int | None:
        """The u64 seed a sampling row used (None for greedy rows)."""
        return i64_to_u64(self.flags.seed[row]) if self.flags.sample[row] else None


def apply_watermark(logits: torch.Tensor, p: SamplingParams, prev_ids: torch.Tensor, watermark: Watermark) -> torch.Tensor:
    """+delta on the green list of the rows that asked for a watermark."""
    chosen = RowFlags.rows(p.flags.watermark)
    if not chosen:
        return logits
    rows = upload(chosen, torch.int64, logits.device)
    bonus = watermark.delta * green_list(prev_ids[rows], logits.shape[-1], watermark.gamma).to(logits.dtype)
    return logits.index_add(0, rows, bonus)


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
    if not any(p.flags.restrict):
        return logits  # temperature only: spare the two vocabulary-wide sorts
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
    logits: torch.Tensor,
    p: SamplingParams,
    steps: torch.Tensor,
    counts: torch.Tensor | None,
    lengths: torch.Tensor,
    *,
    prev_ids: torch.Tensor | None = None,
    watermark: Watermark = Watermark(),
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next token ids [B], their logprobs [B], and the processed log-probabilities [B, vocab].

    `prev_ids` [B] are the tokens before this position (needed by the watermark); `allowed` is (rows, [rows, vocab]
    bool), the tokens each JSON-schema-constrained row may take.
    """
    if prev_ids is not None:
        logits = apply_watermark(logits, p, prev_ids, watermark)
    if counts is not None:
        logits = apply_penalties(logits, p, counts, lengths)
    if allowed is not None:
        rows, mask = allowed
        logits = logits.index_put((rows,), logits[rows].masked_fill(~mask, float("-inf")))
    next_ids = argmax_rows(logits)
    sampled = RowFlags.rows(p.flags.sample)
    if sampled:
        rows = upload(sampled, torch.int64, logits.device)
        warped = warp(logits[rows], p.select(sampled, rows))
        gumbel = -torch.log(-torch.log(uniform_noise(p.seed[rows], steps[rows], logits.shape[-1])))
        next_ids[rows] = (warped + gumbel).argmax(-1)
        logits = logits.index_copy(0, rows, warped)
    logprobs = logits.log_softmax(-1)
    return next_ids, logprobs.gather(-1, next_ids[:, None]).squeeze(-1), logprobs
