"""The CUDA path: bfloat16 multi-LoRA against transformers + peft, read-backs per decode step, the memory plan, the
launcher serving on a GPU, and `--compile`'s CUDA graphs against eager decode. Skipped without CUDA;
`scripts/gpu_check.sh` runs them with `pytest -m gpu`.

Tolerance: bfloat16 keeps 8 bits of mantissa, and our fused projections sum in a different order than
transformers, so prompt logprobs are compared with a mean absolute difference below 0.05 nats (max 0.3).
"""
from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from lorax_server import cuda_graphs
from lorax_server.adapters.registry import AdapterKey
from lorax_server.dist import Parallel
from lorax_server.pb import generate_pb2 as pb
from lorax_server.shard import build_service
from tests.e2e import Launcher
from tests.test_cuda_graphs import ALL, requests_for, run_recording, start
from tests.test_e2e_serving import generate
from tests.test_shard_exactness import PROMPTS, make_request
from tests.tiny_models import make_adapter, make_model

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)
TARGETS = [(8, 16, ["q_proj", "v_proj"]), (16, 32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])]


@pytest.fixture
def cuda_shard(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(tmp_path))
    model = make_model("llama", tmp_path / "base")
    adapters = [make_adapter(model, tmp_path / f"a{i}", i + 1, r, a, t) for i, (r, a, t) in enumerate(TARGETS)]
    service = build_service(str(tmp_path / "base"), None, "hub", "bfloat16", Parallel(), CUDA, "/unused")
    for i, folder in enumerate(adapters):
        service.generator.adapters.load(AdapterKey((str(folder),), "local"), i + 1)
    return service.generator, tmp_path / "base", adapters


def reference_prompt_logprobs(base, adapter, ids: list[int]) -> list[float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(CUDA)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).to(CUDA)
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=CUDA)).logits[0].float()
    logprobs = logits.log_softmax(-1)[:-1].gather(-1, torch.tensor(ids[1:], device=CUDA)[:, None]).squeeze(-1)
    return logprobs.tolist()


def test_bfloat16_mixed_adapters_match_transformers_and_peft(cuda_shard):
    generator, base, adapters = cuda_shard
    requests = []
    for i in range(3):  # base, a q/v rank-8 adapter, an all-projection rank-16 adapter, in one batch
        request = make_request(generator.tokenizer, i, PROMPTS[i], 4)
        request.adapter_index, request.prefill_logprobs = i, True
        requests.append(request)
    generations, _ = generator.prefill(generator.new_batch(pb.Batch(id=0, requests=requests)))
    for i, generation in enumerate(generations):
        ours = list(generation.prefill_tokens.logprobs)[1:]
        assert math.isnan(generation.prefill_tokens.logprobs[0])
        expected = reference_prompt_logprobs(base, adapters[i - 1] if i else None, list(requests[i].tokenized_inputs.ids))
        diffs = [abs(a - b) for a, b in zip(ours, expected)]
        assert sum(diffs) / len(diffs) < 0.05 and max(diffs) < 0.3, (i, diffs)


def test_a_decode_step_synchronises_once(cuda_shard):
    generator, _, _ = cuda_shard
    requests = [make_request(generator.tokenizer, i, PROMPTS[i % 3], 8, do_sample=i % 2 == 1, seed=i) for i in range(6)]
    for i, request in enumerate(requests):
        request.adapter_index = i % 3
    _, batch = generator.prefill(generator.new_batch(pb.Batch(id=0, requests=requests)))
    _, batch = generator.decode([batch])  # first decode: lazy CUDA initialisation happens outside the count
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generator.decode([batch])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, syncs


