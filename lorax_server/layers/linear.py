"""Dense projections (`y = x @ W.T`) with the weight laid out once, at load time, for the fastest kernel.

On CPU, `F.linear` calls MKL's sgemm, which repacks the weight on every call and takes its AVX2 path on AMD
CPUs; oneDNN's inner product with a weight reordered once into its blocked layout runs 2-3x faster, for the few
rows of a decode step as for a long prefill (float32 and bfloat16). On CUDA, `F.linear` (cuBLAS) is kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
# Private ops (the ones torch.compile's CPU backend emits): checked once, so a torch without them falls back.
_ONEDNN = torch.backends.mkldnn.is_available() and all(
    hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise")
)


def _use_onednn(weight: torch.Tensor) -> bool:
    return _ONEDNN and weight.device.type == "cpu" and weight.dtype in _ONEDNN_DTYPES


class Linear:
    """A weight [out, in] ready to multiply [tokens, in] activations. On CPU (float32/bfloat16) only the blocked copy is
    held, so the dense tensor is freed when its owner drops it (a tied embedding keeps its own for lookups)."""

    def __init__(self, weight: torch.Tensor):
        self.out_features, self.in_features = weight.shape
        self._onednn = _use_onednn(weight)
        # The row count is only a layout hint: the packed weight serves any number of rows.
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 128) if self._onednn else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        return F.linear(x, self.weight)
