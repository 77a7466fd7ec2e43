"""The packed projection computes x @ W.T for any row count, as F.linear does."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorax_server.layers import linear
from lorax_server.layers.linear import Linear


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [0, 1, 7, 32, 300])
def test_linear_matches_f_linear(dtype: torch.dtype, tolerance: float, rows: int) -> None:
    torch.manual_seed(rows)
    weight = torch.randn(96, 40, dtype=dtype)
    x = torch.randn(rows, 40, dtype=dtype)
    expected = F.linear(x.float(), weight.float())
    got = Linear(weight)(x)
    assert got.shape == (rows, 96) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance * 10)


def test_linear_reads_strided_activations() -> None:
    """Activations sliced out of a wider tensor (e.g. one head group of a fused projection) multiply correctly."""
    weight = torch.randn(16, 24)
    wide = torch.randn(5, 48)
    torch.testing.assert_close(Linear(weight)(wide[:, ::2]), F.linear(wide[:, ::2], weight))


def test_cpu_weights_are_held_in_onednn_layout() -> None:
    """On CPU the float32 weight is held in oneDNN's blocked layout, not as the dense tensor it came from."""
    weight = torch.randn(16, 24)
    packed = Linear(weight)
    if linear._ONEDNN:
        assert packed.weight.layout == torch._mkldnn
    assert (packed.out_features, packed.in_features) == (16, 24)
