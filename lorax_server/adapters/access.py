"""Private adapters stay private: who may be served an adapter that was fetched with a credential.

A shard keeps an adapter in its tiers (disk, host, device) after the first request fetched it. When that request
carried a credential (a hub or Predibase `api_token`), the adapter may be private, so the ledger remembers a digest of
every credential the source accepted for it. A later request with any other credential, or none, must prove access
again with a metadata call to the source before the adapter is served from any tier; the source's 401/403/404
becomes an `AccessDenied`. Adapters first fetched without a credential are public and are never re-checked.

Digests are HMAC-SHA256 under a key drawn at start-up and held only in memory: the credential itself is never kept,
and a digest means nothing outside this process.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import threading
from collections.abc import Callable

from lorax_server.adapters.config import AdapterError

_KEY = os.urandom(32)


def credential_digest(token: str | None) -> str | None:
    """A keyed digest of a credential (None for none): equal tokens give equal digests within this process."""
    if not token:
        return None
    return hmac.new(_KEY, token.encode(), hashlib.sha256).hexdigest()


class AccessDenied(AdapterError):
    """The adapter's source refused the request's credential (HTTP `status`: 401, 403 or 404)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


Prove = Callable[[str, str, str | None], None]  # (source, adapter id, token): raises AccessDenied when refused


class AccessLedger:
    """Per (source, adapter id): None when first fetched without a credential (public), else the digests of the
    credentials its source accepted. Shared by the fetch threads and the model thread, hence the lock (never held
    during a source call)."""

    def __init__(self, prove: Prove):
        self._prove = prove
        self._grants: dict[tuple[str, str], set[str] | None] = {}
        self._lock = threading.Lock()

    def record(self, source: str, adapter_id: str, token: str | None) -> None:
        """Note a successful fetch; the first fetch decides whether the adapter is public."""
        digest = credential_digest(token)
        with self._lock:
            if (source, adapter_id) not in self._grants:
                self._grants[(source, adapter_id)] = None if digest is None else {digest}
            elif (granted := self._grants[(source, adapter_id)]) is not None:
                granted.add(digest or "")

    def check(self, source: str, adapter_id: str, token: str | None) -> None:
        """Return when `token` may be served the adapter from a tier; ask the source when it has not said so yet.
        No credential counts as one more credential (the source may answer it with the server's own token)."""
        digest = credential_digest(token) or ""
        with self._lock:
            granted = self._grants.get((source, adapter_id))
            if granted is None or digest in granted:
                return  # public, not fetched yet (the fetch itself asks the source), or already proven
        self._prove(source, adapter_id, token)
        with self._lock:
            if (granted := self._grants.get((source, adapter_id))) is not None:
                granted.add(digest)
