"""Tensor parallelism: two shards in a gloo process group give the same tokens as transformers (+ peft)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e import Launcher
from tests.test_e2e_serving import expected_tokens, generate
from tests.tiny_models import make_adapter, make_model

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_shards_match_transformers_and_peft(arch, tmp_path):
    # one KV head: each of the two ranks needs it, so it is replicated rather than split
    model = make_model(arch, tmp_path / "base", num_key_value_heads=1)
    adapter = make_adapter(model, tmp_path / "adapter", 3, 8, 16, ["q_proj", "v_proj", "o_proj", "down_proj"])
    launcher = Launcher(str(tmp_path / "base"), tmp_path, "--num-shard", "2", "--max-input-length", "32",
                        "--max-total-tokens", "64").wait_ready()
    try:
        jobs = [("Hello world", None), ("The quick brown fox", adapter), ("What is the capital", None)]
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(generate, launcher.url, p, **({"adapter_id": str(a), "adapter_source": "local"} if a else {}))
                       for p, a in jobs]
            responses = [f.result() for f in futures]
        for (prompt, a), response in zip(jobs, responses):
            assert response.status_code == 200, response.text
            assert [t["id"] for t in response.json()["details"]["tokens"]] == expected_tokens(tmp_path / "base", a, prompt, 8)
    finally:
        assert launcher.stop() == 0, launcher.output()


def test_uneven_split_is_a_clear_startup_error(tmp_path):
    make_model("llama", tmp_path / "base", num_attention_heads=4, num_key_value_heads=2)
    launcher = Launcher(str(tmp_path / "base"), tmp_path, "--num-shard", "3", "--max-input-length", "32",
                        "--max-total-tokens", "64")
    assert launcher.proc.wait(120) == 1
    assert "not divisible by the number of shards (3)" in launcher.output()
