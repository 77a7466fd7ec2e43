"""Private adapters stay private: an adapter fetched with one caller's token is served to another caller only after
its source accepts that caller's credential, from every tier (disk, host, device), for the hub and Predibase."""
from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

import httpx
import pytest

from lorax_server.adapters.access import AccessDenied
from lorax_server.adapters.config import AdapterError
from lorax_server.adapters.registry import AdapterKey, AdapterRegistry
from tests.fake_hub import PRIVATE_TOKEN, FakeHub
from tests.test_adapter_sources import FakeGateway, registry, s3_client  # noqa: F401 (fixtures)


@pytest.fixture()
def hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "PREDIBASE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    yield hub
    hub.close()


def metadata_calls(hub: FakeHub, repo: str) -> list[str]:
    return [auth for method, path, auth in hub.requests if path == f"/api/models/{repo}"]


def test_hub_adapter_fetched_with_a_token_needs_a_token_the_hub_accepts_in_every_tier(registry, hub):
    registry, adapter = registry
    hub.add("org/private", adapter, token="tok-a")
    hub.add("org/public", adapter)
    key = AdapterKey(("org/private",), "hub")
    expected = registry.fetch(key, "tok-a")
    registry.load(key, 1, "tok-a")

    def refused(token: str | None, step) -> None:
        with pytest.raises(AccessDenied) as denied:
            step(token)
        assert denied.value.status == 401 and "401" in str(denied.value)

    for token in (None, "tok-b"):
        refused(token, lambda t: registry.download(key, t))  # what the Download/Load RPCs ask first
        refused(token, lambda t: registry.fetch(key, t))  # host tier
        refused(token, lambda t: registry.load(key, 2, t))  # device tier
    assert 2 not in registry.pools.slot_of
    assert metadata_calls(hub, "org/private") == ["Bearer tok-a"] + [""] * 3 + ["Bearer tok-b"] * 3, "each refusal asked"

    registry.host.clear()  # disk tier only: snapshot_download alone would hand out the cached files
    refused(None, lambda t: registry.download(key, t))
    restarted = AdapterRegistry(registry.model, registry.device)  # a fresh shard remembers nothing
    refused(None, lambda t: restarted.fetch(key, t))

    calls = len(metadata_calls(hub, "org/private"))
    assert registry.fetch(key, "tok-a").rank == expected.rank
    registry.load(key, 1, "tok-a")
    assert len(metadata_calls(hub, "org/private")) == calls + 1, "the fetch from disk asked the hub once"

    hub.tokens["org/private"] = "tok-c"  # a second caller the hub accepts proves access once, then is remembered
    registry.load(key, 3, "tok-c")
    registry.load(key, 3, "tok-c")
    assert metadata_calls(hub, "org/private")[calls + 1:] == ["Bearer tok-c"]

    public = AdapterKey(("org/public",), "hub")  # fetched without a credential: anyone, without a source call
    registry.load(public, 4)
    before = len(hub.requests)
    for token in (None, "tok-x"):
        registry.download(public, token)
        registry.load(public, 4, token)
    assert len(hub.requests) == before


class TokenGateway(FakeGateway):
    """The pbase test gateway, answering only requests that carry one of `TOKENS`."""

    TOKENS: set[str] = set()

    def do_GET(self) -> None:
        if self.headers.get("Authorization", "").removeprefix("Bearer ") in self.TOKENS:
            return super().do_GET()
        FakeGateway.seen.append((self.path, self.headers.get("Authorization", "")))
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_pbase_adapter_fetched_with_a_token_needs_a_token_the_gateway_accepts(registry, s3_client, monkeypatch):  # noqa: F811
    registry, adapter = registry
    monkeypatch.setenv("PREDIBASE_MODEL_BUCKET", "pbase-bucket")
    monkeypatch.delenv("PREDIBASE_API_TOKEN", raising=False)
    s3_client.create_bucket(Bucket="pbase-bucket")
    for file in adapter.iterdir():
        s3_client.upload_file(str(file), "pbase-bucket", f"adapters/sql/3/{file.name}")
    FakeGateway.ROUTES = {"/v2/repos/sql/version/3": (200, {"status": "completed", "adapterPath": "adapters/sql/3"})}
    FakeGateway.seen = []
    TokenGateway.TOKENS = {"tok-a"}
    gateway = ThreadingHTTPServer(("127.0.0.1", 0), TokenGateway)
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    monkeypatch.setenv("PREDIBASE_GATEWAY_ENDPOINT", f"http://127.0.0.1:{gateway.server_address[1]}")
    key = AdapterKey(("sql/3",), "pbase")
    try:
        registry.load(key, 1, "tok-a")
        for step in (lambda: registry.download(key, "tok-b"), lambda: registry.load(key, 2, "tok-b")):
            with pytest.raises(AccessDenied, match="answered 401") as denied:
                step()
            assert denied.value.status == 401
        with pytest.raises(AdapterError, match="needs an API token"):
            registry.fetch(key)
        assert ("/v2/repos/sql/version/3", "Bearer tok-b") in FakeGateway.seen
        TokenGateway.TOKENS.add("tok-b")
        registry.load(key, 2, "tok-b")
        registry.load(key, 1, "tok-a")
    finally:
        gateway.shutdown()
        gateway.server_close()


@pytest.mark.e2e
def test_private_adapter_through_the_launcher(served_from_hub):
    """User A loads a private hub adapter; B without or with a wrong token gets a 424 and no tokens (also when
    streaming); A is still served; a public adapter needs no token."""
    url = served_from_hub.launcher.url

    def generate(adapter: str, token: str | None, path: str = "/generate") -> httpx.Response:
        params = {"max_new_tokens": 4, "adapter_id": adapter, **({"api_token": token} if token else {})}
        return httpx.post(url + path, json={"inputs": "Hello there", "parameters": params}, timeout=60)

    first = generate("org/private", PRIVATE_TOKEN)
    assert first.status_code == 200, first.text
    for token in (None, "tok-wrong"):
        denied = generate("org/private", token)
        assert denied.status_code == 424, denied.text
        assert denied.json()["error_type"] == "generation" and "401" in denied.json()["error"]
        assert "generated_text" not in denied.text
        stream = generate("org/private", token, "/generate_stream")
        assert '"error_type":"generation"' in stream.text.replace(" ", "") and '"token"' not in stream.text
    again = generate("org/private", PRIVATE_TOKEN)
    assert again.status_code == 200 and again.json() == first.json()
    public = generate("org/public", None)
    assert public.status_code == 200 and public.json()["generated_text"]
