"""bitsandbytes' formats: LLM.int8 (row-wise absmax int8) and blockwise 4-bit NF4/FP4, as the library stores them.

Quantizing follows bitsandbytes' reference arithmetic (its `quantize_4bit` / `int8_vectorwise_quant`), so a
float checkpoint quantized here holds the same codes as one quantized by transformers + bitsandbytes, and a
checkpoint that transformers saved pre-quantized reads into the same form.
"""
from __future__ import annotations

import json

import torch

from lorax_server.quantization.grouped import GroupedWeight

# The 4-bit codebooks, in code order (bitsandbytes.functional.get_4bit_type): NF4's normal-quantile levels, and
# FP4 (1 sign, 2 exponent, 1 mantissa bits) normalized by its largest magnitude, 12.
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
FP4 = tuple(
    v / 12 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
)
CODEBOOKS = {"nf4": NF4, "fp4": FP4}
BLOCKSIZE = 64  # bitsandbytes' default 4-bit block, as transformers uses it
INT8_ZERO = 128  # int8 codes are held as uint8 = int8 + 128


def codebook(quant_type: str) -> torch.Tensor:
    """The float32 levels of a 4-bit type."""
    return torch.tensor(CODEBOOKS[quant_type], dtype=torch.float32)


def quantize_4bit(weight: torch.Tensor, quant_type: str, blocksize: int = BLOCKSIZE) -> GroupedWeight:
    """Blockwise absmax 4-bit quantization of a float weight [out, in], each code the nearest level."""
    out_features, in_features = weight.shape
    if in_features % blocksize:
        raise ValueError(f"{in_features} input features are not a whole number of {blocksize}-value 4-bit blocks")
    blocks = weight.float().reshape(out_features, in_features // blocksize, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(-1), -1, 1)
    levels = codebook(quant_type)
    order = torch.argsort(levels)
    midpoints = (levels[order[:-1]] + levels[order[1:]]) / 2
    codes = order[torch.bucketize(scaled, midpoints)].to(torch.uint8).reshape(out_features, in_features)
    return _four_bit(codes, levels, absmax, blocksize)


def quantize_int8(weight: torch.Tensor) -> GroupedWeight:
    """LLM.int8's row-wise absmax quantization of a float weight [out, in] (`int8_vectorwise_quant`)."""
    absmax = weight.float().abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = torch.round(weight.float() * (127.0 / safe).unsqueeze(-1)).to(torch.int8)
    return _int8(codes, absmax)


def read_4bit(tensors: dict[str, torch.Tensor], quant_state: torch.Tensor) -> GroupedWeight:
    """A Linear4bit weight as transformers saves it: packed codes (`weight`, two per byte, first in the high
    nibble), `absmax` (8-bit blockwise itself when `nested_absmax` is there), `quant_map` and a JSON state."""
    state = json.loads(bytes(quant_state.to(torch.uint8).tolist()).decode("utf-8"))
    out_features, in_features = state["shape"]
    blocksize = int(state["blocksize"])
    if in_features % blocksize:
        raise ValueError(f"4-bit blocks of {blocksize} values straddle rows of {in_features} inputs: not supported")
    packed = tensors["weight"].contiguous().view(torch.uint8).reshape(-1)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[: out_features * in_features]
    absmax = tensors["absmax"]
    if "nested_absmax" in tensors:
        nested_block = int(state["nested_blocksize"])
        nested = tensors["nested_absmax"].float().repeat_interleave(nested_block)[: absmax.numel()]
        absmax = tensors["nested_quant_map"].float()[absmax.long()] * nested + float(state["nested_offset"])
    absmax = absmax.float().reshape(out_features, in_features // blocksize)
    return _four_bit(codes.reshape(out_features, in_features), tensors["quant_map"].float(), absmax, blocksize)


def read_int8(weight: torch.Tensor, scb: torch.Tensor) -> GroupedWeight:
    """A Linear8bitLt weight as transformers saves it: int8 `weight` [out, in] and its row absmax `SCB`."""
    return _int8(weight, scb.float())


def _four_bit(codes: torch.Tensor, levels: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> GroupedWeight:
    in_features = codes.shape[1]
    return GroupedWeight(
        codes=codes, table=levels, scale=absmax, zero=None,
        g_idx=torch.arange(in_features) // blocksize, group_size=blocksize, bits=4,
    )


def _int8(codes: torch.Tensor, absmax: torch.Tensor) -> GroupedWeight:
    out_features, in_features = codes.shape
    return GroupedWeight(
        codes=(codes.to(torch.int16) + INT8_ZERO).to(torch.uint8), table=torch.arange(256, dtype=torch.float32),
        scale=(absmax * (1.0 / 127)).unsqueeze(1), zero=torch.full((out_features, 1), float(INT8_ZERO)),
        g_idx=torch.zeros(in_features, dtype=torch.int64), group_size=in_features, bits=8,
    )
