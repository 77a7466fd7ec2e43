"""A linear layer whose weight stays quantized in memory: same call as `Linear`, a fraction of its bytes.

The weight arrives as a `GroupedWeight` (any checkpoint format) and is kept as codes plus per-group scale and
zero. On CPU with float32 activations a small C++ kernel (`quant_cpu.cpp`, built once per machine like the LoRA
kernel) dequantizes a panel of output features at a time into L1 and multiplies them there, so only the packed
codes are read from memory. Elsewhere (CUDA, other dtypes) the weight is dequantized per call by torch and multiplied by
`F.linear`: correct everywhere, with the memory saving but not the speed of a fused kernel.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lorax_server.layers import cpp_build
from lorax_server.quantization.grouped import GroupedWeight

_SOURCE = Path(__file__).with_name("quant_cpu.cpp")
_LANES = 16  # output features per stored code block (see quant_cpu.cpp)
_cpu_op = None


def cpu_op():
    """torch.ops.lorax_quant.quant_linear, built on first use and cached on this machine."""
    global _cpu_op
    if _cpu_op is None:
        schema = "(Tensor x, Tensor codes, Tensor table, Tensor scale, Tensor zero, int bits, int group, int out_features) -> Tensor"
        # the vector width and FMA contraction are what the kernel is written for
        cpp_build.load("lorax_quant_cpu", _SOURCE, "lorax_quant", {"quant_linear": schema},
                       ("-mprefer-vector-width=512", "-ffp-contract=fast"))
        _cpu_op = torch.ops.lorax_quant.quant_linear
    return _cpu_op


def to_blocks(rows: torch.Tensor) -> torch.Tensor:
    """[out, n] -> [ceil(out / 16), n, 16]: 16 output features side by side per column (zero-padded)."""
    out_features = rows.shape[0]
    padded = F.pad(rows, (0, 0, 0, -out_features % _LANES))
    return padded.reshape(-1, _LANES, rows.shape[1]).transpose(1, 2).contiguous()


def from_blocks(blocks: torch.Tensor, out_features: int) -> torch.Tensor:
    """The inverse of `to_blocks`."""
    return blocks.transpose(1, 2).reshape(-1, blocks.shape[1])[:out_features]


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """[out, in] codes < 16 -> [out, in / 2] bytes holding inputs k (low nibble) and k + 1 (high nibble)."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_4bit`."""
    return torch.stack([packed & 15, packed >> 4], dim=2).reshape(packed.shape[0], -1)


class QuantizedLinear:
    """y = x @ W.T with W held as codes, per-group scales and zeros (see the module docstring)."""

    def __init__(self, weight: GroupedWeight, device: torch.device):
        self.out_features, self.in_features = weight.shape
        perm, weight = weight.contiguous_groups()
        if weight.bits == 4 and weight.group_size % 2:
            raise ValueError(f"4-bit groups must hold an even number of inputs (got {weight.group_size})")
        self.bits, self.group_size = weight.bits, weight.group_size
        codes = pack_4bit(weight.codes) if weight.bits == 4 else weight.codes
        self.codes = to_blocks(codes).to(device)
        self.table = weight.table.float().contiguous().to(device)
        self.scale = to_blocks(weight.scale.float()).to(device)
        zero = torch.empty(0) if weight.zero is None else to_blocks(weight.zero.float())
        self.zero = zero.to(device)
        self.perm = None if perm is None else perm.to(device)
        self._kernel = device.type == "cpu"
        if self._kernel:
            cpu_op()  # built (or loaded from cache) while the model loads, not on the first request

    @property
    def nbytes(self) -> int:
        """Bytes held for the weight (codes, scales, zeros, act-order permutation)."""
        held = [self.codes, self.table, self.scale, self.zero] + ([self.perm] if self.perm is not None else [])
        return sum(t.numel() * t.element_size() for t in held)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight the kernel multiplies by, over the (permuted, padded) kernel columns."""
        codes = from_blocks(self.codes, self.out_features)
        codes = unpack_4bit(codes) if self.bits == 4 else codes
        values = self.table[codes.long()]
        groups = torch.arange(codes.shape[1], device=codes.device) // self.group_size
        if self.zero.numel():
            values = values - from_blocks(self.zero, self.out_features)[:, groups]
        return (values * from_blocks(self.scale, self.out_features)[:, groups]).to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:  # act-order: inputs in group order, a zero input for padding columns
            x = F.pad(x, (0, 1))[:, self.perm]
        if self._kernel and x.dtype == torch.float32:
            if x.stride(-1) != 1:
                x = x.contiguous()
            op = cpu_op()
            return op(x, self.codes, self.table, self.scale, self.zero, self.bits, self.group_size, self.out_features)
        return F.linear(x, self.dequantize(x.dtype))


class QuantizedRows(QuantizedLinear):
    """An embedding table held as int8 rows (LLM.int8's row-wise absmax), for LORAX_QUANTIZE_EMBEDDINGS=int8: one
    copy of the codes serves token lookups (`table[ids]`) and, as a `QuantizedLinear`, the LM head's matmul. A float table
    tied to the head is otherwise held twice on CPU: once for lookups and once in oneDNN's layout for the head."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        from lorax_server.quantization.bitsandbytes import quantize_int8

        super().__init__(quantize_int8(weight), weight.device)
        self.shape, self.dtype = weight.shape, dtype

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized rows `ids` ([...] -> [..., in]), read from the 16-row blocks the kernel uses: looked up
        as a float table's rows are."""
        block, lane = ids // _LANES, ids % _LANES
        codes = self.codes[block, :, lane]
        scale, zero = self.scale[block, 0, lane], self.zero[block, 0, lane]
        return ((self.table[codes.long()] - zero[..., None]) * scale[..., None]).to(self.dtype)


if __name__ == "__main__":  # build the CPU kernel ahead of time
    cpu_op()
    print("lorax quantized-linear CPU kernel ready")
