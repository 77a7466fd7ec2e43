"""End to end: the real launcher, shard and router processes, over HTTP, against transformers + peft."""
from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.e2e import Launcher, descendants
from tests.tiny_models import make_adapter, make_model

pytestmark = pytest.mark.e2e

PROMPTS = ["What is the capital", "Hello world", "The quick brown fox jumps", "LoRA adapters change",
           "Serving thousands of", "Numbers like"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny Llama with two adapters, served by the real launcher."""
    work = tmp_path_factory.mktemp("e2e")
    base = work / "base"
    model = make_model("llama", base)
    adapters = [make_adapter(model, work / f"adapter{i}", i + 1, 8, 16, ["q_proj", "v_proj"]) for i in range(2)]
    launcher = Launcher(str(base), work, "--max-input-length", "64", "--max-total-tokens", "128",
                        "--max-batch-prefill-tokens", "256", "--adapter-source", "local").wait_ready()
    yield launcher, base, adapters, work
    launcher.stop()


def expected_tokens(base, adapter, prompt: str, n: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()


def generate(url: str, prompt: str, **params) -> httpx.Response:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 8, "details": True, "ignore_eos_token": True, **params}}
    return httpx.post(url + "/generate", json=body, timeout=120)


def test_concurrent_mixed_requests_match_transformers_and_peft(served):
    launcher, base, adapters, _ = served
    jobs = [(p, [None, *adapters][i % 3]) for i, p in enumerate(PROMPTS)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [
            pool.submit(generate, launcher.url, p, **({"adapter_id": str(a), "adapter_source": "local"} if a else {}))
            for p, a in jobs
        ]
        responses = [f.result() for f in futures]
    for (prompt, adapter), response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        got = [t["id"] for t in response.json()["details"]["tokens"]]
        assert got == expected_tokens(base, adapter, prompt, 8), (prompt, adapter)


def test_stream_compat_health_info(served):
    launcher, _, _, _ = served
    plain = generate(launcher.url, "Hello world").json()
    with httpx.stream("POST", launcher.url + "/generate_stream", timeout=60,
                      json={"inputs": "Hello world", "parameters": {"max_new_tokens": 8, "ignore_eos_token": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert [e["token"]["id"] for e in events] == [t["id"] for t in plain["details"]["tokens"]]
    assert events[-1]["generated_text"] == plain["generated_text"]
    compat = httpx.post(launcher.url + "/", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 8, "ignore_eos_token": True}}, timeout=60)
    assert compat.status_code == 200 and compat.json()[0]["generated_text"] == plain["generated_text"]
    assert httpx.get(launcher.url + "/health").status_code == 200
    info = httpx.get(launcher.url + "/info").json()
    assert info["max_input_length"] == 64 and info["max_total_tokens"] == 128


def test_metrics_report_adapter_tiers(served):
    launcher, _, adapters, _ = served
    for adapter in adapters:
        assert generate(launcher.url, "Hello", adapter_id=str(adapter), adapter_source="local").status_code == 200
    metrics = httpx.get(launcher.url + "/metrics", headers={"accept": "application/json"}).json()

    def tier(name: str, which: str) -> float:
        return next(d["value"] for d in metrics[f"lorax_adapter_tier_{name}"]["data"] if f'tier="{which}"' in d["key"])

    assert tier("adapters", "device") == tier("adapters", "host") == tier("adapters", "disk") == 2
    on_disk = sum(f.stat().st_size for a in adapters for f in a.glob("adapter_model*"))
    assert tier("bytes", "disk") == on_disk
    assert tier("bytes", "device") == tier("bytes", "host") > 0


def test_validation_and_bad_adapter_do_not_hurt_others(served):
    launcher, _, adapters, work = served
    bad = generate(launcher.url, "Hello", temperature=-1)
    assert bad.status_code == 422 and bad.json()["error_type"] == "validation"
    (work / "not-an-adapter").mkdir(exist_ok=True)
    with ThreadPoolExecutor(2) as pool:
        failing = pool.submit(generate, launcher.url, "Hello", adapter_id=str(work / "not-an-adapter"), adapter_source="local")
        good = pool.submit(generate, launcher.url, "Hello", adapter_id=str(adapters[0]), adapter_source="local")
        failing, good = failing.result(), good.result()
    assert failing.status_code == 424, failing.text
    assert "adapter_config.json" in failing.json()["error"]
    assert good.status_code == 200


def test_sigterm_leaves_no_process(tmp_path):
    base = tmp_path / "base"
    make_model("llama", base)
    launcher = Launcher(str(base), tmp_path, "--max-input-length", "32", "--max-total-tokens", "64").wait_ready()
    children = descendants(launcher.proc.pid)
    assert len(children) >= 2, "a shard and a router run under the launcher"
    assert launcher.stop() == 0, launcher.output()
    time.sleep(0.5)
    alive = [p for p in children if os.path.exists(f"/proc/{p}") and "zombie" not in open(f"/proc/{p}/status").read().lower()]
    assert alive == [], launcher.output()


def test_idle_keep_alive_connections_outlive_the_default_five_seconds(served):
    """A client or proxy reusing an idle connection must not race the server closing it (uvicorn closes after 5 s
    by default; load balancers keep theirs 60 s)."""
    import http.client
    from urllib.parse import urlparse

    launcher = served[0]
    url = urlparse(launcher.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        for pause in (0, 6.5):
            time.sleep(pause)
            connection.request("GET", "/health")  # raises RemoteDisconnected if the server closed the connection
            response = connection.getresponse()
            response.read()
            assert response.status == 200
    finally:
        connection.close()
