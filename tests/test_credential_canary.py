"""Credentials never leave the server: a canary token sent as `api_token` (and as the bearer header) through the
native and OpenAI routes, accepted by the adapter source and refused by it, appears in no log line of the launcher,
router or shards (plain at info level, --json-output at debug level), in no OTLP span, on no /metrics line and in no error body."""
from __future__ import annotations

import json
from concurrent import futures

import grpc
import httpx
import pytest

from tests.e2e import Launcher, free_port
from tests.fake_hub import FakeHub
from tests.test_tracing import Collector, trace_service_pb2_grpc
from tests.tiny_models import make_adapter, make_model

pytestmark = pytest.mark.e2e

CANARY = "hf_canaryQ7ZtVb3KpX9w"  # the token the hub accepts for the private adapter
WRONG = "hf_canaryWr0ngM4xL2d8"  # a token it refuses


class RawCollector(Collector):
    """Also keeps every export request's bytes, so any attribute anywhere can be searched."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: list[bytes] = []

    def Export(self, request, context):
        self.raw.append(request.SerializeToString())
        return super().Export(request, context)


def requests(token: str) -> list[tuple[str, dict, dict]]:
    """(path, body, headers) for every generating route, the adapter named and the token given both ways."""
    params = {"max_new_tokens": 3, "adapter_id": "org/private"}
    chat = [{"role": "user", "content": "Hello there"}]
    found = []
    for body_token, headers in ((token, {}), (None, {"authorization": f"Bearer {token}"})):
        extra = {"api_token": body_token} if body_token else {}
        found += [
            ("/generate", {"inputs": "Hello there", "parameters": {**params, **extra}}, headers),
            ("/generate_stream", {"inputs": "Hello there", "parameters": {**params, **extra}}, headers),
            ("/", {"inputs": "Hello there", "parameters": {**params, **extra}}, headers),
            ("/v1/completions", {"model": "org/private", "prompt": "Hello", "max_tokens": 3, **extra}, headers),
            ("/v1/completions", {"model": "org/private", "prompt": "Hello", "max_tokens": 3, "stream": True, **extra},
             headers),
            ("/v1/chat/completions", {"model": "org/private", "messages": chat, "max_tokens": 3, **extra}, headers),
        ]
    return found


@pytest.mark.parametrize("json_output", [False, True], ids=["plain", "json"])
def test_canary_token_appears_nowhere(tmp_path, json_output):
    base = tmp_path / "base"
    model = make_model("llama", base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    hub = FakeHub()
    hub.add("org/private", make_adapter(model, tmp_path / "private", 3, 8, 16, ["q_proj", "v_proj"]), token=CANARY)
    collector = RawCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    launcher = Launcher(str(base), tmp_path, "--max-input-length", "32", "--max-total-tokens", "64",
                        "--max-batch-prefill-tokens", "64", "--otlp-endpoint", f"http://127.0.0.1:{port}",
                        *(["--json-output"] if json_output else []),
                        env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
                             "LOG_LEVEL": "debug" if json_output else "info"})
    seen: list[str] = []
    try:
        launcher.wait_ready()
        for token, ok in ((CANARY, True), (WRONG, False)):
            for path, body, headers in requests(token):
                reply = httpx.post(launcher.url + path, json=body, headers=headers, timeout=60)
                seen.append(reply.text + str(reply.headers))
                if ok:
                    assert reply.status_code == 200 and "error" not in reply.text, (path, reply.text)
                elif not ok:
                    assert reply.status_code == 424 or '"error_type":"generation"' in reply.text.replace(" ", ""), \
                        (path, reply.text)
        invalid = {"inputs": "Hello", "parameters": {"api_token": CANARY, "temperature": -1, "adapter_id": "x"}}
        seen.append(httpx.post(launcher.url + "/generate", json=invalid, timeout=30).text)
        seen.append(httpx.get(launcher.url + "/metrics", timeout=10).text)
        seen.append(httpx.get(launcher.url + "/metrics", headers={"accept": "application/json"}, timeout=10).text)
    finally:
        assert launcher.stop() == 0, launcher.output()  # a clean stop flushes the buffered spans
        server.stop(None)
        hub.close()
    assert any(auth == f"Bearer {CANARY}" for _, _, auth in hub.requests), "the canary reached the source"
    launcher.log.seek(0)
    logs = launcher.log.read()
    assert collector.raw, "spans were exported"
    assert ('"level": "DEBUG"' in logs) == json_output and "401" in logs, "the logs are the ones asked for"
    for where, text in [("logs", logs), ("replies and /metrics", "\n".join(seen)),
                        ("spans", b"".join(collector.raw).decode("utf-8", "replace"))]:
        for token in (CANARY, WRONG, CANARY[8:], WRONG[8:]):
            assert token not in text, f"{token} leaked into {where}"
