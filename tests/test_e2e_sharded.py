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
    check_two_shards(arch, tmp_path)


def test_two_shards_pad_an_odd_vocabulary_and_split_an_odd_intermediate_size(tmp_path):
    """Vocab 321 (id 320 has no token text) is padded to 2 x 161 rows; 129 intermediate features split 65 + 64."""
    check_two_shards("llama", tmp_path, vocab_size=321, intermediate_size=129)


def check_two_shards(arch: str, tmp_path, *args: str, env: dict | None = None, **sizes: int) -> None:
    # one KV head: each of the two ranks needs it, so it is replicated rather than split
    model = make_model(arch, tmp_path / "base", num_key_value_heads=1, **sizes)
    adapter = make_adapter(model, tmp_path / "adapter", 3, 8, 16, ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    launcher = Launcher(str(tmp_path / "base"), tmp_path, "--num-shard", "2", "--max-input-length", "32",
                        "--max-total-tokens", "64", *args, env=env).wait_ready()
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


def test_killing_one_shard_stops_everything(tmp_path):
    import os
    import signal
    import time

    from tests.e2e import descendants

    make_model("llama", tmp_path / "base")
    launcher = Launcher(str(tmp_path / "base"), tmp_path, "--num-shard", "2", "--max-input-length", "32",
                        "--max-total-tokens", "64").wait_ready()
    children = descendants(launcher.proc.pid)
    shards = [p for p in children if b"serve" in open(f"/proc/{p}/cmdline", "rb").read()]
    assert len(shards) >= 2
    os.kill(shards[-1], signal.SIGKILL)
    assert launcher.proc.wait(10) != 0, launcher.output()
    time.sleep(0.5)
    alive = [p for p in children if os.path.exists(f"/proc/{p}") and "zombie" not in open(f"/proc/{p}/status").read().lower()]
    assert alive == [], launcher.output()


@pytest.mark.gpu
def test_two_shards_on_cuda_match_transformers(tmp_path):
    """The same exactness check over nccl where two GPUs exist (float32, so greedy tokens stay comparable)."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    check_two_shards("llama", tmp_path, "--dtype", "float32", env={"CUDA_VISIBLE_DEVICES": "0,1"})
