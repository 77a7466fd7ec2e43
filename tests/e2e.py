"""Start the real `lorax-launcher` (download step, shard processes, router) as a subprocess for tests."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# the console scripts: beside this Python (a venv), else on PATH (a `pip install --target` folder, scripts/gpu_check.sh)
BIN = Path(sys.executable).parent if (Path(sys.executable).parent / "lorax-launcher").exists() else \
    Path(shutil.which("lorax-launcher") or sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every live process whose ancestry includes `pid` (read from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        children = [p for p, parent in parents.items() if parent == current]
        found += children
        frontier += children
    return found


class Launcher:
    """A running launcher on a free port; `url` is its router."""

    def __init__(self, model: str, workdir: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / f"launcher-{self.port}.log", "w+")
        full_env = dict(os.environ)
        full_env.update({
            "HUGGINGFACE_HUB_CACHE": str(workdir / "hf-cache"), "HF_HUB_OFFLINE": "1",
            "LORAX_LOCAL_ADAPTER_ROOTS": str(workdir), "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "MASTER_PORT": str(free_port()),
            "CUDA_VISIBLE_DEVICES": "",  # CPU unless a test asks otherwise (a GPU test passes its own env)
        })
        full_env.update(env or {})
        cmd = [str(BIN / "lorax-launcher"), "--model-id", model, "--port", str(self.port), "--hostname", "127.0.0.1",
               "--shard-uds-path", str(workdir / f"shard-{self.port}"), "--master-port", full_env["MASTER_PORT"], *args]
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> "Launcher":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"launcher not ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-6000:]

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode
