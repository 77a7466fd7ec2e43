"""The multi-LoRA op on CUDA as two Triton kernels over the slot pools (the gathered "shrink" and "expand" of
S-LoRA/Punica): no per-batch stacks, each token reads only its own adapter's rows.

shrink: one program per token computes xa = x @ A_rows^T for that token's rank rows (float32, width padded to a
power of two, rows of -1 contribute nothing). expand: one program per (token, block of output features) adds
xa @ B_rows into y in place. Base-model tokens (slot -1) are left untouched, so their delta is exactly zero, as on
the CPU kernel. Triton ships with every CUDA build of torch; the same kernels run on CPU tensors under
TRITON_INTERPRET=1, which is how the tests check them against `lora_apply_reference` on a machine without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_K = 128
_BLOCK_N = 128


@triton.jit
def _token_rows(rows_ptr, slot_ptr, t, width, rows_stride, W: tl.constexpr):
    """Token t's slot, the rank positions 0..W-1, its pool rows there and which of them are real (the row table pads
    with -1; base-model tokens, slot -1, read no rows)."""
    slot = tl.load(slot_ptr + t)
    r = tl.arange(0, W)
    in_rank = r < tl.where(slot >= 0, width, 0)
    row = tl.load(rows_ptr + tl.maximum(slot, 0) * rows_stride + r, mask=in_rank, other=-1)
    return slot, r, row, in_rank & (row >= 0)


@triton.jit
def _shrink(x_ptr, a_ptr, rows_ptr, slot_ptr, xa_ptr, in_features, width, x_stride, a_stride, rows_stride,
            W: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    _, r, row, valid = _token_rows(rows_ptr, slot_ptr, t, width, rows_stride, W)
    row_start = tl.maximum(row, 0).to(tl.int64) * a_stride
    acc = tl.zeros((W,), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < in_features
        xv = tl.load(x_ptr + t * x_stride + k, mask=k_ok, other=0.0).to(tl.float32)
        av = tl.load(a_ptr + row_start[:, None] + k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(av.to(tl.float32) * xv[None, :], axis=1)
    tl.store(xa_ptr + t * W + r, acc)


@triton.jit
def _expand(xa_ptr, b_ptr, rows_ptr, slot_ptr, y_ptr, out_features, width, y_stride, out_start, b_stride,
            rows_stride, W: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    block = tl.program_id(1)
    slot, r, row, valid = _token_rows(rows_ptr, slot_ptr, t, width, rows_stride, W)
    xa = tl.load(xa_ptr + t * W + r, mask=valid, other=0.0)
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < out_features
    row_start = tl.maximum(row, 0).to(tl.int64) * b_stride
    bv = tl.load(b_ptr + row_start[:, None] + n[None, :], mask=valid[:, None] & n_ok[None, :], other=0.0)
    delta = tl.sum(bv.to(tl.float32) * xa[:, None], axis=0)
    store = n < tl.where(slot >= 0, out_features, 0)
    target = y_ptr + t * y_stride + out_start + n
    old = tl.load(target, mask=store, other=0.0)
    tl.store(target, (old.to(tl.float32) + delta).to(old.dtype), mask=store)


def lora_apply_triton(
    y: torch.Tensor, x: torch.Tensor, token_slot: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor],
    rows: list[torch.Tensor], out_start: list[int], layer: int,
) -> None:
    """Same contract as `lora_apply_reference`: add every token's adapter delta to y ([T, out]) in place."""
    tokens = x.shape[0]
    if tokens == 0:
        return
    x = x.contiguous()
    for a_pool, b_pool, table, offset in zip(a, b, rows, out_start):
        width = table.shape[1]
        padded = triton.next_power_of_2(max(width, 1))
        a_layer, b_layer = a_pool[layer], b_pool[layer]  # [rows, in], [rows, out], contiguous views
        xa = torch.empty(tokens, padded, dtype=torch.float32, device=x.device)
        _shrink[(tokens,)](
            x, a_layer, table, token_slot, xa, x.shape[1], width, x.stride(0), a_layer.stride(0), table.stride(0),
            W=padded, BLOCK_K=_BLOCK_K,
        )
        out = b_layer.shape[1]
        _expand[(tokens, triton.cdiv(out, _BLOCK_N))](
            xa, b_layer, table, token_slot, y, out, width, y.stride(0), offset, b_layer.stride(0), table.stride(0),
            W=padded, BLOCK_N=_BLOCK_N,
        )
