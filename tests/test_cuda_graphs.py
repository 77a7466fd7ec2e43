"""The padded, static decode step that `--compile` captures into CUDA graphs (`lorax_server/cuda_graphs.py`), run
eagerly on the CPU (`capture=False`): padding a batch to its bucket changes no request's logits or tokens, padding
rows write only the scratch cache block, the limits send steps back to the eager path, and graphs are dropped when
the adapter pools or the cache are replaced. Capture and replay themselves are checked in tests/test_gpu.py."""
from __future__ import annotations

import logging

import pytest
import torch

from lorax_server import cuda_graphs
from lorax_server.adapters.registry import AdapterKey
from lorax_server.cuda_graphs import DecodeGraphs
from lorax_server.dist import Parallel
from lorax_server.kv_cache import BLOCK_SIZE
from lorax_server.pb import generate_pb2 as pb
from lorax_server.shard import build_service
from router.startup import warmup_batch
from tests.test_shard_exactness import PROMPTS, make_request, run_staggered
from tests.tiny_models import make_adapter

CPU = torch.device("cpu")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {1: (8, ["q_proj", "v_proj"]), 2: (16, ALL)}  # router index -> (rank, targets)


@pytest.fixture
def shard(tiny_model_dir, tmp_path, monkeypatch):
    """A CPU generator with a rank-8 q/v adapter at index 1 and a rank-16 all-module one at index 2."""
    monkeypatch.setenv("LORAX_LOCAL_ADAPTER_ROOTS", str(tmp_path))
    folder, model = tiny_model_dir
    generator = build_service(str(folder), None, "hub", None, Parallel(), CPU, "/unused").generator
    for index, (rank, targets) in ADAPTERS.items():
        adapter = make_adapter(model, tmp_path / f"a{index}", index, rank, 2 * rank, targets)
        generator.adapters.load(AdapterKey((str(adapter),), "local"), index)
    return generator, model, tmp_path


def with_graphs(generator, max_batch: int = 8, max_rank: int = 16) -> DecodeGraphs:
    """Padded static decode, eager (no capture), armed on a fresh cache with its scratch block."""
    graphs = DecodeGraphs(generator.model, generator.adapters, CPU, max_batch, max_rank, capture=False)
    generator.graphs = graphs
    generator.allocate_cache(2048)
    graphs.arm(generator.cache)
    return graphs


def spy_buckets(monkeypatch, graphs: DecodeGraphs) -> list[int]:
    """The bucket of every padded step the runner runs."""
    seen: list[int] = []
    forward = graphs._forward

    def recording(bucket: int) -> torch.Tensor:
        seen.append(bucket)
        return forward(bucket)

    monkeypatch.setattr(graphs, "_forward", recording)
    return seen


def requests_for(generator, adapters: list[int], max_new: list[int]) -> list[pb.Request]:
    requests = [make_request(generator.tokenizer, i, PROMPTS[i % len(PROMPTS)], n) for i, n in enumerate(max_new)]
    for request, index in zip(requests, adapters):
        request.adapter_index = index
    return requests


def start(generator, adapters: list[int], max_new: list[int], batch_id: int = 0):
    """The running batch after prefilling requests of these adapters."""
    requests = requests_for(generator, adapters, max_new)
    return generator.prefill(generator.new_batch(pb.Batch(id=batch_id, requests=requests)))[1]


def run_recording(generator, requests: list[pb.Request]) -> tuple[dict[int, list[int]], list[torch.Tensor]]:
    """run_staggered's tokens, and the logits of every step (prefills and decodes) in order."""
    logits: list[torch.Tensor] = []
    advance = generator._advance

    def recording(batch, step_logits, details):
        logits.append(step_logits.clone())
        return advance(batch, step_logits, details)

    generator._advance = recording
    try:
        return run_staggered(generator, requests), logits
    finally:
        del generator._advance


def test_padded_decode_equals_the_eager_decode_as_requests_finish_and_join(shard, monkeypatch):
    generator, _, _ = shard
    adapters, max_new = [0, 1, 2, 2, 0, 1], [8, 3, 10, 6, 4, 9]
    generator.allocate_cache(2048)
    eager_tokens, eager_logits = run_recording(generator, requests_for(generator, adapters, max_new))

    graphs = with_graphs(generator)
    seen = spy_buckets(monkeypatch, graphs)
    tokens, logits = run_recording(generator, requests_for(generator, adapters, max_new))

    assert tokens == eager_tokens
    assert len(logits) == len(eager_logits)
    for step, (got, expected) in enumerate(zip(logits, eager_logits)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=f"step {step}")
    assert len(seen) == len(logits) - 2, "every decode step (all but the two prefills) ran padded"
    assert {1, 2, 4, 8} <= set(seen), seen  # 3 rows padded to 4, 5 after the join to 8, down to 1 at the end
    assert generator.cache.free_blocks == generator.cache.num_blocks, "every block returns to the cache"


