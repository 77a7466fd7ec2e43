"""The one form every quantized checkpoint format is read into: integer codes plus per-group scale and zero.

    w[o, i] = (table[codes[o, i]] - zero[o, g_idx[i]]) * scale[o, g_idx[i]]

bitsandbytes 4-bit is a 16-entry codebook with a zero of 0; GPTQ/AWQ and LLM.int8 are an identity table with an
integer zero point. Holding every format this way lets one slicing rule (tensor parallelism), one fusion rule
(q/k/v, gate/up) and one kernel serve them all.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class GroupedWeight:
    """An integer-coded weight [out, in] with groups of `group_size` input columns (see the module docstring).

    `g_idx` gives each input column's group: `i // group_size` for plain checkpoints, a permutation of it for
    GPTQ's act-order. `zero` is None where the format has none (bitsandbytes 4-bit).
    """

    codes: torch.Tensor  # uint8 [out, in]
    table: torch.Tensor  # float32 [2**bits]
    scale: torch.Tensor  # float32 [out, groups]
    zero: torch.Tensor | None  # float32 [out, groups]
    g_idx: torch.Tensor  # int64 [in]
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in], computed in float32 as the formats' reference code does."""
        values = self.table[self.codes.long()]
        if self.zero is not None:
            values = values - self.zero[:, self.g_idx]
        return (values * self.scale[:, self.g_idx]).to(dtype)

    def has_plain_groups(self) -> bool:
        """Whether column i is in group i // group_size (no act-order permutation)."""
        plain = torch.arange(self.g_idx.numel()) // self.group_size
        return bool(torch.equal(self.g_idx, plain))

    def rows(self, start: int, stop: int) -> "GroupedWeight":
        """Output features [start, stop): every group is kept whole."""
        return replace(
            self, codes=self.codes[start:stop], scale=self.scale[start:stop],
            zero=None if self.zero is None else self.zero[start:stop],
        )

    def cols(self, start: int, stop: int) -> "GroupedWeight":
        """Input features [start, stop). Plain groups must not be cut (a clear error names the boundary); act-order
        columns keep every group's scale, since their groups are scattered over all inputs."""
        codes, g_idx = self.codes[:, start:stop], self.g_idx[start:stop]
        if self.scale.shape[1] == 1:  # one group spans every input (LLM.int8 rows, GPTQ group_size -1)
            return replace(self, codes=codes, g_idx=g_idx, group_size=stop - start)
        if not self.has_plain_groups():
            return replace(self, codes=codes, g_idx=g_idx)
        gs = self.group_size
        if start % gs or (stop - start) % gs:
            raise ValueError(
                f"input features [{start}, {stop}) of this shard cut a quantization group of {gs} columns: "
                "use a number of shards that splits the groups evenly"
            )
        g0, g1 = start // gs, stop // gs
        return replace(
            self, codes=codes, g_idx=g_idx - g0, scale=self.scale[:, g0:g1],
            zero=None if self.zero is None else self.zero[:, g0:g1],
        )


    def contiguous_groups(self) -> tuple[torch.Tensor | None, "GroupedWeight"]:
        """(perm, weight) with every group a contiguous run of `group_size` columns, as a kernel reads them.

        Plain weights come back as they are, with perm None. Otherwise (act-order, an act-order weight cut by
        tensor parallelism, a last group shorter than the rest) columns are sorted by group and each group is
        padded to `group_size`: column j of the result reads input perm[j], where perm[j] == in_features stands
        for an input that is always zero.
        """
        if self.has_plain_groups() and self.g_idx.numel() % self.group_size == 0:
            return None, self
        in_features, gs = self.g_idx.numel(), self.group_size
        groups, counts = torch.unique(self.g_idx, return_counts=True)
        if bool((counts > gs).any()):
            raise ValueError(f"a quantization group has more than group_size ({gs}) columns: malformed g_idx")
        order = torch.argsort(self.g_idx, stable=True)
        rank = torch.searchsorted(groups, self.g_idx[order])
        position = torch.arange(in_features) - (torch.cumsum(counts, 0) - counts)[rank]
        perm = torch.full((groups.numel(), gs), in_features, dtype=torch.int64)
        perm[rank, position] = order
        perm = perm.reshape(-1)
        padded = torch.cat([self.codes, torch.zeros_like(self.codes[:, :1])], dim=1)
        return perm, replace(
            self, codes=padded[:, perm], scale=self.scale[:, groups],
            zero=None if self.zero is None else self.zero[:, groups], g_idx=torch.arange(perm.numel()) // gs,
        )


def fuse_rows(parts: list[GroupedWeight]) -> GroupedWeight:
    """Stack weights along the output features (q/k/v, gate/up); they must share the input grouping."""
    first = parts[0]
    for part in parts[1:]:
        same = (part.bits, part.group_size) == (first.bits, first.group_size) and torch.equal(part.g_idx, first.g_idx)
        if not same or not torch.equal(part.table, first.table) or (part.zero is None) != (first.zero is None):
            raise ValueError("projections fused into one matmul must share the quantization format and grouping")
    return replace(
        first, codes=torch.cat([p.codes for p in parts]), scale=torch.cat([p.scale for p in parts]),
        zero=None if first.zero is None else torch.cat([p.zero for p in parts]),
    )
