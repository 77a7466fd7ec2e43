"""Optional API keys (LORAX_API_KEY): generating, tokenizing and adapter routes need the key; probes stay open."""
from __future__ import annotations

import pytest

from router.auth import load_api_keys, load_metrics_require_key
from tests.test_router_support import router_stack, run

LIMITS = ("--max-input-length", "10", "--max-total-tokens", "20", "--max-batch-prefill-tokens", "40")
GUARDED = [
    ("POST", "/generate", {"inputs": "w1 w2", "parameters": {"max_new_tokens": 2}}),
    ("POST", "/generate_stream", {"inputs": "w1 w2", "parameters": {"max_new_tokens": 2}}),
    ("POST", "/", {"inputs": "w1 w2", "parameters": {"max_new_tokens": 2}}),
    ("POST", "/invocations", {"inputs": "w1 w2", "parameters": {"max_new_tokens": 2}}),
    ("POST", "/v1/completions", {"model": "", "prompt": "w1 w2", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": "", "messages": [{"role": "user", "content": "w1"}], "max_tokens": 2}),
    ("GET", "/v1/models", None),
    ("POST", "/tokenize", {"inputs": "w1 w2"}),
]


def test_keys_come_from_a_list_or_a_file(tmp_path):
    assert load_api_keys("") == ()
    assert load_api_keys(" a , b ") == ("a", "b")
    keys = tmp_path / "keys"
    keys.write_text("first\n\nsecond\n")
    assert load_api_keys(str(keys)) == ("first", "second")
    with pytest.raises(ValueError, match="names no key"):
        load_api_keys(",")


def test_metrics_flag_is_a_strict_boolean():
    assert [load_metrics_require_key(v) for v in ("", "0", "no", "1", "True", " yes ")] == [False] * 3 + [True] * 3
    with pytest.raises(ValueError, match="LORAX_METRICS_REQUIRE_KEY must be true or false"):
        load_metrics_require_key("sometimes")


def test_routes_need_the_key_and_probes_stay_open(monkeypatch):
    monkeypatch.setenv("LORAX_API_KEY", "k-one,k-two")

    async def scenario():
        async with router_stack(*LIMITS) as stack:
            for method, path, body in GUARDED:
                for headers in ({}, {"authorization": "Bearer k-wrong"}, {"authorization": "k-one"}):
                    reply = await stack.http.request(method, path, json=body, headers=headers)
                    assert reply.status_code == 401, (path, headers, reply.text)
                    assert reply.json()["error_type"] == "unauthorized" and "k-" not in reply.text
                for key in ("k-one", "k-two"):
                    reply = await stack.http.request(method, path, json=body, headers={"authorization": f"Bearer {key}"})
                    # past the key check: the words-only test tokenizer has no chat template, so chat is a 422
                    assert reply.status_code == (422 if "chat" in path else 200), (path, reply.text)
            bad_body = await stack.http.post("/generate", json={"nope": 1})
            assert bad_body.status_code == 401, "an unauthenticated body is never parsed"
            for path in ("/health", "/ping", "/metrics", "/info"):
                assert (await stack.http.get(path)).status_code == 200, path

    run(scenario())


def test_without_keys_the_bearer_is_the_hub_token_and_nothing_is_guarded(monkeypatch):
    monkeypatch.delenv("LORAX_API_KEY", raising=False)

    async def scenario():
        async with router_stack(*LIMITS) as stack:
            reply = await stack.http.post("/generate", json={"inputs": "w1", "parameters": {"max_new_tokens": 1}},
                                          headers={"authorization": "Bearer anything"})
            assert reply.status_code == 200

    run(scenario())


def test_metrics_can_be_closed_behind_the_keys(monkeypatch):
    monkeypatch.setenv("LORAX_API_KEY", "k-one")
    monkeypatch.setenv("LORAX_METRICS_REQUIRE_KEY", "1")

    async def scenario():
        async with router_stack(*LIMITS) as stack:
            for accept in ("text/plain", "application/json"):
                refused = await stack.http.get("/metrics", headers={"accept": accept})
                assert refused.status_code == 401 and refused.json()["error_type"] == "unauthorized"
                allowed = await stack.http.get("/metrics", headers={"accept": accept, "authorization": "Bearer k-one"})
                assert allowed.status_code == 200 and "lorax_request_count" in allowed.text
            for path in ("/health", "/ping", "/info"):
                assert (await stack.http.get(path)).status_code == 200, path

    run(scenario())