def test_memory_plan_leaves_the_gpu_its_wiggle_room(cuda_shard):
    from router.startup import warmup_batch

    generator, _, _ = cuda_shard
    generator.cache = None
    free_before, _ = torch.cuda.mem_get_info(CUDA)
    capacity = generator.warmup(warmup_batch(64, 1024, 128), 1024)
    cache_bytes = generator.cache.tensor.numel() * generator.cache.tensor.element_size()
    assert capacity >= 1024
    assert cache_bytes <= free_before * 0.9, "the KV cache stays within MEMORY_WIGGLE_ROOM of what was free"
    assert torch.cuda.mem_get_info(CUDA)[0] > 0.05 * free_before


def test_the_launcher_serves_adapters_on_a_gpu(tmp_path):
    model = make_model("llama", tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "adapter", 3, 8, 16, ["q_proj", "v_proj"])
    launcher = Launcher(str(tmp_path / "base"), tmp_path, "--max-input-length", "32", "--max-total-tokens", "64",
                        env={"CUDA_VISIBLE_DEVICES": "0"}).wait_ready()
    try:
        for params in ({}, {"adapter_id": str(adapter), "adapter_source": "local"}):
            response = generate(launcher.url, "Hello world", **params)
            assert response.status_code == 200, response.text
            assert response.json()["details"]["generated_tokens"] == 8
        assert "cuda" in launcher.output()
    finally:
        assert launcher.stop() == 0, launcher.output()


@pytest.mark.parametrize("window", [None, 6])
def test_flash_prefill_equals_the_masked_path(window, monkeypatch):
    from lorax_server.layers import attention, flash_prefill

    assert flash_prefill.usable(CUDA), "torch's varlen flash kernel should run on this GPU"
    lens = torch.tensor([3, 19, 8], device=CUDA)
    gen = torch.Generator(device=CUDA).manual_seed(0)
    total, heads, kv_heads, dim = int(lens.sum()), 8, 2, 64
    q, k, v = (torch.randn(total, h, dim, generator=gen, device=CUDA, dtype=torch.bfloat16) for h in (heads, kv_heads, kv_heads))
    tables = torch.arange(6, device=CUDA).view(3, 2)  # two 16-token blocks per prompt

    def run() -> torch.Tensor:
        cache = torch.zeros(2, kv_heads, 6 * 16, dim, device=CUDA, dtype=torch.bfloat16)
        meta = attention.build_metadata(lens, lens, tables, 16, window, 19, 19)
        return attention.paged_attention(q, k, v, cache, meta, dim**-0.5), meta

    flash, meta = run()
    assert meta.cu_seqlens is not None and meta.mask is None, "CUDA prefill builds no dense mask"
    monkeypatch.setattr(flash_prefill, "usable", lambda device: False)
    masked, meta = run()
    assert meta.mask is not None
    assert (flash.float() - masked.float()).abs().max() < 2e-2


@pytest.mark.parametrize("window", [None, 20])
def test_flash_decode_equals_the_gathered_path(window, monkeypatch):
    from lorax_server.layers import attention, flash_decode

    assert flash_decode.usable(CUDA), "torch's paged flash kernel should run on this GPU"
    kv_lens = torch.tensor([1, 40, 17, 33], device=CUDA)
    gen = torch.Generator(device=CUDA).manual_seed(0)
    heads, kv_heads, dim, blocks = 8, 2, 64, 16
    q, k, v = (torch.randn(4, h, dim, generator=gen, device=CUDA, dtype=torch.bfloat16) for h in (heads, kv_heads, kv_heads))
    tables = torch.tensor([[5, 0, 0], [1, 9, 3], [12, 2, 0], [7, 15, 11]], device=CUDA)  # scattered blocks
    cache0 = torch.randn(2, kv_heads, blocks * 16, dim, generator=gen, device=CUDA, dtype=torch.bfloat16)

    def run() -> torch.Tensor:
        cache = cache0.clone()
        meta = attention.build_metadata(torch.ones_like(kv_lens), kv_lens, tables, 16, window, 1, 40)
        return attention.paged_attention(q, k, v, cache, meta, dim**-0.5), meta, cache

    flash, meta, cache_flash = run()
    assert meta.paged is not None and meta.mask is None, "CUDA decode builds no mask and gathers nothing"
    monkeypatch.setattr(flash_decode, "usable", lambda device: False)
    gathered, meta, cache_gathered = run()
    assert meta.paged is None
    assert torch.equal(cache_flash, cache_gathered), "both paths write the new keys and values alike"
    assert (flash.float() - gathered.float()).abs().max() < 2e-2


