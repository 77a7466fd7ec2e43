"""Host values to device tensors without making the host wait.

A plain `torch.tensor(values, device="cuda")` copies from pageable memory and then waits for every kernel already
queued on the stream, so one such call per step stalls the host behind the GPU. Copying from pinned memory with
`non_blocking=True` queues the copy behind that work instead (torch keeps the pinned buffer alive until it is done).
"""
from __future__ import annotations

import torch


def upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a tensor on `device`, queued rather than waited for."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)
