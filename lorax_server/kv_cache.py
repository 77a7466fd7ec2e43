"""The KV cache: one preallocated tensor for all layers, handed out to requests in fixed-size blocks."""
from __future__ import annotations

import mmap
import math

import torch

BLOCK_SIZE = 16


def _zero_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros in an anonymous memory map: the kernel supplies zero pages as they are first written, so a host cache
    sized for the worst case holds only the memory requests have used (torch.zeros would write, and so keep
    resident, every byte at start-up). The tensor keeps the map alive."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=dtype, count=math.prod(shape)).view(shape)


class OutOfBlocks(Exception):
    """The cache cannot hold the tokens a batch asked for (the router exceeded its token budget)."""


class KVCache:
    """[layers, 2, kv_heads, num_blocks*BLOCK_SIZE, head_dim] storage plus a free list of blocks.

    Heads come before slots so that a request's blocks gathered for one head are one contiguous [tokens, head_dim]
    matrix: attention then multiplies them in place instead of first copying them into a head-major layout.

    With `scratch`, one more block is allocated that no request is ever given (`self.scratch`): the padding rows of a
    CUDA-graph decode step (`cuda_graphs.py`) write their keys and values there. `num_blocks` counts only the blocks
    requests can hold, so the capacity the router is told is the same with or without it."""

    def __init__(
        self, num_layers: int, num_blocks: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
        scratch: bool = False,
    ):
        shape = (num_layers, 2, kv_heads, (num_blocks + int(scratch)) * BLOCK_SIZE, head_dim)
        self.tensor = _zero_pages(shape, dtype) if device.type == "cpu" else torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.scratch: int | None = num_blocks if scratch else None
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @staticmethod
    def blocks_for(tokens: int) -> int:
        return -(-tokens // BLOCK_SIZE)

    def allocate(self, token_counts: list[int]) -> list[list[int]]:
        """Blocks for each request's whole lifetime (prompt + max_new_tokens), all or nothing."""
        needed = [self.blocks_for(n) for n in token_counts]
        if sum(needed) > len(self._free):
            raise OutOfBlocks(
                f"KV cache full: {sum(needed) * BLOCK_SIZE} tokens requested, {len(self._free) * BLOCK_SIZE} free"
            )
        return [[self._free.pop() for _ in range(n)] for n in needed]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
