"""Dense projections (`y = x @ W.T`) with the weight laid out once, at load time, for the fastest kernel.

On CPU, float32 weights are held in panels of 32 outputs for `dense_cpu.cpp`, which streams them with prefetching
on AVX-512 CPUs: 20-26% faster than oneDNN at decode's 1-32 rows, where a step waits on the weights arriving from
memory. Elsewhere on CPU (bfloat16, or no AVX-512), oneDNN's inner product with the weight reordered once into its
blocked layout: MKL's sgemm repacks the weight on every call and takes its AVX2 path on AMD CPUs, 2-3x slower.
On CUDA, `F.linear` (cuBLAS) is kept.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lorax_server.layers import cpp_build

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
# Private ops (the ones torch.compile's CPU backend emits): checked once, so a torch without them falls back.
_ONEDNN = torch.backends.mkldnn.is_available() and all(
    hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise")
)
PANEL = 32  # outputs per panel of the packed float32 layout
_SOURCE = Path(__file__).with_name("dense_cpu.cpp")
_packed_op = None


def packed_op():
    """torch.ops.lorax_dense.packed_linear, built on first use and cached on this machine."""
    global _packed_op
    if _packed_op is None:
        cpp_build.load("lorax_dense_cpu", _SOURCE, "lorax_dense",
                       {"packed_linear": "(Tensor x, Tensor w, int out_features) -> Tensor"})
        _packed_op = torch.ops.lorax_dense.packed_linear
    return _packed_op


def _use_packed(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))


def _use_onednn(weight: torch.Tensor) -> bool:
    return _ONEDNN and weight.device.type == "cpu" and weight.dtype in _ONEDNN_DTYPES


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [panels, in, 32]: each panel's 32 outputs side by side for every input, outputs zero-padded."""
    out_features, in_features = weight.shape
    panels = -(-out_features // PANEL)
    padded = weight.new_zeros(panels * PANEL, in_features)
    padded[:out_features] = weight
    return padded.view(panels, PANEL, in_features).transpose(1, 2).contiguous()


class Linear:
    """A weight [out, in] ready to multiply [tokens, in] activations. On CPU only the packed or blocked copy is held,
    so the dense tensor is freed when its owner drops it (a tied embedding keeps its own for lookups)."""

    def __init__(self, weight: torch.Tensor):
        self.out_features, self.in_features = weight.shape
        self._packed = _use_packed(weight)
        self._onednn = not self._packed and _use_onednn(weight)
        if self._packed:
            packed_op()  # build (or load) the kernel now, not on the first request
            self.weight = pack(weight)
        elif self._onednn:
            # The row count is only a layout hint: the blocked weight serves any number of rows.
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 128)
        else:
            self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed:
            flat = x.reshape(-1, self.in_features).contiguous()
            return packed_op()(flat, self.weight, self.out_features).view(*x.shape[:-1], self.out_features)
        if self._onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        return F.linear(x, self.weight)


if __name__ == "__main__":  # build the kernel ahead of time
    packed_op()
    print("lorax CPU dense kernel ready")
