"""The `--env` report: what a bug report needs to know about the machine, never a secret."""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any, Mapping

REPORTED_PACKAGES = ("torch", "transformers", "grpcio", "fastapi")
TOKEN_ENV_VARS = ("HF_API_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cuda() -> str:
    try:
        import torch
    except ImportError:
        return "N/A"
    if not torch.cuda.is_available():
        return "N/A"
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return f"CUDA {torch.version.cuda}: {names}"


def _memory() -> str:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "unknown"
    return f"{total / 2**30:.1f} GiB"


def runtime_report(args: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> str:
    """A multi-line report of the runtime environment and the (already redacted) parsed args."""
    lines = [
        f"Python version: {sys.version.split()[0]}",
        f"Platform: {platform.platform()}",
        *(f"{package} version: {_version(package)}" for package in REPORTED_PACKAGES),
        f"CUDA: {_cuda()}",
        f"CPU count: {os.cpu_count()}",
        f"Memory: {_memory()}",
        *(f"{var}: <redacted>" for var in TOKEN_ENV_VARS if environ.get(var)),
        "Args:",
        *(f"  {name}: {value!r}" for name, value in args.items()),
    ]
    return "\n".join(lines)
