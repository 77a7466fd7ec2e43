"""Spawn, watch and stop the launcher's children: the download step, the shards and the router.

Each child runs in its own process group, so a terminal's Ctrl-C reaches only the launcher (which then stops
the children in order) and stopping a child also stops anything it started: no orphan survives the launcher.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, Mapping, Sequence

from lorax_launcher.commands import (download_command, download_env, router_command, router_env, shard_command,
                                     shard_env)
from lorax_launcher.config import LauncherConfig
from lorax_launcher.logs import child_line, log, write_line

POLL_S = 0.1
WAITING_LOG_EVERY_S = 10.0
ROUTER_GRACE_S = 90.0  # lets in-flight requests finish on a graceful stop
SHARD_GRACE_S = 5.0
DOWNLOAD_GRACE_S = 10.0
STDERR_TAIL_LINES = 200


class LauncherError(Exception):
    """Ends the launch: `Error: <variant>` on stderr, exit code 1; `stderr` is the failed child's output."""

    def __init__(self, variant: str, stderr: str = "") -> None:
        super().__init__(variant)
        self.variant = variant
        self.stderr = stderr


def resolve_executable(name: str, env: Mapping[str, str]) -> str:
    """`name` from the child's PATH, else the console script installed beside this Python (so a launcher run
    as .venv/bin/lorax-launcher finds its siblings without an activated venv)."""
    found = shutil.which(name, path=env.get("PATH"))
    beside = Path(sys.executable).parent / name
    return found or (str(beside) if beside.exists() else name)


class Child:
    """One child process in its own process group, its stdout and stderr forwarded line by line."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], json_output: bool) -> None:
        self.name = name
        self.json_output = json_output
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        argv = [resolve_executable(argv[0], env), *argv[1:]]
        self.proc = subprocess.Popen(argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True, text=True, errors="replace")
        self._readers = [threading.Thread(target=self._forward, args=(stream, keep), daemon=True)
                         for stream, keep in ((self.proc.stdout, False), (self.proc.stderr, True))]
        for reader in self._readers:
            reader.start()

    def _forward(self, stream: IO[str], keep: bool) -> None:
        for line in stream:
            line = line.rstrip("\n")
            if keep:
                self.stderr_tail.append(line)
            write_line(child_line(self.name, line, self.json_output))
        stream.close()

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def stderr_output(self) -> str:
        """The last lines the child wrote to stderr (waits briefly for the readers to drain its pipes)."""
        for reader in self._readers:
            reader.join(timeout=1.0)
        return "\n".join(self.stderr_tail)

    def kill(self) -> None:
        """SIGKILL the whole group (also what the child started and left behind) and reap the child."""
        self.signal_group(signal.SIGKILL)
        self.proc.wait()
        for reader in self._readers:
            reader.join(timeout=1.0)

    def signal_group(self, sig: signal.Signals) -> None:
        """Signal the child's whole process group, whether or not the child itself is still alive."""
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_children(children: Sequence[Child], grace: float, hurry: threading.Event | None = None) -> None:
    """SIGTERM every child's group, wait up to `grace` (less once `hurry` is set), then SIGKILL the groups."""
    for child in children:
        if not child.exited():
            child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (time.monotonic() < deadline and not (hurry and hurry.is_set())
           and not all(child.exited() for child in children)):
        time.sleep(POLL_S)
    for child in children:
        child.kill()


def install_signal_handlers(stop: threading.Event, hurry: threading.Event) -> None:
    """SIGINT/SIGTERM ask for a graceful stop; a second one cuts the grace periods short."""
    def handler(_signum: int, _frame: object) -> None:
        if stop.is_set():
            hurry.set()
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _spawn(name: str, argv: Sequence[str], env: Mapping[str, str], json_output: bool, variant: str) -> Child:
    try:
        return Child(name, argv, env, json_output)
    except OSError as err:
        log.error("Could not start %s (%s): %s", name, argv[0], err)
        raise LauncherError(variant) from err


