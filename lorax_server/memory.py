"""How much memory the KV cache gets: what is free, minus the warm-up's measured peak and the adapter reservation.

The plan follows the reference server: measure what is free once the weights are loaded, run the largest prefill
the router will send (the warm-up batch) and measure the peak it adds, set aside the adapter pools' reservation,
and give the KV cache what is left (times MEMORY_WIGGLE_ROOM, after keeping 1 - CUDA_MEMORY_FRACTION of the GPU
for other processes). On CPU the same plan runs over host memory: what the kernel reports as available, within
the container's cgroup limit, and the cache takes at most a quarter of the remainder (the router, tokenizer workers
and page cache share the host) and at most 4 GiB.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

CPU_CACHE_SHARE = 0.25
CPU_CACHE_MAX_BYTES = 4 << 30
CPU_CACHE_MAX_TOKENS = 131072
CGROUP = Path("/sys/fs/cgroup")


class NotEnoughMemory(ValueError):
    """The warm-up batch (the router's largest prefill) does not fit next to the model."""

    def __init__(self, prefill_tokens: int, detail: str):
        super().__init__(
            f"Not enough memory to handle {prefill_tokens} prefill tokens ({detail}). "
            "You need to decrease `--max-batch-prefill-tokens`"
        )


@dataclass(frozen=True)
class Memory:
    """Bytes free now and in all, on the device (GPU) or for this process (host)."""

    free: int
    total: int


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) reads as None


def host_memory(cgroup: Path = CGROUP) -> Memory:
    """Available and total RAM, within the cgroup (v2, else v1) memory limit when one is set (a Kubernetes pod's
    limit is invisible in /proc/meminfo)."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0]) * 1024
    free, total = info.get("MemAvailable", info["MemFree"]), info["MemTotal"]
    for limit_file, usage_file in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, usage = _read_int(cgroup / limit_file), _read_int(cgroup / usage_file)
        if limit is not None and usage is not None and limit < total:
            return Memory(free=max(min(free, limit - usage), 0), total=limit)
    return Memory(free=free, total=total)


def device_memory(device: torch.device) -> Memory:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return Memory(free=free, total=total)
    return host_memory()


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakTracker:
    """Peak bytes allocated while the `with` block runs, above what was held when it started."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self) -> "PeakTracker":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident size (VmHWM) to the current one
            self._start = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self.peak = max(_rss_kib("VmHWM") * 1024 - self._start, 0)


def kv_cache_bytes(memory: Memory, warmup_peak: int, adapter_reserve: int, device: torch.device) -> int:
    """Bytes the KV cache may take, from the memory free before the warm-up (see the module docstring)."""
    wiggle = float(os.environ.get("MEMORY_WIGGLE_ROOM", "0.9"))
    left = memory.free - warmup_peak - adapter_reserve
    if device.type == "cuda":
        fraction = float(os.environ.get("CUDA_MEMORY_FRACTION", "1.0"))
        return int((left - (1 - fraction) * memory.total) * wiggle)
    return int(min(left * wiggle * CPU_CACHE_SHARE, CPU_CACHE_MAX_BYTES))


def plan_kv_tokens(
    memory: Memory, warmup_peak: int, adapter_reserve: int, bytes_per_token: int, needed_tokens: int,
    prefill_tokens: int, device: torch.device,
) -> int:
    """Tokens of KV cache to allocate; NotEnoughMemory when fewer than `needed_tokens` (one request of
    `--max-total-tokens` and the warm-up batch) would fit."""
    budget = kv_cache_bytes(memory, warmup_peak, adapter_reserve, device)
    tokens = max(budget, 0) // bytes_per_token
    if device.type == "cpu":
        tokens = min(tokens, CPU_CACHE_MAX_TOKENS)
    if tokens < needed_tokens:
        raise NotEnoughMemory(
            prefill_tokens,
            f"{memory.free >> 20} MiB free, the warm-up peaked at {warmup_peak >> 20} MiB, "
            f"{adapter_reserve >> 20} MiB reserved for adapters, room for {tokens} of the {needed_tokens} KV tokens needed",
        )
    return tokens
