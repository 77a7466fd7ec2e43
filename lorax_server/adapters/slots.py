"""The device tier: every active adapter's weights in preallocated per-module pools, written once at load.

Each LoRA-targetable module (q_proj ... down_proj) has one pool pair on the device:
A [layers, rows, in] and B [layers, rows, out] (B already scaled). A row holds one rank component of one
adapter in every layer. An adapter of rank r that targets a module owns r rows of that module's pools, found
through its slot's row table (int32 [slots, widest rank], -1 past its rank); rows need not be contiguous, so
adapters of any rank share the pools without fragmentation, and a forward pass only needs each token's slot.

Pools grow geometrically when an adapter does not fit (a copy at load time, never per batch), up to the
adapter memory reservation; a rank that cannot fit is refused with an AdapterError (a 424 for its requests).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from lorax_server.adapters.config import AdapterError
from lorax_server.adapters.weights import LoraWeights

_MIN_ROWS = 64
_MIN_SLOTS = 8


@dataclass
class ModulePool:
    """One module's rows for every active adapter, and which rows each slot owns."""

    a: torch.Tensor  # [layers, capacity, in]
    b: torch.Tensor  # [layers, capacity, out]
    rows: torch.Tensor  # [slots, width] int32, -1 = unused
    free: deque[int] = field(default_factory=deque)

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()

    @property
    def row_bytes(self) -> int:
        """Bytes of one row across all layers (A and B)."""
        return self.a.shape[0] * (self.a.shape[2] + self.b.shape[2]) * self.a.element_size()


