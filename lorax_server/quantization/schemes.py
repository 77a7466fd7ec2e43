"""Which quantization a shard loads with: the `--quantize` value checked against the checkpoint's own
`quantization_config`, and how each linear's tensors are read into a `GroupedWeight`.

bitsandbytes values quantize a float checkpoint at load, or read a checkpoint transformers saved pre-quantized
with the same settings; `gptq` and `awq` read pre-quantized checkpoints only. Any other pairing is refused
before a weight is read, with the flag to use.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from lorax_server.quantization import bitsandbytes as bnb
from lorax_server.quantization.gptq import read_awq, read_gptq
from lorax_server.quantization.grouped import GroupedWeight

BNB_4BIT = {"bitsandbytes-nf4": "nf4", "bitsandbytes-fp4": "fp4"}
QUANTIZE_VALUES = ("bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "gptq", "awq")


class TensorSource(Protocol):
    """What a checkpoint reader reads from: the names present and each tensor as stored."""

    def __contains__(self, name: str) -> bool: ...

    def raw(self, name: str) -> torch.Tensor: ...


class QuantizeAtLoad:
    """bitsandbytes quantization of a float checkpoint, each rank quantizing its own slice as the library does
    on load."""

    def __init__(self, quantizer: Callable[[torch.Tensor], GroupedWeight]):
        self.quantizer = quantizer

    def quantize(self, weight: torch.Tensor) -> GroupedWeight:
        return self.quantizer(weight)


class BitsandbytesCheckpoint:
    """Linear8bitLt / Linear4bit weights saved by transformers. Like every checkpoint reader, `read` returns the
    whole weight of the linear at `prefix`, or None where it is stored in float (a module the quantizer skipped)."""

    def read(self, source: TensorSource, prefix: str) -> GroupedWeight | None:
        weight = f"{prefix}.weight"
        if f"{prefix}.SCB" in source:
            return bnb.read_int8(source.raw(weight), source.raw(f"{prefix}.SCB"))
        states = [f"{weight}.quant_state.bitsandbytes__{t}" for t in ("nf4", "fp4")]
        states = [name for name in states if name in source]
        if not states:
            return None
        parts = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
        tensors = {part: source.raw(f"{weight}.{part}") for part in parts if f"{weight}.{part}" in source}
        tensors["weight"] = source.raw(weight)
        return bnb.read_4bit(tensors, source.raw(states[0]))


class GptqCheckpoint:
    """qweight / qzeros / scales / g_idx as AutoGPTQ and GPTQModel write them."""

    def __init__(self, bits: int, group_size: int, zero_offset: int):
        self.bits, self.group_size, self.zero_offset = bits, group_size, zero_offset

    def read(self, source: TensorSource, prefix: str) -> GroupedWeight | None:
        if f"{prefix}.qweight" not in source:
            return None
        names = [f"{prefix}.{part}" for part in ("qweight", "qzeros", "scales", "g_idx")]
        tensors = {name.rsplit(".", 1)[1]: source.raw(name) for name in names if name in source}
        return read_gptq(tensors, self.bits, self.group_size, self.zero_offset)


class AwqCheckpoint:
    """qweight / qzeros / scales in AutoAWQ's GEMM layout."""

    def __init__(self, bits: int, group_size: int):
        self.bits, self.group_size = bits, group_size

    def read(self, source: TensorSource, prefix: str) -> GroupedWeight | None:
        if f"{prefix}.qweight" not in source:
            return None
        tensors = {p: source.raw(f"{prefix}.{p}") for p in ("qweight", "qzeros", "scales")}
        return read_awq(tensors, self.bits, self.group_size)


CheckpointReader = BitsandbytesCheckpoint | GptqCheckpoint | AwqCheckpoint
Scheme = QuantizeAtLoad | CheckpointReader


def choose_scheme(quantize: str | None, config: dict) -> Scheme | None:
    """The scheme for `--quantize` (None: float weights) and the model's config.json; ValueError names the fix."""
    qc = config.get("quantization_config") or None
    method = (qc or {}).get("quant_method")
    if quantize is None:
        if qc is not None:
            raise ValueError(f"the checkpoint is quantized ({method}): {_remedy(qc)}")
        return None
    if quantize not in QUANTIZE_VALUES:
        raise ValueError(f"unknown --quantize value '{quantize}' (expected one of {', '.join(QUANTIZE_VALUES)})")
    if quantize.startswith("bitsandbytes"):
        if qc is None:
            quant_type = BNB_4BIT.get(quantize)
            if quant_type is None:
                return QuantizeAtLoad(bnb.quantize_int8)
            return QuantizeAtLoad(lambda weight: bnb.quantize_4bit(weight, quant_type))
        if method == "bitsandbytes" and _flag_for(qc) == f"--quantize {quantize}":
            return BitsandbytesCheckpoint()
        raise ValueError(
            f"--quantize {quantize} does not match the checkpoint's quantization ({method}): {_remedy(qc)}"
        )
    if qc is None or method != quantize:
        found = "float weights" if qc is None else f"a {method} checkpoint"
        raise ValueError(f"--quantize {quantize} loads pre-quantized {quantize} checkpoints, and this is {found}")
    bits, group_size = int(qc.get("bits", 4)), int(qc.get("group_size", 128))
    if quantize == "gptq":
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format '{fmt}' is not supported (gptq, gptq_v2)")
        return GptqCheckpoint(bits, group_size, zero_offset=1 if fmt == "gptq" else 0)
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm" or not qc.get("zero_point", True):
        raise ValueError(
            f"AWQ version '{version}' (zero_point={qc.get('zero_point', True)}) is not supported: "
            "GEMM with zero points only"
        )
    return AwqCheckpoint(bits, group_size)


def _flag_for(qc: dict) -> str | None:
    """The --quantize flag a checkpoint's quantization_config calls for; None for methods this server cannot load."""
    method = qc.get("quant_method")
    if method == "bitsandbytes":
        if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
            return f"--quantize bitsandbytes-{qc.get('bnb_4bit_quant_type', 'fp4')}"
        return "--quantize bitsandbytes"
    return f"--quantize {method}" if method in ("gptq", "awq") else None


def _remedy(qc: dict) -> str:
    flag = _flag_for(qc)
    return f"use {flag}" if flag else "this server cannot load that method"
