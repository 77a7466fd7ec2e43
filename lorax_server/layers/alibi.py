"""ALiBi (attention with linear biases; Bloom, the first Falcons, MPT): no rotary; each head adds slope * (key
position - query position) to its scores, with per-head slopes forming a geometric sequence. Softmax ignores a
constant per query row, so this equals the reference's slope * key position."""
from __future__ import annotations

import math


def alibi_slopes(num_heads: int) -> list[float]:
    """The slopes of `num_heads` heads as transformers computes them (in float32): for the largest power of two
    p <= num_heads, the powers r, r^2, ..., r^p of r = 2^(-8/p); the remaining heads take the odd powers r', r'^3, ...
    of r' = 2^(-4/p), the ratio of a model with 2p heads."""
    p = 2 ** math.floor(math.log2(num_heads))
    ratio, extra = 2.0 ** (-8.0 / p), 2.0 ** (-4.0 / p)
    return [ratio**k for k in range(1, p + 1)] + [extra ** (2 * k + 1) for k in range(num_heads - p)]


def mpt_alibi_slopes(num_heads: int, bias_max: float = 8.0) -> list[float]:
    """The slopes of MPT's `num_heads` heads as its code derives them from `alibi_bias_max`: for the smallest power of
    two p >= num_heads, the slopes 2^(-bias_max * k / p), k = 1..p; when p is larger, the even k come first, then the
    odd, and the first num_heads of those are kept. With bias_max 8 (every released MPT) these are Bloom's slopes."""
    p = 2 ** math.ceil(math.log2(num_heads))
    slopes = [2.0 ** (-bias_max * k / p) for k in range(1, p + 1)]
    if p != num_heads:
        slopes = slopes[1::2] + slopes[::2]
    return slopes[:num_heads]
