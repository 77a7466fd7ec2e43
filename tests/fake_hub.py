"""A local server speaking the parts of the Hugging Face hub API that `huggingface_hub` calls to fetch a repo
(model info, the file tree, file resolve/download), with a bearer token required per private repo.

Point HF_ENDPOINT at `FakeHub.url`. Repos are folders of files; a repo listed in `hang` accepts connections and
never answers; `cut` names files whose download stops half-way (the connection closes mid-body). `hub_launcher`
starts the real launcher with such a hub as its adapter source.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from tests.e2e import Launcher
from tests.tiny_models import make_adapter, make_model

SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Path] = {}
        self.tokens: dict[str, str] = {}  # repo -> the bearer token it needs (absent: public)
        self.hang: set[str] = set()
        self.cut: set[str] = set()  # "repo/filename"
        self.requests: list[tuple[str, str, str]] = []  # (method, path, authorization)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def add(self, repo: str, folder: Path, token: str | None = None) -> None:
        self.repos[repo] = folder
        if token:
            self.tokens[repo] = token

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---- answers ----------------------------------------------------------------------------------------------
    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append((handler.command, path, handler.headers.get("Authorization", "")))
        repo, route = self._route(path)
        if repo in self.hang:
            time.sleep(3600)
        if repo not in self.repos:
            return self._json(handler, 404, {"error": "Repository not found"}, body, {"X-Error-Code": "RepoNotFound"})
        needed = self.tokens.get(repo)
        if needed and handler.headers.get("Authorization") != f"Bearer {needed}":
            # what the hub answers for a private repo and a missing or wrong token
            return self._json(handler, 401, {"error": "Invalid credentials"}, body, {"X-Error-Code": "RepoNotFound"})
        folder = self.repos[repo]
        files = sorted(p for p in folder.iterdir() if p.is_file())
        if route == "info":
            siblings = [{"rfilename": f.name} for f in files]
            return self._json(handler, 200, {"id": repo, "sha": SHA, "private": bool(needed), "siblings": siblings}, body)
        if route == "tree":
            tree = [{"type": "file", "path": f.name, "size": f.stat().st_size, "oid": _oid(f)} for f in files]
            return self._json(handler, 200, tree, body)
        file = folder / route
        if not file.is_file():
            return self._json(handler, 404, {"error": "Entry not found"}, body, {"X-Error-Code": "EntryNotFound"})
        data, start = file.read_bytes(), 0
        headers = {"ETag": f'"{_oid(file)}"', "X-Repo-Commit": SHA, "Content-Type": "application/octet-stream"}
        wanted = handler.headers.get("Range", "")
        if body and wanted.startswith("bytes=") and wanted.endswith("-"):  # a resumed download
            start = int(wanted[6:-1])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        handler.send_response(206 if start else 200)
        for name, value in {**headers, "Content-Length": str(len(data) - start)}.items():
            handler.send_header(name, value)
        handler.end_headers()
        if body:
            if f"{repo}/{route}" in self.cut:
                handler.wfile.write(data[start : len(data) // 2])
                handler.wfile.flush()
                handler.close_connection = True
                handler.connection.shutdown(2)
                return
            handler.wfile.write(data[start:])

    @staticmethod
    def _route(path: str) -> tuple[str, str]:
        """(repo, "info" | "tree" | filename) of a hub URL path."""
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            repo = "/".join(parts[2:4])
            return repo, "tree" if parts[4:5] == ["tree"] else "info"
        return "/".join(parts[:2]), "/".join(parts[4:])  # org/name/resolve/<revision>/<file>

    @staticmethod
    def _json(handler, status: int, payload, body: bool, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            handler.send_header(name, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)


def _oid(file: Path) -> str:
    return hashlib.sha1(file.read_bytes()).hexdigest()


@dataclass
class HubLauncher:
    """A real launcher whose hub is a FakeHub holding the repos below."""

    hub: FakeHub
    launcher: Launcher


PRIVATE_TOKEN = "tok-a"  # what the hub accepts for org/private
CANARY = "hf_canaryQ7ZtVb3KpX9w"  # what it accepts for org/canary: searched for in every log, span and reply
SOURCE_TIMEOUT_S = 4  # LORAX_ADAPTER_SOURCE_TIMEOUT_S of the launcher: org/hung answers nothing


@contextmanager
def hub_launcher(workdir: Path, *args: str, env: dict | None = None) -> Iterator[HubLauncher]:
    """A tiny Llama (with a chat template) served by the real launcher, its adapters on a local hub: org/private
    and org/canary need their tokens, org/public needs none, org/hung never answers."""
    base = workdir / "base"
    model = make_model("llama", base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    hub = FakeHub()
    for seed, (repo, token) in enumerate(
        [("org/private", PRIVATE_TOKEN), ("org/canary", CANARY), ("org/public", None), ("org/hung", None)]
    ):
        hub.add(repo, make_adapter(model, workdir / repo.replace("/", "-"), seed, 8, 16, ["q_proj", "v_proj"]), token)
    hub.hang.add("org/hung")
    launcher = Launcher(str(base), workdir, "--max-input-length", "32", "--max-total-tokens", "64",
                        "--max-batch-prefill-tokens", "64", *args,
                        env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
                             "LORAX_ADAPTER_SOURCE_TIMEOUT_S": str(SOURCE_TIMEOUT_S), **(env or {})})
    try:
        launcher.wait_ready()
        yield HubLauncher(hub, launcher)
    finally:
        code = launcher.stop()
        hub.close()
    assert code == 0, launcher.output()


def full_log(launcher: Launcher) -> str:
    """Everything the launcher and its children wrote so far."""
    launcher.log.flush()
    launcher.log.seek(0)
    return launcher.log.read()
