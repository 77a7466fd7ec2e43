"""Kernels that are taken on CUDA only after a start-up check: whether this GPU and torch build run them, and run
them right, is learned by running them once against plain torch, not assumed from version numbers."""
from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger(__name__)


def once_per_device(check: Callable[[torch.device], bool]) -> Callable[[torch.device], bool]:
    """`usable(device)`: False off CUDA; on a CUDA device, `check(device)` run the first time and remembered."""
    decided: dict[torch.device, bool] = {}

    def usable(device: torch.device) -> bool:
        if device.type != "cuda":
            return False
        if device not in decided:
            decided[device] = check(device)
        return decided[device]

    return usable


def has_varlen(path: str) -> bool:
    """Whether this torch ships `torch.nn.attention.varlen` (FlashAttention's variable-length entry point); when not,
    `path` (the attention that stays) is logged."""
    try:
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        logger.info("%s (this torch has no torch.nn.attention.varlen)", path)
        return False
    return True


def agrees(got: torch.Tensor, expected: torch.Tensor, path: str, kernel: str) -> bool:
    """Whether a kernel's output on the check's data is within half-precision noise of plain torch's, logging the
    attention taken either way: `kernel` when it agrees, `path` (the one that stays) with the error when not."""
    error = (got.float() - expected.float()).abs().max().item()
    if error > 1e-2:
        logger.warning("%s (the kernel is off by %.3g)", path, error)
        return False
    logger.info(kernel)
    return True
