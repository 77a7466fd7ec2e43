"""ALiBi (attention with linear biases; Bloom, the first Falcons): no rotary; each head adds slope * (key position -
query position) to its scores, with per-head slopes forming a geometric sequence. Softmax ignores a constant per
query row, so this equals the reference's slope * key position."""
from __future__ import annotations

import math


def alibi_slopes(num_heads: int) -> list[float]:
    """The slopes of `num_heads` heads as transformers computes them (in float32): for the largest power of two
    p <= num_heads, the powers r, r^2, ..., r^p of r = 2^(-8/p); the remaining heads take the odd powers r', r'^3, ...
    of r' = 2^(-4/p), the ratio of a model with 2p heads."""
    p = 2 ** math.floor(math.log2(num_heads))
    ratio, extra = 2.0 ** (-8.0 / p), 2.0 ** (-4.0 / p)
    return [ratio**k for k in range(1, p + 1)] + [extra ** (2 * k + 1) for k in range(num_heads - p)]