class SlotPools:
    """Adapter slots by router index, and the pools their weights live in."""

    def __init__(
        self, sizes: dict[str, tuple[int, int]], num_layers: int, dtype: torch.dtype, device: torch.device,
        budget_bytes: int,
    ):
        """sizes: module -> (in, out) features on this rank; budget_bytes: the most all pools may hold."""
        self.dtype, self.device, self.budget = dtype, device, budget_bytes
        self.num_layers = num_layers
        self.pools = {
            m: ModulePool(
                torch.empty(num_layers, 0, d_in, dtype=dtype, device=device),
                torch.empty(num_layers, 0, d_out, dtype=dtype, device=device),
                torch.full((_MIN_SLOTS, 1), -1, dtype=torch.int32, device=device),
            )
            for m, (d_in, d_out) in sizes.items()
        }
        self.slot_of: dict[int, int] = {}  # router index -> slot
        self.targets: dict[int, frozenset[str]] = {}  # slot -> the modules its adapter targets
        self.weights: dict[int, LoraWeights] = {}  # router index -> its (host) weights, for the tier report
        self._free_slots: deque[int] = deque(range(_MIN_SLOTS))
        self._lut = torch.full((1,), -1, dtype=torch.int64, device=device)  # router index -> slot (or -1)
        # Bumped whenever a pool's a, b or rows tensor is replaced by a bigger one: a CUDA graph holds the addresses of
        # the tensors it was captured with, so `cuda_graphs.py` drops its graphs when this changes.
        self.version = 0

    # ---- load / offload --------------------------------------------------------------------------------------
    def add(self, index: int, weights: LoraWeights) -> int:
        """Write an adapter's weights into free rows under a new slot; returns the slot."""
        if index in self.slot_of:
            self.remove(index)
        self._reserve(weights)
        slot = self._take_slot()
        for module, (a, b) in weights.modules.items():
            pool = self.pools[module]
            rank = a.shape[-1]
            if pool.rows.shape[1] < rank:
                wider = torch.full((pool.rows.shape[0], rank), -1, dtype=torch.int32, device=self.device)
                wider[:, : pool.rows.shape[1]] = pool.rows
                pool.rows = wider
                self.version += 1
            rows = [pool.free.popleft() for _ in range(rank)]
            index_t = torch.tensor(rows, dtype=torch.int64, device=self.device)
            pool.a[:, index_t] = a.transpose(1, 2).to(self.device, self.dtype)  # [L, r, in]
            pool.b[:, index_t] = b.to(self.device, self.dtype)  # [L, r, out]
            pool.rows[slot, :rank] = index_t.to(torch.int32)
        self.slot_of[index] = slot
        self.targets[slot] = frozenset(weights.modules)
        self.weights[index] = weights
        if index >= self._lut.numel():
            lut = torch.full((max(index + 1, 2 * self._lut.numel()),), -1, dtype=torch.int64, device=self.device)
            lut[: self._lut.numel()] = self._lut
            self._lut = lut
        self._lut[index] = slot
        return slot

    def remove(self, index: int) -> bool:
        """Give an adapter's rows and slot back (its pool contents are simply overwritten later)."""
        slot = self.slot_of.pop(index, None)
        if slot is None:
            return False
        del self.weights[index]
        for pool in self.pools.values():
            owned = pool.rows[slot]
            pool.free.extend(owned[owned >= 0].tolist())
            owned.fill_(-1)
        self._lut[index] = -1
        del self.targets[slot]
        self._free_slots.append(slot)  # reused last, so a reloaded adapter lands in another slot
        return True

    def _take_slot(self) -> int:
        if not self._free_slots:
            old = next(iter(self.pools.values())).rows.shape[0]
            for pool in self.pools.values():
                grown = torch.full((2 * old, pool.rows.shape[1]), -1, dtype=torch.int32, device=self.device)
                grown[:old] = pool.rows
                pool.rows = grown
            self._free_slots.extend(range(old, 2 * old))
            self.version += 1
        return self._free_slots.popleft()

    def _reserve(self, weights: LoraWeights) -> None:
        """Grow the pools the adapter needs, within the budget, before anything is written."""
        need = {m: a.shape[-1] for m, (a, _) in weights.modules.items()}
        grow = {m: r for m, r in need.items() if len(self.pools[m].free) < r}
        if not grow:
            return
        targets = {}
        for m, r in grow.items():
            pool = self.pools[m]
            used = pool.a.shape[1] - len(pool.free)
            targets[m] = max(_MIN_ROWS, 2 * pool.a.shape[1], used + r)
        extra = sum((targets[m] - self.pools[m].a.shape[1]) * self.pools[m].row_bytes for m in targets)
        if self.bytes_held + extra > self.budget:  # geometric growth does not fit: grow to exactly what is needed
            for m, r in grow.items():
                pool = self.pools[m]
                targets[m] = pool.a.shape[1] - len(pool.free) + r
            extra = sum((targets[m] - self.pools[m].a.shape[1]) * self.pools[m].row_bytes for m in targets)
            if self.bytes_held + extra > self.budget:
                rank = max(need.values())
                raise AdapterError(
                    f"adapter of rank {rank} does not fit the adapter pools ({self.bytes_held} of {self.budget} bytes "
                    f"held, {extra} more needed; raise ADAPTER_MEMORY_FRACTION or lower --max-active-adapters)"
                )
        for m, capacity in targets.items():
            pool = self.pools[m]
            old = pool.a.shape[1]
            a = torch.zeros(self.num_layers, capacity, pool.a.shape[2], dtype=self.dtype, device=self.device)
            b = torch.zeros(self.num_layers, capacity, pool.b.shape[2], dtype=self.dtype, device=self.device)
            a[:, :old], b[:, :old] = pool.a, pool.b
            pool.a, pool.b = a, b
            pool.free.extend(range(old, capacity))
        self.version += 1

    # ---- per batch -----------------------------------------------------------------------------------------------
    def token_slots(self, adapter_indices: torch.Tensor, used: frozenset[int]) -> torch.Tensor:
        """Each request's slot (-1 for the base model) from its router index. `used` is the set of those indices,
        known on the host: one not loaded raises here rather than running its request on the base model."""
        missing = used - self.slot_of.keys() - {0}
        if missing:
            raise ValueError(f"adapter index {min(missing)} is not loaded on this shard")
        index = adapter_indices.clamp(max=self._lut.numel() - 1)
        return torch.where(adapter_indices < self._lut.numel(), self._lut[index], -1)

    @property
    def bytes_held(self) -> int:
        """Bytes the pools occupy on the device, used or free."""
        return sum(p.nbytes for p in self.pools.values())

    @property
    def bytes_used(self) -> int:
        """Bytes of the rows active adapters own."""
        return sum((p.a.shape[1] - len(p.free)) * p.row_bytes for p in self.pools.values())
