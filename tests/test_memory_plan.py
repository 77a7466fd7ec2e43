"""KV cache sizing: free memory after loading, minus the warm-up's peak and the adapter reservation."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lorax_server import generation
from lorax_server.dist import Parallel
from lorax_server.memory import (
    CPU_CACHE_MAX_TOKENS, Memory, NotEnoughMemory, PeakTracker, host_memory, kv_cache_bytes, plan_kv_tokens,
)
from lorax_server.pb import generate_pb2 as pb
from lorax_server.shard import build_service
from router.startup import warmup_batch

GIB = 1 << 30
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_gpu_plan_follows_the_reference_formula(monkeypatch):
    monkeypatch.setenv("MEMORY_WIGGLE_ROOM", "0.9")
    monkeypatch.setenv("CUDA_MEMORY_FRACTION", "1.0")
    memory = Memory(free=10 * GIB, total=16 * GIB)
    assert kv_cache_bytes(memory, GIB, GIB, CUDA) == int(8 * GIB * 0.9)
    monkeypatch.setenv("CUDA_MEMORY_FRACTION", "0.75")  # keep 4 GiB of the GPU for other processes
    assert kv_cache_bytes(memory, GIB, GIB, CUDA) == int(4 * GIB * 0.9)
    assert plan_kv_tokens(memory, GIB, GIB, 1 << 20, 1000, 4096, CUDA) == int(4 * GIB * 0.9) >> 20


def test_a_peak_that_leaves_no_room_is_the_reference_error(monkeypatch):
    monkeypatch.setenv("CUDA_MEMORY_FRACTION", "1.0")
    memory = Memory(free=10 * GIB, total=16 * GIB)
    with pytest.raises(NotEnoughMemory, match=r"handle 8192 prefill tokens .* decrease `--max-batch-prefill-tokens`"):
        plan_kv_tokens(memory, 9 * GIB, GIB, 1 << 20, 16, 8192, CUDA)
    with pytest.raises(NotEnoughMemory, match="room for 1843 of the 4096 KV tokens"):
        plan_kv_tokens(memory, 7 * GIB, GIB, 1 << 20, 4096, 8192, CUDA)


def test_cpu_takes_a_bounded_share_of_host_memory(monkeypatch):
    monkeypatch.setenv("MEMORY_WIGGLE_ROOM", "1.0")
    assert kv_cache_bytes(Memory(free=8 * GIB, total=16 * GIB), GIB, GIB, CPU) == int(6 * GIB * 0.25)
    assert kv_cache_bytes(Memory(free=64 * GIB, total=128 * GIB), 0, 0, CPU) == 4 * GIB
    assert plan_kv_tokens(Memory(free=64 * GIB, total=128 * GIB), 0, 0, 16, 16, 0, CPU) == CPU_CACHE_MAX_TOKENS


def test_host_memory_honours_the_cgroup_limit(tmp_path):
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("268435456\n")
    limited = host_memory(tmp_path)
    assert limited.total == GIB and limited.free <= 768 << 20
    (tmp_path / "memory.max").write_text("max\n")
    unlimited = host_memory(tmp_path)
    assert unlimited.total > GIB and unlimited.free > 0


PEAKS = """
import torch
from lorax_server.memory import PeakTracker
with PeakTracker(torch.device("cpu")) as small:
    pass
with PeakTracker(torch.device("cpu")) as big:
    x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    del x
print(small.peak, big.peak)
"""


def test_peak_tracker_sees_a_temporary_allocation():
    # a fresh process: in this one, memory freed by earlier tests may be reused without raising the resident peak
    out = subprocess.run([sys.executable, "-c", PEAKS], capture_output=True, text=True, check=True).stdout
    small, big = map(int, out.split())
    assert big >= 60 << 20 > small


def test_warmup_sizes_the_cache_from_what_is_left(tiny_model_dir, monkeypatch):
    folder, _ = tiny_model_dir
    generator = build_service(str(folder), None, "hub", None, Parallel(), CPU, "/unused").generator
    batch = warmup_batch(max_input_length=64, max_batch_prefill_tokens=256, max_total_tokens=128)
    per_token, reserve = generator.model.kv_bytes_per_token, generator.adapters.pools.budget
    ample = Memory(free=reserve + 64 * GIB, total=128 * GIB)
    monkeypatch.setattr(generation, "device_memory", lambda device: ample)
    assert generator.warmup(batch, 256) == CPU_CACHE_MAX_TOKENS
    # Free memory that holds the adapter reservation and little else: the warm-up's own peak decides.
    tight = Memory(free=reserve + 4000 * per_token * 4, total=128 * GIB)
    monkeypatch.setattr(generation, "device_memory", lambda device: tight)
    capacity = generator.warmup(batch, 256)
    assert 256 <= capacity <= int(4000 * 0.9), "a quarter of what is left after the reservation and the peak"
    cramped = Memory(free=reserve + 100 * per_token * 4, total=128 * GIB)
    monkeypatch.setattr(generation, "device_memory", lambda device: cramped)
    with pytest.raises(NotEnoughMemory, match="handle 256 prefill tokens"):
        generator.warmup(batch, 256)
    # The shard keeps serving after a refused warm-up (the launcher stops it, but nothing is left half-done).
    monkeypatch.setattr(generation, "device_memory", lambda device: ample)
    assert generator.warmup(batch, 256) == CPU_CACHE_MAX_TOKENS
    assert generator.cache.free_blocks == generator.cache.num_blocks


def test_a_host_cache_is_resident_only_where_written():
    from lorax_server.kv_cache import KVCache
    from lorax_server.memory import _rss_kib

    before = _rss_kib("VmRSS")
    cache = KVCache(num_layers=4, num_blocks=4096, kv_heads=4, head_dim=64, dtype=torch.bfloat16, device=CPU)  # 256 MiB
    assert cache.tensor.dtype == torch.bfloat16 and float(cache.tensor[3, 1, 2, -1].sum()) == 0.0
    assert (_rss_kib("VmRSS") - before) < 64 << 10
    cache.tensor[0, 0, 0, :16384] = 1.0  # 2 MiB written
    assert float(cache.tensor.sum()) == 16384 * 64