def test_cuda_graph_decode_equals_eager(cuda_shard, tmp_path):
    """--compile: padded steps replayed from CUDA graphs give eager decode's tokens as requests finish and join, with
    one synchronisation per replayed step, and graphs are captured again once the adapter pools grow."""
    generator, base, _ = cuda_shard
    indices, max_new = [0, 1, 2, 2, 0, 1], [8, 3, 10, 6, 4, 9]
    generator.allocate_cache(4096)
    eager_tokens, eager_logits = run_recording(generator, requests_for(generator, indices, max_new))

    graphs = cuda_graphs.from_env(generator.model, generator.adapters, Parallel(), CUDA)
    assert graphs is not None, "a bfloat16 Llama on one GPU can be captured"
    generator.graphs = graphs
    generator.allocate_cache(4096)
    graphs.arm(generator.cache)
    tokens, logits = run_recording(generator, requests_for(generator, indices, max_new))
    assert graphs.failed is None
    assert {1, 2, 4, 8} <= set(graphs.captured()), graphs.captured()
    assert tokens == eager_tokens
    for got, expected in zip(logits, eager_logits):
        assert (got - expected).abs().max() <= 0.02 * expected.abs().max() + 0.02

    batch = start(generator, [0, 1, 2], [8] * 3, batch_id=7)
    _, batch = generator.decode([batch])  # batch size 4's graph exists: this replays it
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, batch = generator.decode([batch])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, syncs

    from transformers import AutoModelForCausalLM

    big = make_adapter(AutoModelForCausalLM.from_pretrained(base), tmp_path / "big", 9, 64, 64, ALL)
    version = generator.adapters.pools.version
    generator.adapters.load(AdapterKey((str(big),), "local"), 3)  # more rows than are free: the pools grow
    assert generator.adapters.pools.version > version
    _, batch = generator.decode([batch])
    assert graphs.captured() == [4] and graphs.failed is None, "the old graphs were dropped, batch size 4 recaptured"


def test_the_launcher_generates_the_same_text_with_compile(tmp_path):
    model = make_model("llama", tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "adapter", 3, 8, 16, ["q_proj", "v_proj"])
    adapter_params = {"adapter_id": str(adapter), "adapter_source": "local"}
    jobs = [(prompt, params) for prompt in PROMPTS for params in ({}, adapter_params)]
    texts = {}
    for flags in ((), ("--compile",)):
        launcher = Launcher(str(tmp_path / "base"), tmp_path, "--max-input-length", "32", "--max-total-tokens", "64",
                            *flags, env={"CUDA_VISIBLE_DEVICES": "0"}).wait_ready()
        try:
            one_by_one = [generate(launcher.url, prompt, **params) for prompt, params in jobs]  # batches of one
            with ThreadPoolExecutor(len(jobs)) as pool:  # mixed batches: larger graphs
                together = list(pool.map(lambda job: generate(launcher.url, job[0], **job[1]), jobs))
            for response in one_by_one + together:
                assert response.status_code == 200, response.text
            texts[flags] = [r.json()["generated_text"] for r in one_by_one]
            launcher.log.flush()
            log = Path(launcher.log.name).read_text()  # the whole log: output() keeps only its end
        finally:
            assert launcher.stop() == 0, launcher.output()
        if flags:
            assert "captured the decode step" in log and "runs eagerly" not in log, log[-6000:]
    assert texts[()] == texts[("--compile",)]
