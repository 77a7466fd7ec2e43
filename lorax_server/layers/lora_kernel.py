"""The multi-LoRA op: every token adds its own adapter's low-rank delta, read from the slot pools by row index.

`lora_apply(y, x, token_slot, a, b, rows, out_start, layer)` adds, for each token t whose slot s is >= 0 and each
module m of a projection group, `sum_j (x[t] . A_m[layer, row_j]) * B_m[layer, row_j]` to
`y[t, out_start[m] : out_start[m] + out_m]`, where row_j runs over `rows[m][s]` up to its first -1.

On the CPU it is a small C++ kernel (`lora_cpu.cpp`), compiled once per machine with torch's extension builder
and cached (`python -m lorax_server.layers.lora_kernel` builds it ahead of time). On CUDA it is two Triton kernels
(`lora_triton.py`). Where neither applies (no Triton) the same arithmetic runs as gathered batched matmuls in chunks
of tokens (`lora_apply_reference`); tests compare all three.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from lorax_server.layers import cpp_build

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("lora_cpu.cpp")
_REFERENCE_CHUNK = 256  # tokens per gathered chunk: bounds the [chunk, rank, features] copies of the fallback
_cpu_op = None
_device_op = None


def device_op():
    """The op for accelerators: the Triton kernels when Triton imports, else the reference."""
    global _device_op
    if _device_op is None:
        try:
            from lorax_server.layers.lora_triton import lora_apply_triton as _device_op
        except ImportError:
            logger.warning("Triton is not installed: multi-LoRA runs as gathered batched matmuls")
            _device_op = lora_apply_reference
    return _device_op


def cpu_op():
    """torch.ops.lorax.lora_apply, built on first use (about a minute once per machine, then loaded from cache)."""
    global _cpu_op
    if _cpu_op is None:
        schema = ("(Tensor(a!) y, Tensor x, Tensor token_slot, Tensor[] a, Tensor[] b, Tensor[] rows, int[] out_start, "
                  "int layer) -> ()")
        cpp_build.load("lorax_lora_cpu", _SOURCE, "lorax", {"lora_apply": schema})
        _cpu_op = torch.ops.lorax.lora_apply
    return _cpu_op


def lora_apply_reference(
    y: torch.Tensor, x: torch.Tensor, token_slot: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor],
    rows: list[torch.Tensor], out_start: list[int], layer: int,
) -> None:
    """The op in plain torch (any device): gather each token's rows, two batched matmuls, add in float32."""
    for start in range(0, x.shape[0], _REFERENCE_CHUNK):
        stop = min(start + _REFERENCE_CHUNK, x.shape[0])
        xs, slots = x[start:stop].float(), token_slot[start:stop]
        for a_pool, b_pool, table, offset in zip(a, b, rows, out_start):
            index = table[slots.clamp(min=0)].long()  # [chunk, width]
            valid = (index >= 0) & (slots >= 0)[:, None]
            index = index.clamp(min=0)
            xa = torch.bmm(a_pool[layer][index].float(), xs[:, :, None]).squeeze(-1) * valid  # [chunk, width]
            delta = torch.bmm(xa[:, None, :], b_pool[layer][index].float()).squeeze(1)  # [chunk, out]
            out = y[start:stop, offset : offset + b_pool.shape[-1]]
            out.copy_((out.float() + delta).to(y.dtype))


def lora_apply(
    y: torch.Tensor, x: torch.Tensor, token_slot: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor],
    rows: list[torch.Tensor], out_start: list[int], layer: int,
) -> None:
    """Add every token's adapter delta to y in place (see the module docstring)."""
    if x.device.type == "cpu":
        cpu_op()(y, x.float().contiguous(), token_slot, a, b, rows, out_start, layer)
    else:
        device_op()(y, x, token_slot, a, b, rows, out_start, layer)


if __name__ == "__main__":  # build the CPU kernel ahead of time (make install, the Docker image)
    cpu_op()
    print("lorax LoRA CPU kernel ready")
