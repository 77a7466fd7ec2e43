"""The packed projection computes x @ W.T for any row count, as F.linear does."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorax_server.layers import linear
from lorax_server.layers.linear import Linear


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [0, 1, 7, 14, 15, 32, 300])
@pytest.mark.parametrize("out_features", [96, 100, 7])
def test_linear_matches_f_linear(dtype: torch.dtype, tolerance: float, rows: int, out_features: int) -> None:
    """Row counts around the kernel's 14-row tiles and 128-row chunks; outputs filling whole panels of 32, a last
    panel partly used beyond 16 outputs, and fewer than one vector."""
    torch.manual_seed(rows)
    weight = torch.randn(out_features, 40, dtype=dtype)
    x = torch.randn(rows, 40, dtype=dtype)
    expected = F.linear(x.float(), weight.float())
    got = Linear(weight)(x)
    assert got.shape == (rows, out_features) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance * 10)


def test_linear_reads_strided_activations() -> None:
    """Activations sliced out of a wider tensor (e.g. one head group of a fused projection) multiply correctly."""
    weight = torch.randn(16, 24)
    wide = torch.randn(5, 48)
    torch.testing.assert_close(Linear(weight)(wide[:, ::2]), F.linear(wide[:, ::2], weight))


def test_cpu_weights_are_held_packed() -> None:
    """On CPU a float32 weight is held in panels of 32 outputs where the AVX-512 kernel runs (else in oneDNN's
    blocked layout), and bfloat16 in oneDNN's layout: never as the dense tensor it came from."""
    weight = torch.randn(40, 24)
    held = Linear(weight)
    assert (held.out_features, held.in_features) == (40, 24)
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        assert held.weight.shape == (2, 24, linear.PANEL)
        assert torch.equal(held.weight[1, :, :8], weight[32:].T) and not held.weight[1, :, 8:].any()
    elif linear._ONEDNN:
        assert held.weight.layout == torch._mkldnn
    if linear._ONEDNN:
        assert Linear(weight.bfloat16()).weight.layout == torch._mkldnn


def test_linear_keeps_leading_dimensions() -> None:
    weight = torch.randn(33, 24)
    x = torch.randn(2, 3, 24)
    torch.testing.assert_close(Linear(weight)(x), F.linear(x, weight))
