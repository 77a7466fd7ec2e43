"""GPTQ and AWQ checkpoints: integer codes packed into int32 words with per-group fp16 scales and packed zeros.

GPTQ (AutoGPTQ / GPTQModel): `qweight` [in / per_word, out] packs consecutive *input* features, lowest bits
first; `qzeros` [groups, out / per_word] packs output features the same way and stores zero - 1 unless the
checkpoint format is `gptq_v2`; `g_idx` [in] names each input's group (a permutation under act-order).
AWQ (AutoAWQ, GEMM layout): `qweight` [in, out / 8] and `qzeros` [groups, out / 8] pack *output* features in the
interleaved order 0, 2, 4, 6, 1, 3, 5, 7; zeros are stored as they are and groups are always plain.
"""
from __future__ import annotations

import torch

from lorax_server.quantization.grouped import GroupedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a word holds output column AWQ_ORDER[k] of its 8
SUPPORTED_BITS = (4, 8)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Split each int32 into 32 // bits codes along `dim`, lowest bits first (uint8 result)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    words = packed.to(torch.int32).unsqueeze(dim + 1)
    view = [1] * words.dim()
    view[dim + 1] = per_word
    codes = (words >> shifts.view(view)) & ((1 << bits) - 1)
    shape = list(packed.shape)
    shape[dim] *= per_word
    return codes.reshape(shape).to(torch.uint8)


def read_gptq(tensors: dict[str, torch.Tensor], bits: int, group_size: int, zero_offset: int) -> GroupedWeight:
    """A GPTQ linear from its `qweight`, `qzeros`, `scales` and (optional) `g_idx`; `zero_offset` is 1 for the
    original format, which stores zero - 1, and 0 for `gptq_v2`."""
    _check_bits(bits)
    codes = unpack_int32(tensors["qweight"], bits, dim=0).t()  # [out, in]
    in_features = codes.shape[1]
    group_size = _effective_group(group_size, in_features)
    zeros = unpack_int32(tensors["qzeros"], bits, dim=1).float() + zero_offset  # [groups, out]
    g_idx = tensors["g_idx"].long() if "g_idx" in tensors else torch.arange(in_features) // group_size
    return GroupedWeight(
        codes=codes.contiguous(), table=torch.arange(1 << bits, dtype=torch.float32),
        scale=tensors["scales"].float().t().contiguous(), zero=zeros.t().contiguous(), g_idx=g_idx,
        group_size=group_size, bits=bits,
    )


def read_awq(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> GroupedWeight:
    """An AWQ GEMM linear from its `qweight`, `qzeros` and `scales`."""
    if bits != 4:
        raise ValueError(f"AWQ checkpoints with {bits}-bit weights are not supported (4-bit only)")
    unorder = torch.tensor([AWQ_ORDER.index(c) for c in range(8)])

    def unpack(packed: torch.Tensor) -> torch.Tensor:
        codes = unpack_int32(packed, bits, dim=1)
        return codes.reshape(codes.shape[0], -1, 8)[:, :, unorder].reshape(codes.shape)

    codes = unpack(tensors["qweight"]).t()  # [out, in]
    in_features = codes.shape[1]
    group_size = _effective_group(group_size, in_features)
    return GroupedWeight(
        codes=codes.contiguous(), table=torch.arange(16, dtype=torch.float32),
        scale=tensors["scales"].float().t().contiguous(), zero=unpack(tensors["qzeros"]).float().t().contiguous(),
        g_idx=torch.arange(in_features) // group_size, group_size=group_size, bits=bits,
    )


def _effective_group(group_size: int, in_features: int) -> int:
    """-1 (and any group wider than the inputs) means one group over every input."""
    return in_features if group_size == -1 or group_size > in_features else group_size


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"GPTQ checkpoints with {bits}-bit weights are not supported (bits: 4 or 8)")
