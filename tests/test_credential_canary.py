"""Credentials never leave the server: a canary token sent as `api_token` (and as the bearer header) through the
native and OpenAI routes, accepted by the adapter source and refused by it, appears in no log line of the launcher,
router or shards (plain at info level, --json-output at debug level), in no OTLP span, on no /metrics line and in no
reply or error body."""
from __future__ import annotations

from concurrent import futures

import grpc
import httpx
import pytest

from tests.e2e import free_port
from tests.fake_hub import CANARY, HubLauncher, full_log, hub_launcher
from tests.test_tracing import Collector, trace_service_pb2_grpc

pytestmark = pytest.mark.e2e

WRONG = "hf_canaryWr0ngM4xL2d8"  # a token the hub refuses


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
    params = {"max_new_tokens": 3, "adapter_id": "org/canary"}
    chat = [{"role": "user", "content": "Hello there"}]
    found = []
    for body_token, headers in ((token, {}), (None, {"authorization": f"Bearer {token}"})):
        extra = {"api_token": body_token} if body_token else {}
        completion = {"model": "org/canary", "prompt": "Hello", "max_tokens": 3, **extra}
        found += [
            ("/generate", {"inputs": "Hello there", "parameters": {**params, **extra}}, headers),
            ("/generate_stream", {"inputs": "Hello there", "parameters": {**params, **extra}}, headers),
            ("/", {"inputs": "Hello there", "parameters": {**params, **extra}}, headers),
            ("/v1/completions", completion, headers),
            ("/v1/completions", {**completion, "stream": True}, headers),
            ("/v1/chat/completions", {"model": "org/canary", "messages": chat, "max_tokens": 3, **extra}, headers),
        ]
    return found


def exercise(served: HubLauncher) -> list[str]:
    """Every route with the canary (served) and the wrong token (refused); returns what the clients saw."""
    url, seen = served.launcher.url, []
    for token, ok in ((CANARY, True), (WRONG, False)):
        for path, body, headers in requests(token):
            reply = httpx.post(url + path, json=body, headers=headers, timeout=60)
            seen.append(reply.text + str(reply.headers))
            if ok:
                assert reply.status_code == 200 and "error" not in reply.text, (path, reply.text)
            else:  # a 424, or a streamed error event
                assert reply.status_code == 424 or '"error_type":"generation"' in reply.text.replace(" ", ""), \
                    (path, reply.text)
    invalid = {"inputs": "Hello", "parameters": {"api_token": CANARY, "temperature": -1, "adapter_id": "org/canary"}}
    seen.append(httpx.post(url + "/generate", json=invalid, timeout=30).text)
    seen.append(httpx.get(url + "/metrics", timeout=10).text)
    seen.append(httpx.get(url + "/metrics", headers={"accept": "application/json"}, timeout=10).text)
    assert any(auth == f"Bearer {CANARY}" for _, _, auth in served.hub.requests), "the canary reached the source"
    return seen


def assert_absent(where: str, text: str) -> None:
    for token in (CANARY, WRONG, CANARY[8:], WRONG[8:]):
        assert token not in text, f"a credential leaked into {where}"


def test_canary_token_in_plain_logs_metrics_and_replies(served_from_hub):
    seen = exercise(served_from_hub)
    logs = full_log(served_from_hub.launcher)
    assert "401" in logs and '"level"' not in logs, "plain logs, with the refusals in them"
    assert_absent("replies and /metrics", "\n".join(seen))
    assert_absent("plain logs", logs)


def test_canary_token_in_json_debug_logs_and_otlp_spans(tmp_path):
    collector = RawCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        with hub_launcher(tmp_path, "--json-output", "--otlp-endpoint", f"http://127.0.0.1:{port}",
                          env={"LOG_LEVEL": "debug"}) as served:
            seen = exercise(served)
        # the launcher stopped cleanly: its children flushed their buffered spans
    finally:
        server.stop(None)
    logs = full_log(served.launcher)
    assert '"level": "DEBUG"' in logs and "401" in logs, "debug JSON logs, with the refusals in them"
    assert collector.raw, "spans were exported"
    assert_absent("replies and /metrics", "\n".join(seen))
    assert_absent("JSON logs", logs)
    assert_absent("spans", b"".join(collector.raw).decode("utf-8", "replace"))
