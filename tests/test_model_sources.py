"""Base models from S3: mirrored from a real local S3-compatible server, then served by the real launcher."""
from __future__ import annotations

import boto3
import httpx
import pytest

from lorax_server.sources import ModelNotFound, fetch_model, locate_model, s3
from tests.e2e import Launcher, free_port
from tests.test_e2e_serving import expected_tokens


@pytest.fixture()
def s3_server(monkeypatch):
    """A moto S3 server on a free port, with the env boto3 needs to reach it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    yield boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"]), env
    server.stop()


def upload(client, folder, bucket: str, prefix: str) -> None:
    client.create_bucket(Bucket=bucket)
    for file in folder.iterdir():
        client.upload_file(str(file), bucket, f"{prefix}/{file.name}")


def test_fetch_then_locate_without_network(s3_server, tiny_model_dir, tmp_path, monkeypatch):
    client, _ = s3_server
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "cache"))
    folder, _ = tiny_model_dir
    upload(client, folder, "models", "org/tiny")
    with pytest.raises(ModelNotFound, match="has not been downloaded"):
        locate_model("s3://models/org/tiny", source="s3")
    fetched = fetch_model("s3://models/org/tiny", source="s3")
    assert {p.name for p in folder.iterdir()} <= {p.name for p in fetched.iterdir()}
    assert (fetched / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert locate_model("s3://models/org/tiny", source="s3") == fetched
    # A download that stopped half way is not a model.
    (fetched / s3.COMPLETE_MARKER).unlink()
    with pytest.raises(ModelNotFound):
        locate_model("s3://models/org/tiny", source="s3")


def test_missing_prefix_and_bad_ids_are_clear_errors(s3_server, tmp_path, monkeypatch):
    client, _ = s3_server
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "cache"))
    client.create_bucket(Bucket="models")
    with pytest.raises(ModelNotFound, match="no objects under s3://models/nothing/"):
        fetch_model("s3://models/nothing", source="s3")
    with pytest.raises(ModelNotFound, match="could not be fetched"):
        fetch_model("s3://no-such-bucket/x", source="s3")
    with pytest.raises(s3.S3Error, match="must look like"):
        s3.parse("s3://bucket-only")


def test_prefix_from_predibase_bucket_env(monkeypatch):
    monkeypatch.setenv("PREDIBASE_MODEL_BUCKET", "team-bucket")
    monkeypatch.setenv("PREDIBASE_MODEL_FOLDER", "models/")
    assert s3.parse("llama/v1") == ("team-bucket", "models/llama/v1")
    assert s3.parse("s3://other/x/y") == ("other", "x/y")


@pytest.mark.e2e
def test_launcher_serves_a_model_from_s3(s3_server, tiny_model_dir, tmp_path):
    client, env = s3_server
    folder, _ = tiny_model_dir
    upload(client, folder, "models", "tiny-llama")
    launcher = Launcher("s3://models/tiny-llama", tmp_path, "--source", "s3", "--max-input-length", "32",
                        "--max-total-tokens", "64", "--max-batch-prefill-tokens", "64", env=env)
    try:
        launcher.wait_ready()
        body = {"inputs": "Hello world", "parameters": {"max_new_tokens": 6, "ignore_eos_token": True, "details": True}}
        response = httpx.post(launcher.url + "/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        ids = [t["id"] for t in response.json()["details"]["tokens"]]
        assert ids == expected_tokens(folder, None, "Hello world", 6)
    finally:
        assert launcher.stop() == 0, launcher.output()
