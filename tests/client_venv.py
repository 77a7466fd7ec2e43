"""A side virtual environment with the real HTTP clients (tests/client-requirements.txt), and a way to run code in it.

The clients pin `huggingface_hub<1.0`, which the server's own environment cannot satisfy, so they live in
`<repo>/.cache/client-venv/<key>`: built once from PyPI, keyed by the requirements file and the Python version, and
reused while both stay the same.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = Path(__file__).with_name("client-requirements.txt")
CACHE = REPO / ".cache" / "client-venv"
DONE_MARKER = ".complete"

# Every script reads its arguments as JSON from stdin and reports with `emit` (one JSON document on stdout).
PRELUDE = "import json, sys\nARGS = json.load(sys.stdin)\ndef emit(value):\n    print(json.dumps(value))\n"


def venv_key() -> str:
    digest = hashlib.sha256(REQUIREMENTS.read_bytes())
    digest.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    return digest.hexdigest()[:16]


def client_venv(cache: Path = CACHE) -> Path:
    """The side venv's folder, building it first if this key has none (serialised by a lock file)."""
    target = cache / venv_key()
    if (target / DONE_MARKER).exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / DONE_MARKER).exists():  # built by another process while this one waited
            return target
        shutil.rmtree(target, ignore_errors=True)  # a build that died half way
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
        pip = [str(target / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
        (target / DONE_MARKER).write_text(REQUIREMENTS.read_text())
    return target


def run_in_venv(venv: Path, code: str, args: dict[str, Any] | None = None, timeout: float = 180) -> Any:
    """Run `code` with the venv's Python; it gets `ARGS` and returns what it passes to `emit`."""
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", PRELUDE + code], input=json.dumps(args or {}), capture_output=True,
        text=True, timeout=timeout, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    if result.returncode != 0:
        raise AssertionError(f"client script failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def venv_bin(venv: Path, name: str) -> str:
    return str(venv / "bin" / name)
