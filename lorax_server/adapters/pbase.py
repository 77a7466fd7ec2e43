"""Predibase adapter ids (`repo` or `repo/version`): asked of the Predibase API, which answers with an S3 path.

The versioned endpoint is tried first; when it fails (or no version is given) the legacy endpoint answers with a
model uuid and its best run, which name the weights folder. The resulting path is then fetched like any `s3` id.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from functools import lru_cache
from urllib.parse import quote

from lorax_server.adapters.config import AdapterError

GATEWAY_ENV = "PREDIBASE_GATEWAY_ENDPOINT"
DEFAULT_GATEWAY = "https://api.app.predibase.com"
TIMEOUT_S = 30


def _get_json(url: str, token: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return json.loads(response.read())


def _legacy_path(gateway: str, repo: str, version: str, token: str) -> str:
    url = f"{gateway}/v1/models/version/name/{quote(repo, safe='')}"
    if version:
        url += f"?version={quote(version, safe='')}"
    body = _get_json(url, token)
    return f"{body['uuid']}/{body['bestRunID']}/artifacts/model/model_weights/"


@lru_cache(maxsize=256)
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
        raise AdapterError(f"pbase adapter '{adapter_id}': the Predibase API answered {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        raise AdapterError(f"pbase adapter '{adapter_id}' could not be resolved: {type(exc).__name__}: {exc}") from exc


def resolve(adapter_id: str, api_token: str | None) -> str:
    """The S3 id holding a Predibase adapter; needs the request's token or PREDIBASE_API_TOKEN."""
    token = api_token or os.environ.get("PREDIBASE_API_TOKEN")
    if not token:
        raise AdapterError(
            f"adapter '{adapter_id}' from source 'pbase' needs an API token (request `api_token` or PREDIBASE_API_TOKEN)"
        )
    return _resolve(adapter_id, token, os.environ.get(GATEWAY_ENV, DEFAULT_GATEWAY).rstrip("/"))
