"""Adapter sources against real protocols: S3 via a local S3-compatible server, the hub via its cache layout."""
from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
import torch

from lorax_server.adapters.config import AdapterError
from lorax_server.adapters.registry import AdapterKey
from lorax_server.dist import Parallel
from lorax_server.shard import build_service
from tests.e2e import free_port
from tests.tiny_models import make_adapter


@pytest.fixture()
def registry(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(tmp_path))
    folder, model = tiny_model_dir
    service = build_service(str(folder), None, "hub", None, Parallel(), torch.device("cpu"), "/unused")
    adapter = make_adapter(model, tmp_path / "adapter", 5, 8, 16, ["q_proj", "v_proj"])
    return service.generator.adapters, adapter


def same_weights(a, b) -> bool:
    return a.modules.keys() == b.modules.keys() and all(
        torch.equal(a.modules[m][0], b.modules[m][0]) and torch.equal(a.modules[m][1], b.modules[m][1]) for m in a.modules
    )


@pytest.fixture()
def s3_client(monkeypatch):
    """A client of a real local S3-compatible server (moto), with the env the shard reads set to reach it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for var, value in {"S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(var, value)
    yield boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
    server.stop()


def test_s3_adapter_from_local_s3_server(registry, s3_client):
    registry, adapter = registry
    s3_client.create_bucket(Bucket="adapters")
    for file in adapter.iterdir():
        s3_client.upload_file(str(file), "adapters", f"team/my-lora/{file.name}")
    from_s3 = registry.fetch(AdapterKey(("s3://adapters/team/my-lora",), "s3"))
    from_disk = registry.fetch(AdapterKey((str(adapter),), "local"))
    assert same_weights(from_s3, from_disk)
    with pytest.raises(AdapterError, match="no objects"):
        registry.fetch(AdapterKey(("s3://adapters/team/missing",), "s3"))


class FakeGateway(BaseHTTPRequestHandler):
    """The two Predibase endpoints the pbase source asks, answering from `ROUTES` and recording the auth header."""

    ROUTES: dict[str, tuple[int, dict]] = {}
    seen: list[tuple[str, str]] = []

    def do_GET(self) -> None:
        FakeGateway.seen.append((self.path, self.headers.get("Authorization", "")))
        status, body = self.ROUTES.get(self.path, (404, {"error": "not found"}))
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


def test_pbase_adapter_resolved_through_the_api_then_s3(registry, s3_client, monkeypatch):
    registry, adapter = registry
    monkeypatch.setenv("PREDIBASE_MODEL_BUCKET", "pbase-bucket")
    s3_client.create_bucket(Bucket="pbase-bucket")
    for file in adapter.iterdir():
        s3_client.upload_file(str(file), "pbase-bucket", f"uuid-1/run-7/artifacts/model/model_weights/{file.name}")
        s3_client.upload_file(str(file), "pbase-bucket", f"adapters/sql/3/{file.name}")
    FakeGateway.ROUTES = {
        "/v2/repos/sql/version/3": (200, {"status": "completed", "adapterPath": "adapters/sql/3"}),
        "/v2/repos/sql/version/4": (200, {"status": "queued", "adapterPath": None}),
        "/v1/models/version/name/legacy": (200, {"uuid": "uuid-1", "bestRunID": "run-7"}),
        "/v1/models/version/name/legacy?version=2": (200, {"uuid": "uuid-1", "bestRunID": "run-7"}),
    }
    FakeGateway.seen = []
    gateway = ThreadingHTTPServer(("127.0.0.1", 0), FakeGateway)
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    monkeypatch.setenv("PREDIBASE_GATEWAY_ENDPOINT", f"http://127.0.0.1:{gateway.server_address[1]}")
    try:
        expected = registry.fetch(AdapterKey((str(adapter),), "local"))
        assert same_weights(registry.fetch(AdapterKey(("sql/3",), "pbase"), api_token="tok-a"), expected)
        assert ("/v2/repos/sql/version/3", "Bearer tok-a") in FakeGateway.seen
        assert same_weights(registry.fetch(AdapterKey(("legacy",), "pbase"), api_token="tok-a"), expected)
        # The versioned endpoint does not know this repo: the legacy one answers.
        assert same_weights(registry.fetch(AdapterKey(("legacy/2",), "pbase"), api_token="tok-a"), expected)
        with pytest.raises(AdapterError, match="not ready yet"):
            registry.fetch(AdapterKey(("sql/4",), "pbase"), api_token="tok-a")
        with pytest.raises(AdapterError, match="answered 404"):
            registry.fetch(AdapterKey(("unknown",), "pbase"), api_token="tok-a")
        monkeypatch.delenv("PREDIBASE_API_TOKEN", raising=False)
        with pytest.raises(AdapterError, match="needs an API token"):
            registry.fetch(AdapterKey(("sql/5",), "pbase"))
    finally:
        gateway.shutdown()


def test_hub_adapter_served_offline_from_cache_layout(registry, monkeypatch, tmp_path):
    registry, adapter = registry
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = tmp_path / "cache" / "models--org--my-lora" / "snapshots" / ("a" * 40)
    shutil.copytree(adapter, snapshot)
    refs = tmp_path / "cache" / "models--org--my-lora" / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    from_hub = registry.fetch(AdapterKey(("org/my-lora",), "hub"))
    assert same_weights(from_hub, registry.fetch(AdapterKey((str(adapter),), "local")))
    with pytest.raises(AdapterError, match="could not be fetched from the hub"):
        registry.fetch(AdapterKey(("org/not-cached",), "hub"))


def test_linear_merge_equals_adapter_with_merged_tensors(registry, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    registry, first = registry
    _, model = tiny_model_dir
    second = make_adapter(model, tmp_path / "second", 6, 8, 16, ["q_proj", "v_proj"])
    a, b = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    shutil.copy(first / "adapter_config.json", merged_dir)
    save_file({k: 0.7 * a[k] + 0.3 * b[k] for k in a}, str(merged_dir / "adapter_model.safetensors"))
    key = AdapterKey((str(first), str(second)), "local", (0.7, 0.3), "linear", 1.0, "total")
    merged = registry.fetch(key)
    expected = registry.fetch(AdapterKey((str(merged_dir),), "local"))
    for m in expected.modules:
        assert torch.allclose(merged.modules[m][0], expected.modules[m][0], atol=1e-6)
        assert torch.allclose(merged.modules[m][1], expected.modules[m][1], atol=1e-6)
    with pytest.raises(AdapterError, match="unknown merge strategy"):
        registry.fetch(AdapterKey((str(first), str(second)), "local", (), "average", 1.0, "total"))
    with pytest.raises(AdapterError, match="density"):
        registry.fetch(AdapterKey((str(first), str(second)), "local", (), "ties", 0.0, "total"))


def test_memory_reports_each_tier(registry, tiny_model_dir, tmp_path):
    registry, adapter = registry
    _, model = tiny_model_dir
    other = make_adapter(model, tmp_path / "other", 7, 4, 8, ["o_proj"])
    assert registry.memory().disk_adapters == registry.memory().host_adapters == registry.memory().device_adapters == 0
    registry.load(AdapterKey((str(adapter),), "local"), 1)
    first = registry.fetch(AdapterKey((str(adapter),), "local"))
    registry.fetch(AdapterKey((str(other),), "local"))
    memory = registry.memory()
    on_disk = sum(f.stat().st_size for d in (adapter, other) for f in d.glob("adapter_model*"))
    assert (memory.disk_adapters, memory.disk_bytes) == (2, on_disk)
    assert (memory.host_adapters, memory.device_adapters, memory.device_bytes) == (2, 1, first.nbytes)
    assert memory.host_bytes > first.nbytes
    registry.offload(1)
    assert (registry.memory().device_adapters, registry.memory().device_bytes) == (0, 0)
    (tmp_path / "not-an-adapter").mkdir()
    with pytest.raises(AdapterError):
        registry.fetch(AdapterKey((str(tmp_path / "not-an-adapter"),), "local"))
    assert registry.memory().disk_adapters == 2  # a folder that is not an adapter is not in any tier


@pytest.mark.parametrize("strategy", ["ties", "dare_ties"])
def test_merges_under_tensor_parallel_are_slices_of_the_whole_merge(tiny_model_dir, tmp_path, monkeypatch, strategy):
    """Pruning sees whole tensors, so each shard holds exactly its slice of the single-shard merge."""
    from lorax_server.models import load_model

    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(tmp_path))
    folder, model = tiny_model_dir
    ids = tuple(str(make_adapter(model, tmp_path / f"m{i}", 20 + i, 8, 16, ["q_proj", "o_proj"])) for i in range(2))
    key = AdapterKey(ids, "local", (0.6, 0.4), strategy, 0.5, "total")
    from lorax_server.adapters.registry import AdapterRegistry

    whole = AdapterRegistry(load_model(folder, None, torch.device("cpu"), Parallel()), torch.device("cpu")).fetch(key)
    for rank in range(2):
        sharded = load_model(folder, None, torch.device("cpu"), Parallel(rank, 2))
        part = AdapterRegistry(sharded, torch.device("cpu")).fetch(key)
        half_q, half_o = whole.modules["q_proj"][1].shape[-1] // 2, whole.modules["o_proj"][0].shape[1] // 2
        assert torch.equal(part.modules["q_proj"][0], whole.modules["q_proj"][0])  # column-parallel: A whole
        assert torch.equal(part.modules["q_proj"][1], whole.modules["q_proj"][1][:, :, rank * half_q:(rank + 1) * half_q])
        assert torch.equal(part.modules["o_proj"][0], whole.modules["o_proj"][0][:, rank * half_o:(rank + 1) * half_o])
        assert torch.equal(part.modules["o_proj"][1], whole.modules["o_proj"][1])  # row-parallel: B whole