class Supervisor:
    """The launch sequence; every child it starts is stopped by `shutdown`, whatever path the launch takes."""

    def __init__(self, cfg: LauncherConfig, stop: threading.Event, hurry: threading.Event,
                 environ: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.stop = stop
        self.hurry = hurry
        self.environ = environ
        self.download: Child | None = None
        self.shards: list[Child] = []
        self.router: Child | None = None

    def run(self) -> int:
        """Download, start the shards, start the router, then watch them until a signal (0) or a failure."""
        if not self.download_weights():
            return 0
        if self.cfg.download_only:
            log.info("Download only: done")
            return 0
        folder = self.model_folder()
        if not self.start_shards(folder):
            return 0
        self.start_router(folder)
        self.monitor()
        return 0

    def download_weights(self) -> bool:
        """Run the download step to completion; False when a signal stopped it."""
        log.info("Starting download process")
        self.download = _spawn("download", download_command(self.cfg), download_env(self.cfg, self.environ),
                               self.cfg.json_output, "DownloadError")
        while not self.download.exited():
            if self.stop.is_set():
                log.info("Stopping the download")
                return False
            time.sleep(POLL_S)
        if self.download.proc.returncode != 0:
            log.error("Download encountered an error (exit code %s)", self.download.proc.returncode)
            raise LauncherError("DownloadError", self.download.stderr_output())
        log.info("Successfully downloaded weights")
        return not self.stop.is_set()

    def model_folder(self) -> str:
        """The local folder the shards load and the router takes its tokenizer from (a .gguf is converted)."""
        from lorax_server.sources import locate_model

        try:
            return str(locate_model(self.cfg.model_id, self.cfg.revision, self.cfg.source))
        except Exception as err:  # noqa: BLE001 - any failure here means the download did not deliver
            log.error("Model %s is not available locally after the download: %s", self.cfg.model_id, err)
            raise LauncherError("DownloadError") from err

    def start_shards(self, folder: str) -> bool:
        """Start every shard and wait until each one's socket exists; False when a signal came first."""
        sockets = [Path(self.cfg.shard_socket(rank)) for rank in range(self.cfg.num_shard)]
        for path in sockets:
            path.unlink(missing_ok=True)
        argv = shard_command(self.cfg, folder)
        for rank in range(self.cfg.num_shard):
            log.info("Starting shard %d", rank)
            self.shards.append(_spawn(f"shard-{rank}", argv, shard_env(self.cfg, rank, self.environ),
                                      self.cfg.json_output, "ShardCannotStart"))
        start = last_log = time.monotonic()
        pending = set(range(self.cfg.num_shard))
        while pending:
            if self.stop.is_set():
                return False
            for rank, shard in enumerate(self.shards):
                if shard.exited():
                    log.error("Shard %d failed to start (exit code %s)", rank, shard.proc.returncode)
                    raise LauncherError("ShardCannotStart", shard.stderr_output())
            for rank in sorted(pending):
                if sockets[rank].exists():
                    log.info("Shard %d ready in %.1fs", rank, time.monotonic() - start)
                    pending.discard(rank)
            if pending and time.monotonic() - last_log >= WAITING_LOG_EVERY_S:
                last_log = time.monotonic()
                for rank in sorted(pending):
                    log.info("Waiting for shard %d to be ready...", rank)
            time.sleep(POLL_S)
        return True

    def start_router(self, folder: str) -> None:
        log.info("Starting Webserver")
        self.router = _spawn("router", router_command(self.cfg, folder), router_env(self.environ),
                             self.cfg.json_output, "WebserverCannotStart")

    def monitor(self) -> None:
        """Return on a signal; raise as soon as a shard or the router dies."""
        assert self.router is not None
        while not self.stop.is_set():
            for rank, shard in enumerate(self.shards):
                if shard.exited():
                    log.error("Shard %d crashed (exit code %s)", rank, shard.proc.returncode)
                    raise LauncherError("ShardFailed", shard.stderr_output())
            if self.router.exited():
                log.error("Webserver Crashed (exit code %s)", self.router.proc.returncode)
                raise LauncherError("WebserverFailed", self.router.stderr_output())
            time.sleep(POLL_S)
        log.info("Received a stop signal: shutting down")

    def shutdown(self, graceful: bool) -> None:
        """Stop the router (giving in-flight requests time when `graceful`), then the shards and the download."""
        if self.router is not None:
            log.info("Terminating webserver")
            stop_children([self.router], ROUTER_GRACE_S if graceful else SHARD_GRACE_S, self.hurry)
            self.router = None
        if self.shards:
            log.info("Terminating shards")
            stop_children(self.shards, SHARD_GRACE_S, self.hurry)
            self.shards = []
        if self.download is not None:
            stop_children([self.download], DOWNLOAD_GRACE_S, self.hurry)
            self.download = None


def launch(cfg: LauncherConfig, environ: Mapping[str, str] = os.environ) -> int:
    """Run the whole launch; the launcher's exit code. Failures print `Error: <variant>` on stderr."""
    stop, hurry = threading.Event(), threading.Event()
    install_signal_handlers(stop, hurry)
    supervisor = Supervisor(cfg, stop, hurry, environ)
    try:
        code = supervisor.run()
    except LauncherError as err:
        supervisor.shutdown(graceful=False)
        if err.stderr:
            sys.stderr.write(err.stderr + "\n")
        sys.stderr.write(f"Error: {err.variant}\n")
        sys.stderr.flush()
        return 1
    except BaseException:
        supervisor.shutdown(graceful=False)
        raise
    supervisor.shutdown(graceful=True)
    log.info("Shutdown complete")
    return code
