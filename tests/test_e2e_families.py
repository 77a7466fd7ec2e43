"""Every model family through the real launcher: concurrent base and adapter requests equal transformers+peft.

The in-process tests (test_model_families.py, test_transformers_backed.py) check each family's arithmetic; these
check the wiring a user meets (config reading in the shard, adapter names from the HTTP request, the router's mixed
batches) for the families no other launcher test starts.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e import Launcher
from tests.test_e2e_serving import generate
from tests.test_model_families import ADAPTER_TARGETS, make_family_model
from tests.test_transformers_backed import FAMILIES as BACKED
from tests.test_transformers_backed import expected_tokens, make_family
from tests.tiny_models import make_adapter

pytestmark = pytest.mark.e2e
DEFAULT_TARGETS = (["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "gate_proj", "up_proj", "down_proj"])
NATIVE = ["granite", "gemma", "gemma3", "phi4-mini", "qwen2-moe", "qwen3-moe", "stablelm", "falcon", "bloom", "mpt",
          "gpt-neo"]


def build(family: str, folder):
    """(transformers model, tokenizer, the two adapters' targets) for a native or transformers-backed family."""
    if family in BACKED:
        from transformers import AutoTokenizer

        model = make_family(family, folder)
        return model, AutoTokenizer.from_pretrained(folder), BACKED[family][2]
    model, tokenizer = make_family_model(family, folder)
    like = {"phi4-mini": "phi3", "qwen2-moe": "qwen3-moe"}.get(family, family)  # same module names
    return model, tokenizer, ADAPTER_TARGETS.get(like, DEFAULT_TARGETS)


@pytest.mark.parametrize("family", NATIVE + ["gpt_neox", "opt"])
def test_concurrent_mixed_requests_match_transformers_and_peft(family, tmp_path):
    model, tokenizer, (first, second) = build(family, tmp_path / "base")
    adapters = [make_adapter(model, tmp_path / "a1", 1, 8, 16, first), make_adapter(model, tmp_path / "a2", 2, 4, 8, second)]
    jobs = [("Hello world", None), ("The quick brown fox", adapters[0]), ("What is the capital", adapters[1]),
            ("The quick brown fox", None)]
    launcher = Launcher(str(tmp_path / "base"), tmp_path, "--max-input-length", "32", "--max-total-tokens", "64").wait_ready()
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            responses = list(pool.map(lambda job: generate(
                launcher.url, job[0], **({"adapter_id": str(job[1]), "adapter_source": "local"} if job[1] else {})), jobs))
    finally:
        assert launcher.stop() == 0, launcher.output()
    for (prompt, adapter), response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        tokens = [t["id"] for t in response.json()["details"]["tokens"]]
        assert tokens == expected_tokens(tmp_path / "base", adapter, tokenizer, [(prompt, 8)])[0], (family, prompt, adapter)
