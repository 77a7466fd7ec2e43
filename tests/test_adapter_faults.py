"""Adapter source faults stay contained: a source that accepts and never answers fails its adapter after
LORAX_ADAPTER_SOURCE_TIMEOUT_S while other requests run, and an interrupted download or a full disk leaves no
half-written adapter in the cache."""
from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import httpx
import pytest

from lorax_server.adapters.config import AdapterError
from lorax_server.adapters.registry import AdapterKey
from tests.fake_hub import SHA, SOURCE_TIMEOUT_S
from tests.test_adapter_sources import registry, same_weights, s3_client  # noqa: F401 (fixtures)
from tests.test_private_adapters import hub  # noqa: F401 (fixture)


def test_a_hung_source_fails_the_adapter_within_the_timeout(registry, hub, monkeypatch):  # noqa: F811
    registry, adapter = registry
    monkeypatch.setenv("LORAX_ADAPTER_SOURCE_TIMEOUT_S", "1")
    hub.add("org/hung", adapter)
    hub.add("org/private", adapter, token="tok-a")
    registry.load(AdapterKey(("org/private",), "hub"), 1, "tok-a")
    hub.hang |= {"org/hung", "org/private"}
    for key, token in ((AdapterKey(("org/hung",), "hub"), None), (AdapterKey(("org/private",), "hub"), "tok-b")):
        started = time.monotonic()
        with pytest.raises(AdapterError, match=r"did not answer within 1s \(LORAX_ADAPTER_SOURCE_TIMEOUT_S\)"):
            registry.download(key, token)  # a first fetch, then an access check of an adapter already held
        assert time.monotonic() - started < 2.5
    registry.load(AdapterKey(("org/private",), "hub"), 1, "tok-a")  # a proven token needs no source call


def test_an_interrupted_hub_download_leaves_no_partial_file_and_resumes(registry, hub, tmp_path, monkeypatch):  # noqa: F811
    """huggingface_hub writes each file as blobs/<etag>.incomplete and links it into the snapshot only once whole."""
    registry, adapter = registry
    hub.add("org/cut", adapter)
    hub.cut.add("org/cut/adapter_model.safetensors")
    key = AdapterKey(("org/cut",), "hub")
    with pytest.raises(AdapterError, match="could not be fetched from the hub"):
        registry.download(key)
    repo = tmp_path / "cache" / "models--org--cut"
    snapshot = repo / "snapshots" / SHA
    assert not (snapshot / "adapter_model.safetensors").exists()
    for file in (p for p in snapshot.iterdir()) if snapshot.exists() else ():
        assert file.read_bytes() == (adapter / file.name).read_bytes(), f"{file.name} is whole or absent"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AdapterError):
        registry.fetch(key)  # offline, the partial snapshot is not served
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub.cut.clear()
    assert same_weights(registry.fetch(key), registry.fetch(AdapterKey((str(adapter),), "local")))
    assert not list(repo.rglob("*.incomplete"))


class FillingClient:
    """A boto3 S3 client whose disk fills during the `fail_at`-th file: half of it is written, then ENOSPC."""

    def __init__(self, client, fail_at: int):
        self._client, self._left = client, fail_at

    def __getattr__(self, name):
        return getattr(self._client, name)

    def download_file(self, bucket: str, key: str, path: str) -> None:
        self._left -= 1
        if self._left == 0:
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        self._client.download_file(bucket, key, path)


def test_a_full_disk_during_an_s3_download_leaves_the_cache_as_it_was(registry, s3_client, tmp_path, monkeypatch):  # noqa: F811
    import boto3

    registry, adapter = registry
    s3_client.create_bucket(Bucket="adapters")
    for file in adapter.iterdir():
        s3_client.upload_file(str(file), "adapters", f"team/lora/{file.name}")
    key = AdapterKey(("s3://adapters/team/lora",), "s3")
    folder = tmp_path / "cache" / "models--s3--adapters--team--lora"
    real_client = boto3.client
    monkeypatch.setattr(boto3, "client", lambda *a, **k: FillingClient(real_client(*a, **k), fail_at=2))
    with pytest.raises(AdapterError, match="No space left on device"):
        registry.download(key)
    assert not folder.exists(), "nothing of the failed first download is in the cache"
    monkeypatch.setattr(boto3, "client", real_client)
    registry.download(key)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(boto3, "client", lambda *a, **k: FillingClient(real_client(*a, **k), fail_at=2))
    with pytest.raises(AdapterError, match="No space left on device"):
        registry.download(key)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, "the complete copy is untouched"
    assert not list((tmp_path / "cache").glob(".lorax-s3-partial-*")), "no staging folder is left behind"


@pytest.mark.e2e
def test_a_hung_source_gives_its_requests_a_424_while_others_run(served_from_hub):
    url = served_from_hub.launcher.url

    def generate(adapter: str | None) -> httpx.Response:
        params = {"max_new_tokens": 3, **({"adapter_id": adapter} if adapter else {})}
        return httpx.post(url + "/generate", json={"inputs": "Hello", "parameters": params}, timeout=60)

    hung: list[tuple[httpx.Response, float]] = []

    def ask_hung() -> None:
        started = time.monotonic()
        hung.append((generate("org/hung"), time.monotonic() - started))

    waiting = threading.Thread(target=ask_hung)
    waiting.start()
    time.sleep(0.5)
    started = time.monotonic()
    for adapter in (None, "org/public", None):
        assert generate(adapter).status_code == 200
    assert time.monotonic() - started < SOURCE_TIMEOUT_S, "other requests ran while the source hung"
    waiting.join(30)
    reply, took = hung[0]
    assert reply.status_code == 424 and reply.json()["error_type"] == "generation", reply.text
    assert f"did not answer within {SOURCE_TIMEOUT_S}s" in reply.json()["error"]
    assert SOURCE_TIMEOUT_S - 0.5 < took < 3 * SOURCE_TIMEOUT_S
