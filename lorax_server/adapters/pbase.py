"""Predibase adapter ids (`repo` or `repo/version`): asked of the Predibase API, which answers with an S3 path.

The versioned endpoint is tried first; when it fails (or no version is given) the legacy endpoint answers with a
model uuid and its best run, which name the weights folder. The resulting path is then fetched like any `s3` id.
Answers are remembered per (id, digest of the token): a token is proven once, and never kept.
"""
from __future__ import annotations

import json
import os
import urllib.error
import threading
import urllib.request
from collections import OrderedDict
from urllib.parse import quote

from lorax_server.adapters.access import AccessDenied, credential_digest
from lorax_server.adapters.config import AdapterError
from lorax_server.adapters.deadline import source_timeout

GATEWAY_ENV = "PREDIBASE_GATEWAY_ENDPOINT"
DEFAULT_GATEWAY = "https://api.app.predibase.com"
CACHE_SIZE = 256

_resolved: OrderedDict[tuple[str, str, str], str] = OrderedDict()  # (id, token digest, gateway) -> S3 id
_lock = threading.Lock()


def _get_json(url: str, token: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=source_timeout()) as response:
        return json.loads(response.read())


def _legacy_path(gateway: str, repo: str, version: str, token: str) -> str:
    url = f"{gateway}/v1/models/version/name/{quote(repo, safe='')}"
    if version:
        url += f"?version={quote(version, safe='')}"
    body = _get_json(url, token)
    return f"{body['uuid']}/{body['bestRunID']}/artifacts/model/model_weights/"


def _resolve(adapter_id: str, token: str, gateway: str) -> str:
    repo, _, version = adapter_id.partition("/")
    if not repo or "/" in version:
        raise AdapterError(f"pbase adapter id '{adapter_id}' must look like <repo> or <repo>/<version>")
    try:
        if version:
            try:
                body = _get_json(f"{gateway}/v2/repos/{quote(repo, safe='')}/version/{quote(version, safe='')}", token)
            except (urllib.error.URLError, OSError, ValueError):
                return _legacy_path(gateway, repo, version, token)
            if not body.get("adapterPath"):
                raise AdapterError(f"pbase adapter '{adapter_id}' is not ready yet (status {body.get('status')!r})")
            return body["adapterPath"]
        return _legacy_path(gateway, repo, version, token)
    except urllib.error.HTTPError as exc:
        message = f"pbase adapter '{adapter_id}': the Predibase API answered {exc.code} {exc.reason}"
        if exc.code in (401, 403, 404):
            raise AccessDenied(message, exc.code) from exc
        raise AdapterError(message) from exc
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        raise AdapterError(f"pbase adapter '{adapter_id}' could not be resolved: {type(exc).__name__}: {exc}") from exc


def resolve(adapter_id: str, api_token: str | None) -> str:
    """The S3 id holding a Predibase adapter; needs the request's token or PREDIBASE_API_TOKEN."""
    token = api_token or os.environ.get("PREDIBASE_API_TOKEN")
    if not token:
        raise AdapterError(
            f"adapter '{adapter_id}' from source 'pbase' needs an API token (request `api_token` or PREDIBASE_API_TOKEN)"
        )
    gateway = os.environ.get(GATEWAY_ENV, DEFAULT_GATEWAY).rstrip("/")
    key = (adapter_id, credential_digest(token), gateway)
    with _lock:
        if key in _resolved:
            _resolved.move_to_end(key)
            return _resolved[key]
    path = _resolve(adapter_id, token, gateway)
    with _lock:
        _resolved[key] = path
        while len(_resolved) > CACHE_SIZE:
            _resolved.popitem(last=False)
    return path
