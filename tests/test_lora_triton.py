"""The CUDA multi-LoRA kernels (Triton), run on CPU tensors by Triton's interpreter, against the reference op.

The interpreter is chosen by TRITON_INTERPRET=1 when Triton is first imported, so the comparison runs in a fresh
interpreter process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

COMPARE = """
import sys, torch
from lorax_server.layers import lora_kernel, lora_triton
from lorax_server.layers.lora import GROUPS
from tests.test_lora_slots import INS, OUTS, scrambled_pools, slots_and_batch

dtype = getattr(torch, sys.argv[1])
lora_triton._BLOCK_K = lora_triton._BLOCK_N = 8  # blocks smaller than the features: loops and edge masks run
assert lora_kernel.device_op().__name__ == "lora_apply_triton", "accelerators take the Triton kernels"
p, _ = scrambled_pools(dtype)
indices = [0, 20, 1, 1, 3, 0, 10, 4, 9, 8, 20, 6, 1]  # base rows, ranks 4..32, scrambled rows, some modules absent
slots, batch = slots_and_batch(p, indices)
tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)  # bf16: 1 ulp
for group, modules in GROUPS.items():
    x = torch.randn(len(indices), INS[modules[0]]).to(dtype)
    y = torch.randn(len(indices), sum(OUTS[m] for m in modules)).to(dtype)
    expected, got = y.clone(), y.clone()
    lora_kernel.lora_apply_reference(expected, x, slots, *batch._groups[group], 1)
    lora_kernel.device_op()(got, x, slots, *batch._groups[group], 1)
    assert torch.allclose(got.float(), expected.float(), **tolerance), group
    assert not torch.equal(got, y), "adapters changed the output"
    base = [t for t, i in enumerate(indices) if i == 0]
    assert torch.equal(got[base], y[base]), "base tokens get an exact zero delta"
print("ok", len(GROUPS))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_kernels_equal_the_reference(dtype):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", COMPARE, dtype], capture_output=True, text=True, env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "4"]