def test_padding_rows_write_only_the_scratch_block(shard, monkeypatch):
    generator, _, _ = shard
    graphs = with_graphs(generator)
    seen = spy_buckets(monkeypatch, graphs)
    cache = generator.cache
    batch = start(generator, [0, 2, 1], [4, 4, 4])
    assert cache.scratch not in {b for r in batch.requests for b in r.blocks}
    new_slots = {r.blocks[r.kv_len // BLOCK_SIZE] * BLOCK_SIZE + r.kv_len % BLOCK_SIZE for r in batch.requests}
    before = cache.tensor.clone()
    generator.decode([batch])
    assert seen == [4]
    changed = (cache.tensor != before).permute(3, 0, 1, 2, 4).flatten(1).any(1).nonzero().flatten().tolist()
    scratch = set(range(cache.scratch * BLOCK_SIZE, (cache.scratch + 1) * BLOCK_SIZE))
    assert new_slots <= set(changed), "each request wrote its new token's keys and values"
    assert set(changed) - new_slots <= scratch, "nothing else changed but the scratch block"
    assert cache.scratch * BLOCK_SIZE in changed, "the padding row wrote its one key there"
    everything = cache.allocate([cache.free_blocks * BLOCK_SIZE])[0]
    assert cache.scratch not in everything, "the allocator never hands the scratch block out"
    cache.free(everything)


@pytest.mark.parametrize("max_batch,max_rank,adapters,padded", [
    (2, 16, [0, 1, 2], False),  # three requests, more than the largest bucket
    (8, 8, [0, 1, 2], False),  # adapter 2's rank 16 is above the limit
    (8, 8, [0, 1, 1], True),  # rank 8 is within it
])
def test_limits_send_a_step_to_the_eager_path(shard, monkeypatch, max_batch, max_rank, adapters, padded):
    generator, _, _ = shard
    graphs = with_graphs(generator, max_batch, max_rank)
    seen = spy_buckets(monkeypatch, graphs)
    batch = start(generator, adapters, [3] * 3)
    generations, _ = generator.decode([batch])
    assert len(generations) == 3
    assert seen == ([4] if padded else [])


class EagerGraph:
    """Stands in for a CUDA graph on the CPU: a replay runs the padded step again into the same logits tensor."""

    def __init__(self, graphs: DecodeGraphs, bucket: int):
        self.graphs, self.bucket = graphs, bucket
        self.logits = graphs._forward(bucket)

    def replay(self) -> None:
        with torch.inference_mode():
            self.logits.copy_(self.graphs._forward(self.bucket))


def fake_capture(monkeypatch, graphs: DecodeGraphs) -> list[int]:
    """Turn capture on with EagerGraph in place of torch.cuda.graph; returns the buckets recorded."""
    recorded: list[int] = []

    def record(bucket: int):
        recorded.append(bucket)
        graph = EagerGraph(graphs, bucket)
        return graph, graph.logits

    graphs.capture = True
    monkeypatch.setattr(graphs, "_record", record)
    return recorded


def test_replaced_adapter_pools_drop_the_graphs(shard, monkeypatch):
    generator, model, tmp_path = shard
    graphs = with_graphs(generator, max_rank=64)
    recorded = fake_capture(monkeypatch, graphs)
    pools = generator.adapters.pools
    batch = start(generator, [0, 1, 2], [8, 8, 8])
    for _ in range(2):
        _, batch = generator.decode([batch])
    assert recorded == [4] and graphs.captured() == [4], "captured once, then replayed"

    version = pools.version
    key = AdapterKey((str(tmp_path / "a1"),), "local")
    generator.adapters.offload(1)
    generator.adapters.load(key, 1)  # back into the rows it freed: no pool replaced
    assert pools.version == version
    _, batch = generator.decode([batch])
    assert recorded == [4]

    big = make_adapter(model, tmp_path / "big", 3, 64, 64, ALL)
    generator.adapters.load(AdapterKey((str(big),), "local"), 3)  # more rows than are free: the pools grow
    assert pools.version > version
    _, batch = generator.decode([batch])
    assert recorded == [4, 4], "the old graph read the old pools: captured again"


def test_a_new_cache_needs_arming_and_warm_up_arms_it(shard, monkeypatch):
    generator, _, _ = shard
    graphs = with_graphs(generator)
    seen = spy_buckets(monkeypatch, graphs)
    generator.allocate_cache(1024)  # replaced: the runner was armed on the old one
    batch = start(generator, [0, 1], [3, 3])
    _, batch = generator.decode([batch])
    assert seen == []
    batch.release(generator.cache)

    generator.warmup(warmup_batch(16, 64, 32), 64)
    assert seen == [], "the warm-up's own decode ran eagerly"
    assert generator.cache.scratch is not None
    batch = start(generator, [0, 1], [3, 3], batch_id=1)
    generator.decode([batch])
    assert seen == [2], "after warm-up, steps run padded on the cache that serves"


def test_a_failed_capture_leaves_decode_eager(shard, monkeypatch, caplog):
    generator, _, _ = shard
    graphs = with_graphs(generator)
    attempts: list[int] = []

    def broken(bucket: int):
        attempts.append(bucket)
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs.capture = True
    monkeypatch.setattr(graphs, "_record", broken)
    with caplog.at_level(logging.WARNING, logger="lorax_server.cuda_graphs"):
        batch = start(generator, [0, 2], [5, 5])
        for _ in range(3):
            generations, batch = generator.decode([batch])
            assert len(generations) == 2
    assert attempts == [2], "tried once, then eager from then on"
    assert "stream is capturing" in graphs.failed
    assert len([r for r in caplog.records if "runs eagerly from now on" in r.getMessage()]) == 1


def test_graphs_are_only_offered_where_decode_can_be_captured(shard, caplog):
    generator, _, _ = shard
    assert cuda_graphs.unsupported(generator.model, Parallel(), CPU) == "CUDA graphs need a CUDA device"
    with caplog.at_level(logging.WARNING, logger="lorax_server.cuda_graphs"):
        assert cuda_graphs.from_env(generator.model, generator.adapters, Parallel(), CPU) is None
    assert "decode runs eagerly (CUDA graphs need a CUDA device)" in caplog.text
    assert cuda_graphs.buckets(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert cuda_graphs.buckets(48) == [1, 2, 4, 8, 16, 32, 48]
