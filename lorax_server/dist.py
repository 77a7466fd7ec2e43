"""One place that sets up torch.distributed from the env the launcher passes (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT): nccl on CUDA, gloo on CPU. A single shard runs without a process group."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Parallel:
    """Where this shard sits in the tensor-parallel group."""

    rank: int = 0
    world_size: int = 1

    def split(self, size: int, what: str) -> tuple[int, int]:
        """This rank's [start, stop) of `size` items split evenly; uneven splits are a start-up error."""
        if size % self.world_size:
            raise ValueError(f"{what} ({size}) is not divisible by the number of shards ({self.world_size})")
        part = size // self.world_size
        return self.rank * part, (self.rank + 1) * part

    def split_uneven(self, size: int) -> tuple[int, int]:
        """This rank's [start, stop) of `size` items in parts that differ by at most one (the first `size % world_size`
        ranks take one more): for dims whose parts meet only in an all-reduce sum (the MLP's intermediate features),
        where unequal parts are as exact as equal ones."""
        part, extra = divmod(size, self.world_size)
        start = self.rank * part + min(self.rank, extra)
        return start, start + part + (self.rank < extra)

    def split_padded(self, size: int) -> tuple[int, int]:
        """This rank's [start, stop) of `size` items padded up to a multiple of the shard count: every rank holds
        the same number of rows (the all-gather of vocab-parallel logits needs equal parts), and `stop` may pass
        `size` on the last ranks, whose rows past it are padding."""
        part = -(-size // self.world_size)
        return self.rank * part, (self.rank + 1) * part

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks in place (no-op for one shard)."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `tensor` along the last dim (vocab-parallel logits)."""
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=-1)


def select_device(rank: int, world_size: int = 1) -> torch.device:
    """CUDA device of this rank when CUDA is present, else the CPU. Two ranks never share a GPU: NCCL cannot run a
    group whose ranks sit on one device, so more shards than visible GPUs is a start-up error."""
    if torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if world_size > visible:
            raise RuntimeError(
                f"{world_size} shards need {world_size} GPUs, but {visible} CUDA device(s) are visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use --num-shard {visible}"
            )
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        fraction = float(os.environ.get("CUDA_MEMORY_FRACTION", "1.0"))
        if fraction < 1.0:
            torch.cuda.set_per_process_memory_fraction(fraction, device)
        return device
    return torch.device("cpu")


def initialize() -> tuple[Parallel, torch.device]:
    """Join the process group described by the environment; returns this shard's place and device."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = select_device(rank, world_size)
    if world_size > 1 and not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"{var} must be set for a sharded (WORLD_SIZE={world_size}) shard")
        # A rank that dies mid-forward must take its peers down within the timeout, not leave them blocked in a
        # collective: NCCL's async error handling aborts the group when the timeout passes.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        timeout = timedelta(seconds=float(os.environ.get("LORAX_COLLECTIVE_TIMEOUT_S", "120")))
        if device.type == "cuda":  # bound to its GPU now, so NCCL communicators are created eagerly
            dist.init_process_group("nccl", rank=rank, world_size=world_size, timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    return Parallel(rank, world_size), device


def shutdown() -> None:
    """Leave the process group (if any) so peers see a clean exit."""
    if dist.is_initialized():
        dist.destroy_process_group()
