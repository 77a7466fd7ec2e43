"""The fused CPU kernels: decode attention reading the paged cache in place equals the gathered, masked path, and
RMSNorm equals the reference formula."""
from __future__ import annotations

import pytest
import torch

from lorax_server.layers import attention, cpu_ops


def run_decode(monkeypatch, in_place: bool, window: int | None, layer_window: int | None, softcap: float | None,
               dim: int = 64):
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, blocks = 8, 2, 16
    kv_lens = torch.tensor([1, 40, 17, 33, 16])
    tables = torch.tensor([[5, 0, 0], [1, 9, 3], [12, 2, 0], [7, 15, 11], [4, 0, 0]])  # scattered blocks
    q, k, v = (torch.randn(5, h, dim, generator=gen) for h in (heads, kv_heads, kv_heads))
    cache = torch.randn(2, kv_heads, blocks * 16, dim, generator=gen)
    if not in_place:
        monkeypatch.setattr(cpu_ops, "supports", lambda dtype: False)
    meta = attention.build_metadata(torch.ones_like(kv_lens), kv_lens, tables, 16, window, 1, 40)
    out = attention.paged_attention(q, k, v, cache, meta, dim**-0.5, layer_window, softcap)
    monkeypatch.undo()
    return out, cache, meta


@pytest.mark.parametrize("dim", [64, 128, 24])  # the kernel's two register-resident head sizes, and its general loop
@pytest.mark.parametrize("window,layer_window,softcap", [(None, None, None), (20, None, None), (None, 7, 30.0), (12, 5, None)])
def test_in_place_decode_equals_the_gathered_path(monkeypatch, window, layer_window, softcap, dim):
    fast, cache_fast, meta = run_decode(monkeypatch, True, window, layer_window, softcap, dim)
    assert meta.mask is None and meta.decode_bias is None, "the kernel needs no mask"
    slow, cache_slow, meta = run_decode(monkeypatch, False, window, layer_window, softcap, dim)
    assert meta.mask is not None, "the fallback built its masks when it needed them"
    assert torch.equal(cache_fast, cache_slow), "both paths write the new keys and values alike"
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_a_query_sees_only_its_own_requests_keys():
    """Changing another request's blocks, or slots past a request's length, leaves its output alone."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 64, generator=gen)
    cache = torch.randn(2, 2, 8 * 16, 64, generator=gen)
    tables, lens = torch.tensor([[2, 5], [3, 0]]), torch.tensor([20, 9])
    before = cpu_ops.attend(q, cache, tables, lens, 16, 0.2, None, None)
    cache[:, :, 3 * 16 + 9 : 4 * 16] = 100.0  # the rest of request 1's block, past its 9 tokens
    cache[:, :, 5 * 16 + 4 : 6 * 16] = 0.0  # the rest of request 0's second block, past its 20 tokens
    for block in (0, 1, 4, 6, 7):  # blocks neither owns
        cache[:, :, block * 16 : (block + 1) * 16] = -3.0
    after = cpu_ops.attend(q, cache, tables, lens, 16, 0.2, None, None)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 576), (33, 64), (3, 5, 40)])
def test_rms_norm_equals_the_reference_formula(shape):
    gen = torch.Generator().manual_seed(2)
    x, weight = torch.randn(*shape, generator=gen) * 3, torch.randn(shape[-1], generator=gen)
    expected = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(cpu_ops.rms_norm(x, weight, 1e-5), expected, rtol=2e-6, atol=2e-6)
    strided = x.transpose(0, -1).contiguous().transpose(0, -1)  # not contiguous: the kernel copies it first
    torch.testing.assert_close(cpu_ops.rms_norm(strided, weight, 1e-5), expected, rtol=2e-6, atol=2e-6)
